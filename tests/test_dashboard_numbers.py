"""The dashboard builder's vectorised numbers equal numpy's one-feature-at-a-time computations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.dashboard_data import (ApartOrder, histogram_counts, histogram_edges, most_correlated, pearsons_r,
                                     ranked)


def features(rng: np.random.Generator, n_features: int, bfloat16: bool) -> tuple[np.ndarray, ...]:
    """Activations of many features in token order within each, with ties and empty features."""
    n = rng.integers(0, 400, n_features)
    n[::5] = 0
    column = np.repeat(np.arange(n_features), n)
    tokens = np.concatenate([np.sort(rng.choice(200_000, k, replace=False)) for k in n]).astype(np.int32)
    values = rng.gamma(0.5, size=len(column)).astype(np.float32) + np.float32(1e-3)
    if bfloat16:  # the store's values: float32s whose low 16 bits are 0
        values = ((values.view(np.uint32) >> 16) << 16).view(np.float32)
    values[::7] = values[0]  # ties, within and across features
    return column, tokens, values, np.concatenate([[0], np.cumsum(n)])


@pytest.mark.parametrize("bfloat16", [True, False])
def test_ranked_is_highest_first_then_earlier_token(bfloat16):
    column, tokens, values, _ = features(np.random.default_rng(0), 60, bfloat16)
    order = np.lexsort((tokens, -values, column))
    ranked_tokens, ranked_values = ranked(column, tokens, values)
    assert ranked_tokens.tolist() == tokens[order].tolist()
    assert ranked_values.tolist() == values[order].tolist()
    assert ranked_tokens.dtype == np.int64 and ranked_values.dtype == np.float32


def test_histograms_equal_numpys_for_every_feature():
    column, tokens, values, bounds = features(np.random.default_rng(1), 60, True)
    descending = ranked(column, tokens, values)[1]
    n = np.diff(bounds)
    lows = np.array([descending[b - 1] if k else 0 for b, k in zip(bounds[1:], n)], np.float32)
    highs = np.array([descending[a] if k else 0 for a, k in zip(bounds[:-1], n)], np.float32)
    highs[3] = lows[3] = descending[bounds[3]]  # one value repeated: numpy widens the range by 0.5
    descending[bounds[3]:bounds[4]] = highs[3]
    edges = histogram_edges(lows, highs, 50)
    counts = histogram_counts(descending, bounds, edges)
    for f in np.flatnonzero(n):
        x = descending[bounds[f]:bounds[f + 1]].astype(np.float64)  # as the store's queries histogram them
        heights, numpy_edges = np.histogram(x, 50, range=(x.min(), x.max()))
        assert edges[f].tolist() == numpy_edges.tolist()
        assert counts[f].tolist() == heights.tolist()
    assert not counts[n == 0].any()


def sparse_activations(rng: np.random.Generator, n_tokens: int, d: int) -> np.ndarray:
    """Dense [tokens, features] activations where most pairs of features never fire together: a
    few features per token, drawn with skewed odds, values in eighths (sums of products are exact),
    and some features that never fire."""
    dense = np.zeros((n_tokens, d))
    odds = rng.pareto(1.0, d) + 1e-3
    odds[::11] = 0
    for t in range(n_tokens):
        fired = rng.choice(d, rng.integers(0, 4), replace=False, p=odds / odds.sum())
        dense[t, fired] = rng.integers(1, 32, len(fired)) / 8
    return dense


@pytest.mark.parametrize("k", [3, 40, 400])
def test_apart_candidates_are_the_first_of_the_order_the_feature_does_not_cofire_with(k):
    dense = sparse_activations(np.random.default_rng(2), 2000, 120)
    n = len(dense)
    sums, sums_sq = dense.sum(0), (dense ** 2).sum(0)
    apart, fires = ApartOrder.of(sums, sums_sq, n), sums > 0
    assert sorted(apart.order.tolist()) == np.flatnonzero(fires).tolist() and (np.diff(apart.keys) >= 0).all()
    features = np.arange(20, 80)
    cofire = (dense[:, features].T @ dense) > 0
    row, other = np.nonzero(cofire & fires[None, :] & (features[:, None] != np.arange(120)[None, :]))
    got_row, got = apart.candidates(features, row, other, k)
    for i, f in enumerate(features):
        free = [g for g in apart.order if g != f and not cofire[i, g]] if fires[f] else []
        mine = got[got_row == i].tolist()
        assert mine == free[:len(mine)]  # in the order, none skipped
        assert len(mine) >= min(k, len(free))
    assert any(len(got[got_row == i]) < k for i in range(len(features)))  # the order ran out (k=400) or f is dead


@pytest.mark.parametrize("seed", [3, 4])
def test_most_correlated_from_cofiring_and_apart_candidates_is_pearsons_ranking_over_all(seed):
    dense = sparse_activations(np.random.default_rng(seed), 3000, 150)
    n, k = float(len(dense)), 3
    sums, sums_sq, gram = dense.sum(0), (dense ** 2).sum(0), dense.T @ dense
    fires, features = sums > 0, np.arange(150)
    row, other = np.nonzero((gram > 0) & fires[features, None] & fires[None, :] & ~np.eye(150, dtype=bool))
    apart_row, apart = ApartOrder.of(sums, sums_sq, len(dense)).candidates(features, row, other, k)
    assert len(apart) > 0
    got = most_correlated(features, np.concatenate([row, apart_row]), np.concatenate([other, apart]),
                          np.concatenate([gram[row, other], np.zeros(len(apart))]), sums, sums_sq, n, k)
    for x in features:
        if not fires[x]:
            assert got[x].indices == got[x].pearson == []
            continue
        pearson = pearsons_r(n, gram[x], sums[x], sums_sq[x], sums, sums_sq)
        candidates = np.flatnonzero(fires & (features != x))
        best = candidates[np.lexsort((candidates, -pearson[candidates]))][:k]
        assert got[x].indices == best.tolist()
        assert got[x].pearson == pearson[best].tolist()
        assert got[x].cosine == (gram[x, best] / (np.sqrt(sums_sq[x] * sums_sq[best]) + 1e-6)).tolist()
