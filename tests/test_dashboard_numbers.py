"""The dashboard builder's vectorised numbers equal numpy's one-feature-at-a-time computations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.dashboard_data import histogram_counts, histogram_edges, ranked


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
