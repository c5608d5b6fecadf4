"""A feature's example groups: slices of its activations, and the examples drawn from each.

``FeatureStore.quantile_samples`` and the dashboard builder both call these, so that a
notebook and a dashboard show the same examples for the same seed. Activations are ranked
highest first (ties by earlier token); a group is a run of ranks ``[first, past)``.
"""

from __future__ import annotations

import numpy as np

from store.errors import ConfigError

METHODS = ("rank", "interval")


def group_slices(values: np.ndarray, n_groups: int, method: str) -> list[tuple[int, int]]:
    """The groups of ``values`` (ranked highest first, all above 0) as rank ranges; some may be empty.

    ``rank``: equal-count slices (true quantiles); ``interval``: SAEDashboard's equal-width
    intervals (lo, hi] of [0, max], the last one closed at 0. Group 0 holds the highest."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not 'rank' or 'interval'.")
    n = len(values)
    if not n or not n_groups:
        return []
    if method == "rank":
        bounds = np.linspace(0, n, n_groups + 1).round().astype(int)
        first, past = bounds[:-1], bounds[1:]
    else:
        edges = np.linspace(float(values[0]), 0, n_groups + 1)
        ascending = values[::-1].astype(np.float64)
        first = n - np.searchsorted(ascending, edges[:-1], side="right")  # the first rank with value <= hi
        past = n - np.searchsorted(ascending, edges[1:], side="right")  # the first rank with value <= lo
        past[-1] = n
    return list(zip(first.tolist(), past.tolist()))


def draw_ranks(slices: list[tuple[int, int]], per_group: int, seed: int) -> list[np.ndarray]:
    """``per_group`` ranks from each slice, uniformly without replacement (all of a smaller slice),
    ascending.

    Floyd's algorithm, run for every slice at once: step s picks t uniformly from [0, j] with
    j = size - per_group + s, and takes j instead when t is already taken. Its draws are
    independent of each other, so all are made in one call."""
    sizes = np.array([b - a for a, b in slices], np.int64)
    firsts = np.array([a for a, _ in slices], np.int64)
    k = per_group
    drawn = [np.arange(a, b) for a, b in slices]  # a slice of at most per_group ranks gives them all
    big = np.flatnonzero(sizes > k)
    if len(big):
        j = sizes[big, None] - k + np.arange(k)[None, :]
        t = np.random.default_rng(seed).integers(0, j + 1)
        taken = np.empty_like(t)
        for s in range(k):
            seen = (taken[:, :s] == t[:, s, None]).any(1)
            taken[:, s] = np.where(seen, j[:, s], t[:, s])
        taken = np.sort(taken, axis=1) + firsts[big, None]
        for g, ranks in zip(big.tolist(), taken):
            drawn[g] = ranks
    return drawn
