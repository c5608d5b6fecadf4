"""Per-feature statistics equal brute force, and merging pieces equals one pass."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from store import stats


def random_csr(n_tokens: int, d_sae: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n_tokens, d_sae, density=0.15, format="csr", random_state=seed, dtype=np.float32)
    m.data = np.round(rng.exponential(2.0, m.nnz), 1).astype(np.float32)  # rounding makes ties
    m.data[::7] = 2.0 ** rng.integers(-14, 14, len(m.data[::7]))  # values on bin edges and past both ends
    return m


def brute_force(m: sp.csr_matrix, top_k: int) -> dict:
    csc = m.tocsc()
    out = {"count": np.diff(csc.indptr), "sum": [], "sum_sq": [], "max": [], "top": [], "hist": []}
    for f in range(m.shape[1]):
        rows = csc.indices[csc.indptr[f]:csc.indptr[f + 1]]
        vals = csc.data[csc.indptr[f]:csc.indptr[f + 1]].astype(np.float64)
        out["sum"].append(vals.sum())
        out["sum_sq"].append((vals ** 2).sum())
        out["max"].append(vals.max() if len(vals) else 0)
        ranked = sorted(zip(-vals, rows))[:top_k]  # value descending, then earlier token
        out["top"].append([(-v, t) for v, t in ranked])
        out["hist"].append(np.histogram(vals, bins=stats.HIST_EDGES)[0])
    return out


def assert_equal_to_brute_force(got: stats.FeatureStats, m: sp.csr_matrix, top_k: int) -> None:
    ref = brute_force(m, top_k)
    np.testing.assert_array_equal(got.count, ref["count"])
    np.testing.assert_allclose(got.sum, ref["sum"], rtol=1e-12)
    np.testing.assert_allclose(got.sum_sq, ref["sum_sq"], rtol=1e-12)
    np.testing.assert_array_equal(got.max, np.array(ref["max"], np.float32))
    np.testing.assert_array_equal(got.hist, np.array(ref["hist"]))
    for f, top in enumerate(ref["top"]):
        n = len(top)
        np.testing.assert_array_equal(got.top_value[f, :n], [v for v, _ in top])
        np.testing.assert_array_equal(got.top_token[f, :n], [t for _, t in top])
        assert (got.top_token[f, n:] == -1).all() and np.isnan(got.top_value[f, n:]).all()


def test_compute_equals_brute_force():
    m = random_csr(300, 40, seed=0)
    got = stats.compute(m.indptr, m.indices, m.data, 40, top_k=5)
    assert_equal_to_brute_force(got, m, 5)


def test_merging_pieces_equals_one_pass():
    pieces = [random_csr(n, 40, seed=i) for i, n in enumerate([50, 0, 120, 7, 90])]
    whole = sp.vstack(pieces).tocsr()
    parts, offset = [], 0
    for piece in pieces:
        parts.append((stats.compute(piece.indptr, piece.indices, piece.data, 40, top_k=6), offset))
        offset += piece.shape[0]
    assert_equal_to_brute_force(stats.merge(parts), whole, 6)
    # merging in two rounds (as the driver does, a few shards at a time) changes nothing
    first = stats.merge(parts[:2])
    twice = stats.merge([(first, 0), *parts[2:]])
    assert_equal_to_brute_force(twice, whole, 6)


def test_descending_key_orders_floats_of_any_sign():
    values = np.array([3.5, -1.0, 0.0, 1e-30, -1e30, 7.0, 2.0], np.float32)
    order = np.argsort(stats.descending_key(values), kind="stable")
    np.testing.assert_array_equal(values[order], np.sort(values)[::-1])


def stored_csr(n_tokens: int, d_sae: int, value_dtype: str, seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """A random CSR whose values are exactly representable in ``value_dtype``, and those values stored."""
    from store.format import decode_values, storage_dtype

    m = random_csr(n_tokens, d_sae, seed)
    if value_dtype == "bfloat16":
        stored = (m.data.view(np.uint32) >> 16).astype(np.uint16)
    else:
        stored = m.data.astype(storage_dtype(value_dtype))
    m.data = decode_values(stored, value_dtype)
    return m, stored


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float16", "float32"])
def test_accumulated_batches_equal_one_pass(value_dtype):
    m, stored = stored_csr(2000, 30, value_dtype, seed=3)
    acc = stats.Accumulator(30, value_dtype, top_k=4)
    bounds = [0, 0, 1, 300, 301, 1200, 2000]  # batches of 0, 1, 299, 1, 899 and 800 tokens
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo, hi = m.indptr[a], m.indptr[b]
        acc.add(np.diff(m.indptr[a : b + 1]), m.indices[lo:hi], stored[lo:hi])
    got = acc.result()
    assert acc.n_tokens == 2000
    assert_equal_to_brute_force(got, m, 4)
    whole = stats.compute(m.indptr, m.indices, m.data, 30, top_k=4)
    for name in ("count", "max", "top_value", "top_token", "hist"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name))


def test_accumulator_compacts_without_losing_the_top():
    """Many small batches force repeated compaction; the result stays exact."""
    m, stored = stored_csr(3000, 8, "bfloat16", seed=5)
    acc = stats.Accumulator(8, "bfloat16", top_k=3)
    acc._compacted = 0
    for a in range(0, 3000, 7):
        b = min(a + 7, 3000)
        lo, hi = m.indptr[a], m.indptr[b]
        acc.add(np.diff(m.indptr[a : b + 1]), m.indices[lo:hi], stored[lo:hi])
        acc._compact()
    assert_equal_to_brute_force(acc.result(), m, 3)


def test_empty_accumulator_equals_empty():
    got = stats.Accumulator(5, "bfloat16", top_k=2).result()
    ref = stats.empty(5, top_k=2)
    for name in ("count", "sum", "max", "top_token", "hist"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("token_base", [0, 1 << 50])  # packed into one key each; too wide to pack
def test_arranging_by_stored_values_equals_sorting_floats(value_dtype, token_base):
    """Grouped by feature, highest decoded value first, earlier token first on ties, whatever the
    entries' order on input and however they come in pieces: the same arrangement whether the entries
    pack into 64-bit keys or not."""
    from store.format import decode_values, storage_dtype

    rng = np.random.default_rng(7)
    values = np.round(rng.normal(0, 3, 20_000), 1).astype(np.float32)  # both signs, many ties
    values[values == 0] = 0.5
    stored = ((values.view(np.uint32) >> 16).astype(np.uint16) if value_dtype == "bfloat16"
              else values.astype(storage_dtype(value_dtype)))
    tokens = rng.permutation(len(values)).astype(np.int64) + token_base  # not in input order
    heavy = np.where(rng.random(len(values)) < 0.2, 1100, rng.integers(1000, 1300, len(values)))
    high = rng.integers(65_000, 1 << 16, len(values)).astype(np.uint16)  # uint16 ids near the top of the range
    for features in (rng.integers(1000, 1300, len(values)), heavy, rng.integers(0, 70_000, len(values)), high):
        expected = np.lexsort((tokens, -decode_values(stored, value_dtype), features))
        cuts = [0, 7, 7, 5000, len(values)]  # pieces, one of them empty
        got_features, got_stored, got_tokens = stats.arrange_by_feature_then_value(
            [(features[a:b], stored[a:b], tokens[a:b]) for a, b in zip(cuts, cuts[1:])])
        np.testing.assert_array_equal(got_tokens, tokens[expected])
        np.testing.assert_array_equal(got_features, features[expected])
        np.testing.assert_array_equal(got_stored, stored[expected])
        assert (got_features.dtype, got_stored.dtype, got_tokens.dtype) == (features.dtype, stored.dtype, tokens.dtype)


def test_arranging_nothing_keeps_the_dtypes():
    empty = (np.zeros(0, np.uint16), np.zeros(0, np.float16), np.zeros(0, np.uint32))
    got = stats.arrange_by_feature_then_value([empty, empty])
    assert [(len(a), a.dtype) for a in got] == [(0, np.uint16), (0, np.float16), (0, np.uint32)]
