"""`latentstore export neuronpedia`: every field in SAEDashboard's format, equal to the store's own numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.export import export_neuronpedia
from pipeline import dashboard_data
from pipeline.dashboard_data import (DashboardBuilder, DashboardSettings, effective_unembed, load_logit_weights,
                                     model_unembed)
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore
from store.errors import ConfigError
from tests.stores import shared_store

pytestmark = pytest.mark.ray
HOOK = "blocks.0.hook_resid_post"
BATCH_KEYS = {"model_id", "layer", "sae_set", "features"}
FEATURE_KEYS = {"feature_index", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
                "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_values",
                "logits_hist_data_bar_heights", "n_prompts_total", "n_tokens_in_prompt", "dataset", "activations"}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index",
                   "dataset_row", "dataset_pos", "token_index"}


def small_store(assets, tmp_path_factory) -> FeatureStore:
    """The session's shared store (extracted once), which the dashboard tests use too."""
    return shared_store(assets, tmp_path_factory)


@pytest.fixture(scope="module")
def store(assets, ray_cluster, tmp_path_factory) -> FeatureStore:
    return small_store(assets, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("np")
    paths = export_neuronpedia(store, HOOK, out, batch_size=40)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    return [json.loads(p.read_text()) for p in paths]


def counted(fs: FeatureStore, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """The feature's activations above 0 on non-special tokens, in token order, from the CSR."""
    column = fs.csr(HOOK)[:, feature].toarray().ravel()
    tokens = np.nonzero(column > 0)[0]
    tokens = tokens[~np.isin(fs.token_ids()[tokens], list(fs.special_token_ids))]
    return tokens, column[tokens]


def test_batches_hold_every_feature_with_saedashboards_fields(store, exported):
    assert sum(len(b["features"]) for b in exported) == store.d_sae(HOOK)
    assert [len(b["features"]) for b in exported] == [40, 40, 16]
    for batch in exported:
        assert set(batch) == BATCH_KEYS
        assert batch["layer"] == 0 and batch["model_id"] == "model" and batch["sae_set"] == "0-resid"
        for feature in batch["features"]:
            assert set(feature) == FEATURE_KEYS
            assert feature["n_tokens_in_prompt"] == 16
            assert feature["dataset"] == store.run["dataset"]["name"]
            for activation in feature["activations"]:
                assert set(activation) == ACTIVATION_KEYS
    features = [f for b in exported for f in b["features"]]
    assert [f["feature_index"] for f in features] == list(range(store.d_sae(HOOK)))
    # every window starts with BOS here, so the prompts are the BOS tokens
    assert features[0]["n_prompts_total"] == int((store.provenance()["pos"] == -1).sum()) > len(store.shards)


def test_examples_groups_density_and_histogram_equal_the_store(store, exported):
    features = {f["feature_index"]: f for b in exported for f in b["features"]}
    ids, prov = store.token_ids(), store.provenance()
    busy = np.argsort(-store.stats(HOOK).count, kind="stable")[:8].tolist()
    for index in busy:
        f = features[index]
        tokens, values = counted(store, index)
        assert f["frac_nonzero"] == len(tokens) / store.n_tokens  # full precision, not a parsed percentage
        top = store.top_activations(HOOK, index, k=20)
        shown = [a for a in f["activations"] if a["bin_contains"] == -1]
        assert [a["token_index"] for a in shown] == top["token_index"].tolist()
        assert all(a["bin_min"] == -1 and a["bin_max"] == float(values.max()) for a in shown)
        groups = store.quantile_samples(HOOK, index, n_groups=10, per_group=5, method="interval")
        sampled = [a for a in f["activations"] if a["bin_contains"] != -1]
        assert [a["token_index"] for a in sampled] == groups["token_index"].tolist()
        np.testing.assert_allclose([a["bin_min"] for a in sampled], groups["group_min"])
        np.testing.assert_allclose([a["bin_max"] for a in sampled], groups["group_max"])
        np.testing.assert_allclose([a["bin_contains"] for a in sampled], groups["group_size"] / len(tokens))
        column = store.csr(HOOK)[:, index].toarray().ravel()
        for a, expected in zip(shown + sampled, list(top["activation"]) + list(groups["activation"])):
            t, q = a["token_index"], a["qualifying_token_index"]
            lo = t - q
            assert a["values"][q] == pytest.approx(expected, abs=0)
            assert a["tokens"] == [store.vocab[i] for i in ids[lo:lo + len(a["tokens"])]]
            counted_column = np.where(np.isin(ids[lo:lo + len(a["values"])], list(store.special_token_ids)), 0,
                                      column[lo:lo + len(a["values"])])
            np.testing.assert_array_equal(a["values"], np.maximum(counted_column, 0))
            assert (a["dataset_row"], a["dataset_pos"]) == (prov["row"][t], prov["pos"][t])
            assert prov["pos"][lo] == -1  # the whole window, from its BOS
        values = values.astype(np.float64)
        heights, edges = np.histogram(values, bins=50, range=(values.min(), values.max()))
        assert f["freq_hist_data_bar_heights"] == heights.tolist()
        np.testing.assert_allclose(f["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2)


def test_logit_tables_are_w_dec_times_the_folded_unembedding(store, assets, exported):
    features = [f for b in exported for f in b["features"]]
    sae = load_sae(SAESource.parse(str(assets["sae_dirs"][HOOK])))
    model = load_model(str(assets["model_dir"]))
    unfolded = effective_unembed(model.W_U, model.ln_final.w, model.cfg.normalization_type)
    torch.testing.assert_close(model_unembed(str(assets["model_dir"])), unfolded)  # from the file alone
    # what TransformerLens's from_pretrained gives, and SAEDashboard multiplies by
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    torch.testing.assert_close(unfolded, model.W_U.detach(), rtol=1e-5, atol=1e-5)
    effects = (sae.W_dec.detach() @ model.W_U.detach()).numpy()
    for f in features[::7]:
        row = effects[f["feature_index"]]
        top, bottom = np.argsort(-row)[:10], np.argsort(row)[:10]
        assert f["pos_str"] == [store.vocab[i] for i in top]
        assert f["neg_str"] == [store.vocab[i] for i in bottom]
        np.testing.assert_allclose(f["pos_values"], row[top], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f["neg_values"], row[bottom], rtol=1e-4, atol=1e-5)
        heights, edges = np.histogram(row, bins=50, range=(row.min(), row.max()))
        assert sum(f["logits_hist_data_bar_heights"]) == len(row)
        np.testing.assert_allclose(f["logits_hist_data_bar_heights"], heights, atol=1)  # float edges may differ
        np.testing.assert_allclose(f["logits_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2, atol=1e-5)


def test_cofiring_and_rank_groups_equal_the_store(store, monkeypatch):
    # blocks of 7 features: several blocks, made two at a time on other threads, each a view of the columns
    monkeypatch.setattr(dashboard_data, "BLOCK_FEATURES", 7)
    settings = DashboardSettings(group_method="rank", context=(3, 2))
    weights = load_logit_weights(store, HOOK)
    busy = np.argsort(-store.stats(HOOK).count, kind="stable")[:5].tolist()
    built = 0
    for d in DashboardBuilder(store, HOOK, weights, settings).build(range(0, store.d_sae(HOOK))):
        built += 1
        # every feature, however few its activations, has numpy's histogram and the store's top examples
        tokens, values = counted(store, d.feature)
        assert d.n_fired == len(tokens)
        if len(values):
            x = values.astype(np.float64)
            heights, edges = np.histogram(x, bins=50, range=(x.min(), x.max()))
            assert d.hist_counts == heights.tolist() and d.hist_centers == ((edges[:-1] + edges[1:]) / 2).tolist()
            assert [e.token_index for e in d.groups[0].examples] == \
                store.top_activations(HOOK, d.feature, k=20)["token_index"].tolist()
        else:
            assert d.groups == [] and d.hist_counts == [] and d.max == 0.0
        if d.feature not in busy:
            continue
        expected = store.cofiring(HOOK, d.feature, k=10)
        assert [c["feature"] for c in d.cofiring] == expected["feature"].tolist()
        np.testing.assert_allclose([c["jaccard"] for c in d.cofiring], expected["jaccard"])
        np.testing.assert_allclose([c["fraction"] for c in d.cofiring], expected["fraction"])
        groups = store.quantile_samples(HOOK, d.feature, method="rank", context=(3, 2))
        sampled = [e for g in d.groups[1:] for e in g.examples]
        assert [e.token_index for e in sampled] == groups["token_index"].tolist()
        assert all(len(e.token_ids) <= 6 for e in sampled)
    assert built == store.d_sae(HOOK)
    first_few = DashboardBuilder(store, HOOK, None, settings).build()  # left after one feature: nothing waits on it
    assert next(first_few).feature == 0
    first_few.close()


def test_command_line_and_bad_input(store, tmp_path, capsys):
    assert main(["export", "neuronpedia", store.location, "--hook", HOOK, "--out", str(tmp_path),
                 "--features", "10:20", "--no-logits", "--no-progress"]) == 0
    batch = json.loads((tmp_path / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == list(range(10, 20))
    assert batch["features"][0]["pos_str"] == []
    assert "wrote 1 batch files" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="goes past .* 96 features"):
        export_neuronpedia(store, HOOK, tmp_path, range(90, 100))
    assert main(["export", "neuronpedia", store.location, "--hook", "blocks.9.nope", "--out", str(tmp_path)]) == 2
    assert "blocks.0.hook_resid_post" in capsys.readouterr().err
