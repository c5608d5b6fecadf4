"""The example groups: slices equal their definitions, and the draws are uniform samples without replacement."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from store.errors import ConfigError
from store.sampling import count_leading, draw_ranks, group_slices, linspace_rows, many_group_slices


def draw(first, past, per_group, seed, feature=0):
    first, past = np.asarray(first), np.asarray(past)
    flat = draw_ranks(first, past, per_group, seed, np.full(len(first), feature), np.arange(len(first)))
    return np.split(flat, np.cumsum(np.minimum(past - first, per_group))[:-1])


def test_interval_slices_are_saedashboards_intervals_and_rank_slices_equal_counts():
    values = np.sort(np.random.default_rng(0).gamma(0.5, size=997).astype(np.float32))[::-1]
    values[10:20] = values[10]  # ties, compared as the intervals' masks compare them
    edges = np.linspace(float(values[0]), 0, 8)
    for g, (a, b) in enumerate(zip(*group_slices(values, 7, "interval"))):
        hi, lo = edges[g], edges[g + 1]
        inside = (values <= hi) & ((values > lo) if g < 6 else (values >= lo))
        assert np.flatnonzero(inside).tolist() == list(range(a, b))
    first, past = group_slices(values, 7, "rank")
    assert (past - first).tolist() == np.diff(np.linspace(0, 997, 8).round().astype(int)).tolist()
    assert len(group_slices(values[:0], 7, "rank")[0]) == 0
    with pytest.raises(ConfigError, match="'median' is not 'rank' or 'interval'"):
        group_slices(values, 7, "median")


@pytest.mark.parametrize("method", ["interval", "rank"])
def test_many_features_slice_as_each_alone(method):
    rng = np.random.default_rng(3)
    ranked = [np.sort(rng.gamma(0.5, size=n).astype(np.float32))[::-1] for n in (0, 1, 5, 997, 0, 40)]
    ranked[3][100:130] = ranked[3][100]
    bounds = np.cumsum([0] + [len(v) for v in ranked])
    first, past = many_group_slices(np.concatenate(ranked), bounds, 7, method)
    for v, f, p in zip(ranked, first, past):
        alone = group_slices(v, 7, method)
        assert (f.tolist(), p.tolist()) == ((alone[0].tolist(), alone[1].tolist()) if len(v) else ([0] * 7, [0] * 7))
    assert many_group_slices(np.concatenate(ranked), bounds, 0, method)[0].shape == (6, 0)


def test_bisection_and_linspace_equal_numpys():
    rng = np.random.default_rng(4)
    descending = np.sort(rng.integers(0, 50, 3_000).astype(np.float32))[::-1]
    first, past = np.sort(rng.integers(0, 3_000, (2, 500)), axis=0)
    thresholds = rng.integers(-2, 52, 500).astype(np.float64)
    for strict, side in ((True, "left"), (False, "right")):
        expected = [np.searchsorted(-descending[a:b], -t, side=side) for a, b, t in zip(first, past, thresholds)]
        assert count_leading(descending, first, past, thresholds, strict).tolist() == expected
    starts, stops = rng.normal(size=(2, 50))
    assert all(row.tolist() == np.linspace(a, b, 11).tolist()
               for a, b, row in zip(starts, stops, linspace_rows(starts, stops, 11)))


def test_draws_are_distinct_ascending_inside_their_slice_and_all_of_a_small_one():
    first, past = [0, 3, 3, 103, 109], [3, 3, 103, 109, 5000]
    drawn = draw(first, past, 5, seed=7)
    assert drawn[0].tolist() == [0, 1, 2] and drawn[1].tolist() == []
    for a, b, ranks in zip(first[2:], past[2:], drawn[2:]):
        assert len(ranks) == 5 and len(set(ranks.tolist())) == 5
        assert (np.diff(ranks) > 0).all() and a <= ranks[0] and ranks[-1] < b
    # a group's draws depend on (seed, feature, group) only: not on the other slices drawn with it
    alone = draw_ranks(np.array([109]), np.array([5000]), 5, 7, np.array([0]), np.array([4]))
    assert alone.tolist() == drawn[4].tolist()
    assert draw(first, past, 5, seed=8)[4].tolist() != drawn[4].tolist()
    assert draw(first, past, 5, seed=7, feature=1)[4].tolist() != drawn[4].tolist()
    assert all(len(r) == 0 for r in draw(first, past, 0, seed=7))


def test_every_subset_is_equally_likely():
    # 3 of 6: 20 subsets; 20,000 draws (one per feature) give each about 1,000 (sd 31)
    n = 20_000
    flat = draw_ranks(np.full(n, 10), np.full(n, 16), 3, 0, np.arange(n), np.zeros(n, np.int64))
    counts = Counter(map(tuple, flat.reshape(n, 3).tolist()))
    assert set(counts) == {tuple(c) for c in itertools.combinations(range(10, 16), 3)}
    assert min(counts.values()) > 880 and max(counts.values()) < 1_120
    # and each rank of a larger slice is drawn equally often: 5 of 40 in 8,000 draws, 1,000 each (sd 30)
    flat = draw_ranks(np.zeros(8_000, np.int64), np.full(8_000, 40), 5, 3, np.zeros(8_000, np.int64), np.arange(8_000))
    hits = np.bincount(flat, minlength=40)
    assert hits.min() > 880 and hits.max() < 1_120
    # the draws of one slice are independent: pairs of ranks come up equally often too (C(40, 2) = 780)
    pairs = Counter((a, b) for row in flat.reshape(-1, 5).tolist() for a, b in itertools.combinations(row, 2))
    assert len(pairs) == 780 and max(pairs.values()) < 3 * 8_000 * 10 / 780
