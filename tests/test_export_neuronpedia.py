"""`latentstore export neuronpedia`: every key Neuronpedia's converter reads, in SAEDashboard's types, each
equal to the store's own numbers.

The key lists are those of Neuronpedia's converter, ``convert-saedashboard-to-neuronpedia-export.py`` in
``utils/neuronpedia-utils/neuronpedia_utils`` of the neuronpedia repository (github.com/hijohnnylin/neuronpedia),
read at commit 4d6d6c6de4a3 of its zazer0/neuronpedia mirror: the keys it indexes, and those it reads only
when present (``vector``, ``dfa_*``), and the options it asks for. That converter, with its
``neuronpedia_utils.db_models`` as stored at ab1e24c1d632, was also run by hand on an export of the embedded
default (``docs/DASHBOARDS.md``, "Checked by hand"): it found what the tests below hold it to, and two SAE
pieces exported apart lost one's features to the other's ``batch-0``, which the batch numbering test covers. The types are those SAEDashboard writes
(``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``, the version whose batch has ``sae_id_suffix`` and
whose features have ``vector``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tqdm import tqdm

from jobs.cli import main
from jobs.export import export_neuronpedia
from pipeline import dashboard_data
from pipeline.dashboard_data import (DashboardBuilder, DashboardSettings, effective_unembed, load_logit_weights,
                                     model_unembed)
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore
from store.errors import ConfigError
from tests.stores import config, shared_store

pytestmark = pytest.mark.ray
HOOK = "blocks.0.hook_resid_post"
INTS, FLOATS, STRS = "list[int]", "list[float]", "list[str]"
# SAEDashboard's NeuronpediaDashboardBatch / Feature / Activation .to_dict(): key -> type
SAEDASHBOARD_BATCH = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": (str, type(None)),
                      "features": list}
SAEDASHBOARD_FEATURE = {
    "feature_index": int, "neuron_alignment_indices": INTS, "neuron_alignment_values": FLOATS,
    "neuron_alignment_l1": FLOATS, "correlated_neurons_indices": INTS, "correlated_neurons_l1": FLOATS,
    "correlated_neurons_pearson": FLOATS, "correlated_features_indices": INTS, "correlated_features_l1": FLOATS,
    "correlated_features_pearson": FLOATS, "neg_str": STRS, "neg_values": FLOATS, "pos_str": STRS,
    "pos_values": FLOATS, "frac_nonzero": (float, int), "freq_hist_data_bar_values": FLOATS,
    "freq_hist_data_bar_heights": INTS, "logits_hist_data_bar_heights": INTS, "logits_hist_data_bar_values": FLOATS,
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str, "decoder_weights_dist": FLOATS,
    "activations": list, "vector": FLOATS,
}
SAEDASHBOARD_ACTIVATION = {"bin_min": (float, int), "bin_max": (float, int), "bin_contains": (float, int),
                           "tokens": STRS, "values": FLOATS, "qualifying_token_index": int}
OURS = {"dataset_row": int, "dataset_pos": int, "token_index": int}  # where the example came from
# what the converter indexes (a missing one aborts it); it reads vector and dfa_* only when present
CONVERTER_BATCH = {"layer", "sae_id_suffix", "features"}  # and model_id, unless --model-name is given
CONVERTER_FEATURE = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "activations",
}
CONVERTER_ACTIVATION = {"tokens", "values", "bin_contains", "bin_max", "bin_min", "qualifying_token_index"}
# the converter's options: it prompts for any not given (--zero-out-bos-token is a flag with no --no- form)
CONVERTER_OPTIONS = {
    "--saedashboard-output-dir", "--creator-name", "--release-id", "--release-title", "--url", "--model-name",
    "--neuronpedia-source-set-id", "--neuronpedia-source-set-description", "--hf-weights-repo-id",
    "--hf-weights-path", "--hook-point", "--layer-num", "--prompts-huggingface-dataset-path", "--n-prompts-total",
    "--n-tokens-in-prompt", "--zero-out-bos-token",
}


def has_type(value, kind) -> bool:
    if isinstance(kind, str):
        element = {INTS: int, FLOATS: float, STRS: str}[kind]
        return isinstance(value, list) and all(type(v) is element for v in value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return type(value) in kinds


def assert_typed(record: dict, types: dict, extra: dict | None = None) -> None:
    expected = {**types, **(extra or {})}
    assert set(record) == set(expected), set(record) ^ set(expected)
    for key, kind in expected.items():
        assert has_type(record[key], kind), (key, record[key])


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


def test_batches_hold_every_key_the_converter_reads_in_saedashboards_types(store, exported):
    assert sum(len(b["features"]) for b in exported) == store.d_sae(HOOK)
    assert [len(b["features"]) for b in exported] == [40, 40, 16]
    for batch in exported:
        assert_typed(batch, SAEDASHBOARD_BATCH)
        assert CONVERTER_BATCH <= set(batch)
        assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == \
            ("model", 0, "resid-post", None)
        for feature in batch["features"]:
            assert_typed(feature, SAEDASHBOARD_FEATURE)
            assert CONVERTER_FEATURE <= set(feature)
            assert feature["n_tokens_in_prompt"] == 16
            assert feature["dataset"] == store.run["dataset"]["name"]
            for activation in feature["activations"]:
                assert_typed(activation, SAEDASHBOARD_ACTIVATION, OURS)
                assert CONVERTER_ACTIVATION <= set(activation)
                assert activation["values"]  # the converter takes their max
    features = [f for b in exported for f in b["features"]]
    assert [f["feature_index"] for f in features] == list(range(store.d_sae(HOOK)))
    # every window starts with BOS here, so the prompts are the BOS tokens
    assert features[0]["n_prompts_total"] == int((store.provenance()["pos"] == -1).sum()) > len(store.shards)
    dead = [f for f in features if not f["activations"]]
    assert all(f["frac_nonzero"] == 0 and type(f["frac_nonzero"]) is int for f in dead)  # as SAEDashboard writes it
    # the converter's feature maximum (maxActApprox, and the default steering strength) is the largest value of
    # any window it is given: the top example's, as windows show 0 at BOS, EOS and padding
    for f in features:
        if f["activations"]:
            shown_max = max(max(a["values"]) for a in f["activations"])
            assert np.float32(shown_max) == np.float32(f["activations"][0]["bin_max"]) > 0


def counted_matrix(fs: FeatureStore) -> np.ndarray:
    """Every token's counted activations (0 on special tokens and at or below 0), dense, float64."""
    dense = np.maximum(fs.csr(HOOK).toarray().astype(np.float64), 0)
    dense[np.isin(fs.token_ids(), list(fs.special_token_ids))] = 0
    return dense


