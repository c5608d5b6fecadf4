"""`latentstore export delphi`: delphi's latent cache, loaded by delphi's own LatentDataset, holds every
stored activation at its window and position, and each latent's examples and maximum are the store's.

delphi (PyPI eai-delphi) requires vllm, which its latent loader never imports; .ci/run installs it with
--no-deps and then the few packages the loader does import (docs/DASHBOARDS.md says how)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.cli import main
from jobs.export_delphi import export_delphi, token_windows
from store import FeatureStore
from store.errors import ConfigError
from tests.stores import shared_store

pytestmark = pytest.mark.ray
HOOK = "blocks.0.hook_resid_post"
NO_DELPHI = ("delphi's latent loader is not installed. eai-delphi requires vllm (CUDA, several GB), which its loader "
             "never imports, so it cannot be a pip extra: pip install --no-deps eai-delphi==0.1.3 "
             "sentence-transformers && pip install asyncer orjson faiss-cpu scikit-learn blobfile simple_parsing fire")


@pytest.fixture(scope="module")
def store(assets, ray_cluster, tmp_path_factory) -> FeatureStore:
    return shared_store(assets, tmp_path_factory)


@pytest.fixture(scope="module")
def cache(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("delphi")
    written = export_delphi(store, out, [HOOK], n_splits=3)
    return out, written[HOOK]


def stored_entries(fs: FeatureStore, hook: str) -> set[tuple[int, int, float]]:
    """(token index, feature, value as float16) of every stored activation."""
    m = fs.csr(hook).tocoo()
    return set(zip(m.row.tolist(), m.col.tolist(), m.data.astype(np.float16).astype(np.float32).tolist()))


def test_split_files_hold_every_activation_at_its_window_and_position(store, cache):
    from safetensors.numpy import load_file

    out, paths = cache
    assert [p.name for p in paths] == sorted((p.name for p in paths), key=lambda n: int(n.split("_")[0]))
    edges = [tuple(int(x) for x in p.stem.split("_")) for p in paths]
    assert edges[0][0] == 0 and edges[-1][1] == store.d_sae(HOOK) - 1 and len(edges) >= 3
    assert all(b[0] == a[1] + 1 for a, b in zip(edges, edges[1:]))  # contiguous, last latent inclusive
    tokens, windows, positions = token_windows(store)
    start_of = {w: t for t, w in reversed(list(enumerate(windows.tolist())))}  # each window's first token
    found = set()
    for (first, _), path in zip(edges, paths):
        split = load_file(str(path))
        assert split["locations"].dtype == np.uint16 and split["locations"].shape[1] == 3
        assert split["activations"].dtype == np.float16
        np.testing.assert_array_equal(split["tokens"], tokens)
        for (w, p, latent), value in zip(split["locations"].tolist(), split["activations"].tolist()):
            found.add((start_of[w] + p, first + latent, value))
    assert found == stored_entries(store, HOOK)
    # the windows are the store's, padded past a short window's end with the padding token
    assert tokens.shape == (len(set(windows.tolist())), 16)
    np.testing.assert_array_equal(tokens[windows, positions], store.token_ids())
    config = json.loads((out / HOOK / "config.json").read_text())
    assert config["model_name"] == store.run["model"]["name"] and config["cache_ctx_len"] == 16
    assert config["n_splits"] == len(paths) and config["latentstore"]["hook"] == HOOK


def test_delphis_loader_finds_each_latents_examples_and_maximum(store, cache, assets):
    try:
        from delphi.config import ConstructorConfig, SamplerConfig
        from delphi.latents import LatentDataset
    except ImportError:
        pytest.skip(NO_DELPHI)
    out, _ = cache
    dataset = LatentDataset(
        out, SamplerConfig(n_examples_train=1, n_examples_test=0, n_quantiles=1, train_type="top"),
        ConstructorConfig(example_ctx_len=16, min_examples=1, n_non_activating=0),
        tokenizer=assets["tokenizer"], modules=[HOOK])
    tokens, windows, positions = token_windows(store)
    dense = store.csr(HOOK).toarray()
    records = {record.latent.latent_index: record for record in dataset}
    fired = np.flatnonzero((dense != 0).any(0))
    assert sorted(records) == fired.tolist()
    for latent, record in records.items():
        column = dense[:, latent].astype(np.float16)
        assert record.max_activation == float(column.max())
        active = sorted(set(windows[column != 0].tolist()))
        expected = []
        for w in active:
            acts = np.zeros(tokens.shape[1], np.float16)
            acts[positions[windows == w]] = column[windows == w]
            expected.append((tuple(tokens[w].tolist()), tuple(acts.tolist())))
        got = [(tuple(e.tokens.tolist()), tuple(e.activations.tolist())) for e in record.examples]
        assert sorted(got) == sorted(expected)
        maxima = [max(acts) for _, acts in got]
        assert maxima == sorted(maxima, reverse=True)  # highest window first, as delphi samples them


def test_command_line_and_refusals(store, tmp_path, capsys):
    assert main(["export", "delphi", store.location, "--out", str(tmp_path), "--sae", HOOK,
                 "--sae", "blocks.1.hook_mlp_out", "--float32"]) == 0
    out = capsys.readouterr().out
    assert f"split files for {HOOK}" in out and "blocks.1.hook_mlp_out" in out
    assert {p.name for p in tmp_path.iterdir()} == {HOOK, "blocks.1.hook_mlp_out"}
    from safetensors.numpy import load_file

    first = sorted((tmp_path / HOOK).glob("*.safetensors"))[0]
    assert load_file(str(first))["activations"].dtype == np.float32
    # a second export replaces the first's split files (delphi would read both), with other ranges
    export_delphi(store, tmp_path, [HOOK], n_splits=1)
    assert [p.name for p in (tmp_path / HOOK).glob("*.safetensors")] == [f"0_{store.d_sae(HOOK) - 1}.safetensors"]
    foreign = tmp_path / "other"
    (foreign / HOOK).mkdir(parents=True)
    (foreign / HOOK / "0_9.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="did not write"):
        export_delphi(store, foreign, [HOOK])
    assert main(["export", "delphi", store.location, "--out", str(tmp_path), "--sae", "blocks.9.nope"]) == 2
    assert "blocks.0.hook_resid_post" in capsys.readouterr().err
    # more split files than latents: refused before any is written (it had written one file per latent,
    # each with a copy of the tokens, and said nothing)
    d_sae, fresh = store.d_sae(HOOK), tmp_path / "many"
    assert main(["export", "delphi", store.location, "--out", str(fresh), "--sae", HOOK,
                 "--n-splits", str(d_sae + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--n-splits {d_sae + 1:,} is more than the {d_sae:,} latents of SAE {HOOK}" in err
    assert f"Give at most {d_sae:,}" in err and not fresh.exists()
