"""Every query equals a brute-force computation over fs.csr(hook), with and without the index."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jobs.index import run_index
from store import FeatureStore
from store.errors import ConfigError

pytestmark = pytest.mark.ray
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def stores(reference_store, tmp_path_factory):
    """The session's store with its index, and a copy with none (queries must scan). Its top-K is
    small (7), so queries past it read the index or the shards."""
    plain = tmp_path_factory.mktemp("queries") / "plain.zarr"
    shutil.copytree(reference_store.location, plain)
    shutil.rmtree(plain / "index")
    indexed, plain = FeatureStore.open(reference_store.location), FeatureStore.open(str(plain))
    assert indexed.index(HOOK) is not None and plain.index(HOOK) is None
    assert indexed.run["top_k"] == 7
    return indexed, plain


def brute(fs: FeatureStore, hook: str, feature: int, exclude_special: bool, min_activation: float = 0.0):
    """(tokens, values) of a feature, highest first then earlier token, from the dense CSR column."""
    column = fs.csr(hook)[:, feature].toarray().ravel()
    tokens = np.nonzero(column > min_activation)[0]
    if exclude_special:
        tokens = tokens[~np.isin(fs.token_ids()[tokens], list(fs.special_token_ids))]
    order = np.lexsort((tokens, -column[tokens].astype(np.float64)))
    return tokens[order], column[tokens][order]


def busy_features(fs, hook, n=6):
    return np.argsort(-fs.stats(hook).count, kind="stable")[:n].tolist() + [int(np.argmin(fs.stats(hook).count))]


@pytest.mark.parametrize("which", ["indexed", "plain"])
def test_top_activations_and_feature_activations(stores, which):
    fs = stores[0] if which == "indexed" else stores[1]
    for hook in fs.hooks:
        for feature in busy_features(fs, hook):
            for exclude in (True, False):
                tokens, values = brute(fs, hook, feature, exclude)
                top = fs.top_activations(hook, feature, k=12, exclude_special_tokens=exclude)
                np.testing.assert_array_equal(top["token_index"], tokens[:12])
                np.testing.assert_array_equal(top["activation"], values[:12])
            everything = fs.feature_activations(hook, feature)
            t_all, v_all = brute(fs, hook, feature, False)
            order = np.argsort(t_all)
            np.testing.assert_array_equal(everything["token_index"], t_all[order])
            np.testing.assert_array_equal(everything["activation"], v_all[order])
            prov = fs.provenance()
            np.testing.assert_array_equal(everything["row"], prov["row"].to_numpy()[t_all[order]])
            np.testing.assert_array_equal(everything["pos"], prov["pos"].to_numpy()[t_all[order]])
    tokens, _ = brute(fs, HOOK, busy_features(fs, HOOK)[0], True, min_activation=0.5)
    got = fs.top_activations(HOOK, busy_features(fs, HOOK)[0], k=50, min_activation=0.5)
    np.testing.assert_array_equal(got["token_index"], tokens[:50])


def test_context_marks_the_active_token_within_its_window(stores):
    fs = stores[0]
    top = fs.top_activations(HOOK, busy_features(fs, HOOK)[0], k=5, context=(3, 2))
    ids, rows, pos = fs.token_ids(), fs.provenance()["row"].to_numpy(), fs.provenance()["pos"].to_numpy()
    for _, ex in top.iterrows():
        t = ex["token_index"]
        assert f"«{fs.vocab[ids[t]]}»" in ex["context"]
        left = [fs.vocab[ids[j]] for j in range(max(0, t - 3), t) if rows[j] == rows[t] and pos[j] < pos[t]]
        assert ex["context"].startswith("".join(left))


@pytest.mark.parametrize("method", ["rank", "interval"])
def test_quantile_samples(stores, method):
    fs_indexed, fs_plain = stores
    feature = busy_features(fs_indexed, HOOK)[0]
    a = fs_indexed.quantile_samples(HOOK, feature, n_groups=4, per_group=3, method=method, seed=1)
    b = fs_plain.quantile_samples(HOOK, feature, n_groups=4, per_group=3, method=method, seed=1)
    assert a.drop(columns="context").equals(b.drop(columns="context"))
    tokens, values = brute(fs_indexed, HOOK, feature, True)
    for g, group in a.groupby("group"):
        if method == "rank":
            bounds = np.linspace(0, len(values), 5).round().astype(int)
            members = values[bounds[g]:bounds[g + 1]]
        else:
            edges = np.linspace(values[0], 0, 5)
            lo, hi = edges[g + 1], edges[g]
            members = values[(values <= hi) & ((values > lo) if g < 3 else (values >= lo))]
        assert group["group_size"].iloc[0] == len(members)
        assert group["group_min"].iloc[0] == members.min() and group["group_max"].iloc[0] == members.max()
        assert group["activation"].between(members.min(), members.max()).all()
        assert len(group) == min(3, len(members)) and group["token_index"].is_unique


def test_histogram_density_and_feature_stats(stores):
    fs = stores[0]
    dense = fs.csr(HOOK).toarray().astype(np.float64)
    count = (dense != 0).sum(0)
    np.testing.assert_array_equal(fs.density(HOOK).to_numpy(), count / fs.n_tokens)
    st = fs.feature_stats(HOOK)
    np.testing.assert_array_equal(st["count"], count)
    np.testing.assert_array_equal(st["max"], dense.max(0).astype(np.float32))
    fired = np.maximum(count, 1)
    np.testing.assert_allclose(st["mean"], np.where(count > 0, dense.sum(0) / fired, 0), rtol=1e-12)
    np.testing.assert_allclose(st["mean_all"], dense.sum(0) / fs.n_tokens, rtol=1e-12)
    from pipeline.ablation import mean_activations  # mean ablation's values come from these statistics

    np.testing.assert_allclose(mean_activations(fs, HOOK), dense.mean(0), rtol=1e-6)
    feature = busy_features(fs, HOOK)[0]
    values = dense[:, feature][dense[:, feature] != 0]
    h = fs.histogram(HOOK, feature, bins=10)
    expected, edges = np.histogram(values, bins=np.linspace(0, values.max(), 11))
    np.testing.assert_array_equal(h["count"], expected)
    np.testing.assert_allclose(h["bin_start"], edges[:-1])
    from store.stats import HIST_EDGES

    stored = fs.histogram(HOOK, feature, bins="stored")
    np.testing.assert_array_equal(stored["count"], np.histogram(values, bins=HIST_EDGES)[0])
    assert fs.plot_histogram(HOOK, feature).data[0].y.sum() == len(values)


def test_cofiring_and_prompt_features(stores):
    fs = stores[0]
    m = fs.csr(HOOK)
    binary = (m != 0).astype(np.int64).tocsc()
    feature = busy_features(fs, HOOK)[1]
    mine = np.asarray(binary[:, feature].todense()).ravel().astype(bool)
    mine &= ~np.isin(fs.token_ids(), list(fs.special_token_ids))
    shared = np.asarray(binary[mine].sum(0)).ravel()
    shared[feature] = 0
    got = fs.cofiring(HOOK, feature, k=5)
    expected = np.lexsort((np.arange(len(shared)), -shared))[:5]
    np.testing.assert_array_equal(got["feature"], expected)
    np.testing.assert_array_equal(got["count"], shared[expected])

    row = int(fs.provenance()["row"].iloc[-1])
    pf = fs.prompt_features(row, HOOK, k=3)
    lo = int(np.searchsorted(fs.provenance()["row"], row))
    first = pf[pf["token_index"] == lo]
    dense_row = m[lo].toarray().ravel()
    best = np.lexsort((np.arange(len(dense_row)), -dense_row))[:3]
    np.testing.assert_array_equal(first["feature"], best[dense_row[best] > 0])
    assert fs.plot_activations(row, HOOK, int(best[0])).data[0].y[0] == dense_row[best[0]]


def test_queries_name_bad_arguments(stores):
    fs = stores[0]
    with pytest.raises(ConfigError, match=r"feature 96 is out of range for .*features 0 to 95"):
        fs.top_activations(HOOK, 96)
    with pytest.raises(ConfigError, match=r"has no SAE named 'blocks\.9\.hook_resid_post'"):
        fs.density("blocks.9.hook_resid_post")
    with pytest.raises(ConfigError, match=r"dataset row 9999 is not in the store"):
        fs.prompt_features(9999, HOOK)
    # counts that would allocate without end: refused at once, not after minutes and an out-of-memory kill
    with pytest.raises(ConfigError, match=r"n_groups=1000000000: give at most 10,000 groups"):
        fs.quantile_samples(HOOK, 3, n_groups=10**9)
    with pytest.raises(ConfigError, match=r"bins=1000000000: give at most 1,000,000 bins"):
        fs.histogram(HOOK, 3, bins=10**9)


def test_index_rebuild_resumes_and_equals_a_fresh_transpose(stores, tmp_path):
    fs = stores[0]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(fs.location, copy)
    shutil.rmtree(copy / "index")
    run_index(str(copy), workers=2, min_parts=2, progress=False)  # in two parts per SAE, at least
    # a crash part-way: one part's marker gone, the index not marked complete
    hook_dirs = [d for d in (copy / "index").iterdir() if d.is_dir()]
    untouched = {d: (d / "parts" / "1" / "token" / "zarr.json").stat().st_mtime_ns for d in hook_dirs}
    for hook_dir in hook_dirs:
        shutil.rmtree(hook_dir / "parts" / "0" / "complete")
    run_index(str(copy), workers=2, min_parts=2, progress=False)
    # only the part without a marker was built again
    assert all((d / "parts" / "1" / "token" / "zarr.json").stat().st_mtime_ns == t for d, t in untouched.items())
    assert all((d / "parts" / "0" / "complete").exists() for d in hook_dirs)
    rebuilt = FeatureStore.open(str(copy))
    for hook in fs.hooks:
        csc = fs.csr(hook).tocsc()
        index = rebuilt.index(hook)
        assert index is not None
        for feature in range(fs.d_sae(hook)):
            t, v = index.entries(feature)
            col_t = csc.indices[csc.indptr[feature]:csc.indptr[feature + 1]]
            col_v = csc.data[csc.indptr[feature]:csc.indptr[feature + 1]]
            order = np.lexsort((col_t, -col_v.astype(np.float64)))
            np.testing.assert_array_equal(t, col_t[order])
            np.testing.assert_array_equal(v, col_v[order])