def test_top_group_and_five_equal_width_intervals_as_saedashboard_makes_them(store, exported):
    features = {f["feature_index"]: f for b in exported for f in b["features"]}
    ids, prov, dense = store.token_ids(), store.provenance(), counted_matrix(store)
    busy = np.argsort(-store.stats(HOOK).count, kind="stable")[:8].tolist()
    for index in busy:
        f = features[index]
        tokens, values = counted(store, index)
        assert f["frac_nonzero"] == len(tokens) / store.n_tokens  # full precision, not a parsed percentage
        top = store.top_activations(HOOK, index, k=20)
        shown = [a for a in f["activations"] if a["bin_contains"] == -1]
        assert [a["token_index"] for a in shown] == top["token_index"].tolist()
        assert all(a["bin_min"] == -1 and a["bin_max"] == float(values.max()) for a in shown)  # float64 text
        # 5 intervals of [0, max], highest first: their bounds, and their share of all tokens with both
        # ends included (the lowest, from 0, also holds every token where the feature is 0)
        groups = store.quantile_samples(HOOK, index, n_groups=5, per_group=5, method="interval")
        sampled = [a for a in f["activations"] if a["bin_contains"] != -1]
        assert [a["token_index"] for a in sampled] == groups["token_index"].tolist()
        edges = np.linspace(float(values.max()), 0.0, 6)
        column = dense[:, index]
        for a, g in zip(sampled, groups["group"]):
            lower, upper = edges[g + 1], edges[g]
            assert (a["bin_min"], a["bin_max"]) == pytest.approx((lower, upper), rel=1e-12, abs=1e-12)
            assert a["bin_contains"] == ((column >= a["bin_min"]) & (column <= a["bin_max"])).sum() / store.n_tokens
            assert lower <= a["values"][a["qualifying_token_index"]] <= upper
        assert {g for g in groups["group"]} <= set(range(5))
        for a, expected in zip(shown + sampled, list(top["activation"]) + list(groups["activation"])):
            t, q = a["token_index"], a["qualifying_token_index"]
            lo = t - q
            assert np.float32(a["values"][q]) == expected  # float32, written as its shortest exact text
            assert a["tokens"] == store.token_display.text(ids[lo:lo + len(a["tokens"])])
            np.testing.assert_array_equal(np.float32(a["values"]), column[lo:lo + len(a["values"])].astype(np.float32))
            assert (a["dataset_row"], a["dataset_pos"]) == (prov["row"][t], prov["pos"][t])
            assert prov["pos"][lo] == -1  # the whole window, from its BOS
        values = values.astype(np.float64)
        heights, edges = np.histogram(values, bins=50, range=(values.min(), values.max()))
        assert f["freq_hist_data_bar_heights"] == heights.tolist()
        np.testing.assert_allclose(f["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2)


@pytest.mark.parametrize("dense_gram", [True, False])
def test_correlated_features_are_pearsons_r_over_the_whole_store(store, exported, dense_gram, monkeypatch):
    if not dense_gram:  # the sparse product, which a wide SAE of small L0 takes
        monkeypatch.setattr(dashboard_data, "DENSE_GRAM_MAX_FEATURES", 0)
    settings = DashboardSettings(group_method="interval", n_groups=5, n_cofiring=0, n_correlated=3)
    built = {d.feature: d.correlated for d in DashboardBuilder(store, HOOK, None, settings).build()}
    assert (DashboardBuilder(store, HOOK, None, settings)._gram is not None) == dense_gram
    for f in (f for b in exported for f in b["features"]):
        c = built[f["feature_index"]]
        assert c.indices == f["correlated_features_indices"]
        np.testing.assert_allclose(c.pearson, f["correlated_features_pearson"], rtol=1e-5, atol=1e-6)
    dense = counted_matrix(store)
    n = float(len(dense))
    sums, sums_sq = dense.sum(0), (dense ** 2).sum(0)
    alive = sums > 0
    checked = 0
    for f in (f for b in exported for f in b["features"]):
        x = f["feature_index"]
        if not alive[x]:
            assert f["correlated_features_indices"] == f["correlated_features_pearson"] == []
            continue
        xy = dense.T @ dense[:, x]
        pearson = (n * xy - sums[x] * sums) / (np.sqrt((n * sums_sq[x] - sums[x] ** 2) * (n * sums_sq - sums ** 2))
                                               + 1e-6)
        cosine = xy / (np.sqrt(sums_sq[x] * sums_sq) + 1e-6)
        candidates = np.flatnonzero(alive & (np.arange(len(alive)) != x))
        best = candidates[np.lexsort((candidates, -pearson[candidates]))][:3]
        assert f["correlated_features_indices"] == best.tolist()
        # float32 products (the dense Gram matrix) summed in float64
        np.testing.assert_allclose(f["correlated_features_pearson"], pearson[best], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["correlated_features_l1"], cosine[best], rtol=1e-5, atol=1e-6)
        assert f["correlated_neurons_indices"] == []  # needs the model's dense activations: not in a store
        checked += 1
    assert checked > 50


def test_neuron_alignment_and_vector_come_from_w_dec(store, assets, exported):
    W_dec = load_sae(SAESource.parse(str(assets["sae_dirs"][HOOK]))).W_dec.detach().double().numpy()
    for f in (f for b in exported for f in b["features"]):
        row = W_dec[f["feature_index"]]
        unit = row / np.linalg.norm(row)
        best = np.argsort(-unit, kind="stable")[:3]
        assert f["neuron_alignment_indices"] == best.tolist()
        np.testing.assert_allclose(f["neuron_alignment_values"], unit[best], rtol=1e-6)
        np.testing.assert_allclose(f["neuron_alignment_l1"], np.abs(unit[best]) / np.abs(unit).sum(), rtol=1e-6)
        np.testing.assert_allclose(f["vector"], row, rtol=1e-6)
        assert f["decoder_weights_dist"] == []  # per-head shares exist only for an SAE at hook_z


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
        assert f["pos_str"] == store.token_display.text(top)
        assert f["neg_str"] == store.token_display.text(bottom)
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
    built, one_value = 0, []
    for d in DashboardBuilder(store, HOOK, weights, settings).build(range(0, store.d_sae(HOOK))):
        built += 1
        # every feature, however few its activations, has numpy's histogram and the store's top examples
        tokens, values = counted(store, d.feature)
        assert d.n_fired == len(tokens)
        if len(np.unique(values)) == 1:  # one distinct value: one bin at it, never below 0
            assert (d.hist_centers, d.hist_counts) == ([float(values[0])], [len(values)])
            one_value.append(d.feature)
        elif len(values):
            x = values.astype(np.float64)
            heights, edges = np.histogram(x, bins=50, range=(x.min(), x.max()))
            assert d.hist_counts == heights.tolist() and d.hist_centers == ((edges[:-1] + edges[1:]) / 2).tolist()
        if len(values):
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


def test_a_feature_with_one_distinct_value_has_one_bin_at_it(store, tmp_path):
    from jobs.dashboard import SETTINGS, feature_json

    hook = "blocks.1.hook_mlp_out"  # the TopK SAE: some of its features fired on one token only
    column = store.csr(hook).tocsc()
    once = [f for f in range(store.d_sae(hook)) if column[:, f].nnz == 1 and column[:, f].data[0] > 0
            and store.token_ids()[column[:, f].indices[0]] not in store.special_token_ids]
    assert once
    for settings in (SETTINGS, DashboardSettings(group_method="interval")):  # our pages' and the export's
        for d in DashboardBuilder(store, hook, None, settings).build():
            if d.feature in once:
                value = float(column[:, d.feature].data[0])
                assert (d.hist_centers, d.hist_counts) == ([value], [1])
                assert feature_json(d, store.sae_record(hook), store.token_display)["hist"] == [[value], [1]]
    exported = json.loads(export_neuronpedia(store, hook, tmp_path, range(once[0], once[0] + 1),
                                             logits=False)[0].read_text())["features"][0]
    value = float(column[:, once[0]].data[0])
    assert (exported["freq_hist_data_bar_values"], exported["freq_hist_data_bar_heights"]) == ([value], [1])
    assert [a["bin_max"] for a in exported["activations"]] == [value, value]  # its top group and top interval


def test_command_line_names_help_and_the_converters_command(store, tmp_path, capsys, monkeypatch):
    assert main(["export", "neuronpedia", store.location, "--hook", HOOK, "--out", str(tmp_path),
                 "--features", "10:20", "--no-logits", "--no-progress", "--model-id", "tiny-model",
                 "--sae-set", "res-test", "--sae-id-suffix", "l0-8", "--dataset", "me/my-data",
                 "--no-correlated-features"]) == 0
    batch = json.loads((tmp_path / "batch-0.json").read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == \
        ("tiny-model", 0, "res-test", "l0-8")
    assert [f["feature_index"] for f in batch["features"]] == list(range(10, 20))
    assert {f["dataset"] for f in batch["features"]} == {"me/my-data"}
    first = batch["features"][0]
    assert first["pos_str"] == [] and first["vector"] == [] and first["neuron_alignment_indices"] == []
    assert all(f["correlated_features_indices"] == f["correlated_features_pearson"] == f["correlated_features_l1"] == []
               for f in batch["features"])  # --no-correlated-features
    assert any(f["activations"] for f in batch["features"])
    out = capsys.readouterr().out
    assert "wrote 1 batch file to" in out
    command = next(line for line in out.splitlines() if "convert-saedashboard-to-neuronpedia-export.py" in line)
    # every option the converter asks for is given, so that it runs without stopping to prompt
    assert {word.split("=")[0] for word in command.split() if word.startswith("--")} == CONVERTER_OPTIONS
    for option in (f"--saedashboard-output-dir={tmp_path}", "--model-name=tiny-model",
                   "--neuronpedia-source-set-id=res-test", "--hook-point=hook_resid_post", "--layer-num=0",
                   "--prompts-huggingface-dataset-path=me/my-data", "--n-tokens-in-prompt=16",
                   f"--n-prompts-total={first['n_prompts_total']}"):
        assert option in command.split()
    # an --out relative to here is given to the converter, which runs in its own folder, as a full path
    monkeypatch.chdir(tmp_path)
    assert main(["export", "neuronpedia", store.location, "--hook", HOOK, "--out", "np", "--features", "0:1",
                 "--no-logits", "--no-progress", "--no-correlated-features"]) == 0
    assert f"--saedashboard-output-dir={tmp_path / 'np'}" in capsys.readouterr().out.split()
    # the defaults that --help states are the defaults the export uses
    with pytest.raises(SystemExit):
        main(["export", "neuronpedia", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "e.g. resid-post for blocks.1.hook_resid_post" in help_text
    assert "the model name recorded in the store; for a local model folder, the folder's name" in help_text
    assert "the dataset name recorded in the store" in help_text and "--sae-id-suffix" in help_text
    default = json.loads(export_neuronpedia(store, HOOK, tmp_path / "d", range(0, 1), logits=False)[0].read_text())
    assert (default["model_id"], default["sae_set"], default["sae_id_suffix"]) == ("model", "resid-post", None)
    assert store.run["model"]["name"].endswith("/model")
    assert default["features"][0]["dataset"] == store.run["dataset"]["name"]
    with pytest.raises(ConfigError, match="goes past .* 96 features"):
        export_neuronpedia(store, HOOK, tmp_path, range(90, 100))
    assert main(["export", "neuronpedia", store.location, "--hook", "blocks.9.nope", "--out", str(tmp_path)]) == 2
    assert "blocks.0.hook_resid_post" in capsys.readouterr().err


def test_an_sae_that_does_not_write_the_residual_stream_gets_its_decoder_tables_without_logits(store, tmp_path,
                                                                                                monkeypatch, caplog):
    # a model whose residual stream is wider than the SAE's output, as for an SAE at hook_z
    monkeypatch.setattr(dashboard_data, "model_unembed", lambda name, device="cpu": torch.zeros(7, 17))
    feature = json.loads(export_neuronpedia(store, HOOK, tmp_path, range(0, 1))[0].read_text())["features"][0]
    assert feature["pos_str"] == [] and feature["logits_hist_data_bar_heights"] == []
    assert len(feature["vector"]) == 32 and len(feature["neuron_alignment_indices"]) == 3
    assert "W_dec @ W_U has no meaning" in caplog.text


def test_decoder_weights_dist_is_each_heads_share_at_hook_z():
    from jobs.export import decoder_tables

    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(3, 4 * 8)).astype(np.float32)  # 4 heads of d_head 8
    tables = decoder_tables(W_dec, range(10, 13), heads=4)
    for i, f in enumerate(range(10, 13)):
        norms = np.linalg.norm(W_dec[i].astype(np.float64).reshape(4, 8), axis=1)
        np.testing.assert_allclose(tables[f]["decoder_weights_dist"], norms / norms.sum(), rtol=1e-12)
        assert len(tables[f]["vector"]) == 32
    assert decoder_tables(None, range(2), None)[1]["vector"] == []


@pytest.mark.parametrize("d, chunk_entries", [(37, 37 * 5), (37, 1 << 24), (37, 37 * 3), (37, 37),
                                               (dashboard_data.BLOCK_FEATURES + 45, 1 << 24)])
def test_dense_gram_is_every_product_and_sum_over_chunks_of_tokens(d, chunk_entries):
    # token chunks of 5, all, 3 and 1 tokens (the last one short); the lower triangle is mirrored a
    # block of features at a time, so one case has a block and a part of one
    rng = np.random.default_rng(1)
    dense = rng.random((101, d)) * (rng.random((101, d)) < 0.3)
    rows = dashboard_data.sp.csr_matrix(dense.astype(np.float32))
    gram, sums = dashboard_data.dense_gram(rows, chunk_entries=chunk_entries)
    reference = dense.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(gram, reference.T @ reference, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(gram, gram.T)
    np.testing.assert_allclose(sums, reference.sum(axis=0), rtol=1e-6)


def test_batches_are_numbered_over_the_whole_sae_so_pieces_share_a_folder(store, tmp_path, caplog):
    # SAEDashboard's runner names a batch by its place in the whole SAE, and the converter names its files after
    # the batch's: pieces numbered from 0 each would overwrite one another's batch-0
    whole = {p.name: p.read_bytes() for p in export_neuronpedia(store, HOOK, tmp_path / "whole", batch_size=16,
                                                                 logits=False)}
    assert sorted(whole) == [f"batch-{n}.json" for n in range(6)]
    pieces = tmp_path / "pieces"
    first = export_neuronpedia(store, HOOK, pieces, range(0, 32), batch_size=16, logits=False)
    second = export_neuronpedia(store, HOOK, pieces, range(32, 96), batch_size=16, logits=False)
    assert [p.name for p in first] == ["batch-0.json", "batch-1.json"]
    assert [p.name for p in second] == [f"batch-{n}.json" for n in range(2, 6)]
    assert {p.name: p.read_bytes() for p in pieces.iterdir()} == whole  # byte for byte
    assert "multiple of --batch-size" not in caplog.text
    for n in range(6):
        batch = json.loads(whole[f"batch-{n}.json"])
        assert [f["feature_index"] for f in batch["features"]] == list(range(16 * n, 16 * n + 16))
    # a piece that starts or stops inside a batch writes only part of it, and says so
    partial = export_neuronpedia(store, HOOK, tmp_path / "partial", range(10, 20), batch_size=8, logits=False)
    assert [p.name for p in partial] == ["batch-1.json", "batch-2.json"]
    assert [[f["feature_index"] for f in json.loads(p.read_text())["features"]] for p in partial] == \
        [list(range(10, 16)), list(range(16, 20))]
    assert "--features 10:20: batch-1.json and batch-2.json hold only part of a batch of 8 features" in caplog.text


def test_a_folder_with_another_saes_batches_is_refused_before_any_work(store, tmp_path):
    """The converter reads a folder as one SAE: another SAE's export there would be imported as this one's."""
    out = tmp_path / "np"
    export_neuronpedia(store, HOOK, out, range(0, 16), batch_size=16, logits=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"holds batch-0\.json of another export \(model_id '.*', layer 0, sae_set "
                                          r"'resid-post', sae_id_suffix None; this one is model_id '.*', layer 1, sae_set "
                                          r"'mlp-out', sae_id_suffix None\)\. Neuronpedia's converter reads a folder"):
        export_neuronpedia(store, "blocks.1.hook_mlp_out", out, batch_size=16, logits=False)
    (out / "batch-7.json").write_text("[1, 2]")  # not ours either
    with pytest.raises(ConfigError, match=r"holds batch-7\.json of another export \(not a batch file of this tool"):
        export_neuronpedia(store, HOOK, out, range(16, 32), batch_size=16, logits=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "batch-7.json"} == before


def test_no_interval_groups_asked_gives_none(store):
    """``n_groups=0`` (only the top examples, or none: the bench's co-firing pass) makes no interval
    groups, while the rest of a feature's numbers stay as with groups."""
    plain = DashboardSettings(group_method="interval", n_cofiring=0)
    none = DashboardSettings(group_method="interval", n_groups=0, n_cofiring=0)
    with_groups = list(DashboardBuilder(store, HOOK, None, plain).build())
    without = list(DashboardBuilder(store, HOOK, None, none).build())
    assert len(with_groups) == len(without) > 0
    for a, b in zip(with_groups, without):
        assert [g.kind for g in b.groups if g.kind != "top"] == []
        assert a.n_fired == 0 or any(g.kind == "interval" for g in a.groups)
        assert (a.feature, a.n_fired, a.max, a.hist_counts) == (b.feature, b.n_fired, b.max, b.hist_counts)
        def top(d):
            return [(e.token_index, e.activation) for g in d.groups if g.kind == "top" for e in g.examples]

        assert top(a) == top(b)


@pytest.fixture(scope="module")
def one_sae_store(assets, ray_cluster, tmp_path_factory) -> FeatureStore:
    from jobs.extract import run_extract

    cfg = config(assets, tmp_path_factory.mktemp("one") / "one.zarr", saes=(str(assets["sae_dirs"][HOOK]),),
                 max_tokens=200)
    run_extract(cfg)
    return FeatureStore.open(cfg.store.path)


def test_without_sae_the_stores_only_sae_is_taken_and_several_are_refused(store, one_sae_store, tmp_path, capsys):
    assert main(["export", "neuronpedia", one_sae_store.location, "--out", str(tmp_path / "np"), "--features", "0:2",
                 "--no-logits", "--no-progress"]) == 0
    batch = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert (batch["layer"], batch["sae_set"], len(batch["features"])) == (0, "resid-post", 2)  # the SAE at HOOK
    assert main(["dashboard", one_sae_store.location, "--out", str(tmp_path / "site"), "--features", "0:2",
                 "--no-logits", "--no-progress"]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    capsys.readouterr()
    for command in (["export", "neuronpedia"], ["dashboard"]):
        assert main([*command, store.location, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"holds {len(store.saes)} SAEs" in err and all(name in err for name in store.saes)
        assert "--sae NAME" in err
        assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_correlated_features_gram_matrix_shows_a_progress_bar(store, tmp_path, capsys):
    export_neuronpedia(store, HOOK, tmp_path / "quiet", range(0, 4), logits=False)
    assert "Gram matrix" not in capsys.readouterr().err
    export_neuronpedia(store, HOOK, tmp_path / "shown", range(0, 4), logits=False, progress=True)
    err = capsys.readouterr().err
    every_token = tqdm.format_sizeof(store.n_tokens)
    assert "correlated features (Gram matrix)" in err and f"{every_token}/{every_token}" in err
