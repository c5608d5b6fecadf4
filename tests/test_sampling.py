"""The example groups: slices equal their definitions, and the draws are uniform samples without replacement."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from store.errors import ConfigError
from store.sampling import draw_ranks, group_slices


def test_interval_slices_are_saedashboards_intervals_and_rank_slices_equal_counts():
    values = np.sort(np.random.default_rng(0).gamma(0.5, size=997).astype(np.float32))[::-1]
    values[10:20] = values[10]  # ties, compared as the intervals' masks compare them
    edges = np.linspace(float(values[0]), 0, 8)
    for g, (a, b) in enumerate(group_slices(values, 7, "interval")):
        hi, lo = edges[g], edges[g + 1]
        inside = (values <= hi) & ((values > lo) if g < 6 else (values >= lo))
        assert np.flatnonzero(inside).tolist() == list(range(a, b))
    slices = group_slices(values, 7, "rank")
    assert [b - a for a, b in slices] == np.diff(np.linspace(0, 997, 8).round().astype(int)).tolist()
    assert group_slices(values[:0], 7, "rank") == []
    with pytest.raises(ConfigError, match="'median' is not 'rank' or 'interval'"):
        group_slices(values, 7, "median")


def test_draws_are_distinct_ascending_inside_their_slice_and_all_of_a_small_one():
    slices = [(0, 3), (3, 3), (3, 103), (103, 109), (109, 5000)]
    drawn = draw_ranks(slices, 5, seed=7)
    assert drawn[0].tolist() == [0, 1, 2] and drawn[1].tolist() == []
    for (a, b), ranks in zip(slices[2:], drawn[2:]):
        assert len(ranks) == 5 and len(set(ranks.tolist())) == 5
        assert (np.diff(ranks) > 0).all() and a <= ranks[0] and ranks[-1] < b
    again = draw_ranks(slices, 5, seed=7)
    assert all((x == y).all() for x, y in zip(drawn, again))  # a seed gives the same examples
    assert not all((x == y).all() for x, y in zip(drawn, draw_ranks(slices, 5, seed=8)))


def test_every_subset_is_equally_likely():
    # 3 of 6: 20 subsets; 20,000 seeded draws give each about 1,000 (sd 31)
    counts = Counter(tuple(draw_ranks([(10, 16)], 3, seed)[0].tolist()) for seed in range(20_000))
    assert set(counts) == {tuple(c) for c in itertools.combinations(range(10, 16), 3)}
    assert min(counts.values()) > 880 and max(counts.values()) < 1_120
    # and each rank of a larger slice is drawn equally often: 5 of 40, expected 1/8 each
    hits = np.bincount(np.concatenate([draw_ranks([(0, 40)], 5, seed)[0] for seed in range(4_000)]), minlength=40)
    assert hits.min() > 500 * 0.85 and hits.max() < 500 * 1.15
