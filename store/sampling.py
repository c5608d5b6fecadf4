"""A feature's example groups: slices of its activations, and the examples drawn from each.

``FeatureStore.quantile_samples`` and the dashboard builder both call these, so that a
notebook and a dashboard show the same examples for the same seed. Activations are ranked
highest first (ties by earlier token); a group is a run of ranks ``[first, past)``.

The draws are a pure function of (seed, feature, group): each random number is a hash of
those and a counter, not the next number of a generator's stream. So a group's examples do not
depend on which other features or groups were drawn with it, and the dashboard draws a whole
block of features in a few vectorised steps.
"""

from __future__ import annotations

import numpy as np

from store.errors import ConfigError

METHODS = ("rank", "interval")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not 'rank' or 'interval'.")


def group_slices(values: np.ndarray, n_groups: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_groups`` groups of ``values`` (ranked highest first, all above 0) as rank ranges
    ``[first[g], past[g])``; some may be empty. Group 0 holds the highest.

    ``rank``: equal-count slices (true quantiles); ``interval``: SAEDashboard's equal-width
    intervals (lo, hi] of [0, max], the last one closed at 0."""
    if not len(values):
        check_method(method)
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first, past = many_group_slices(values, np.array([0, len(values)]), n_groups, method)
    return first[0], past[0]


def many_group_slices(values: np.ndarray, bounds: np.ndarray, n_groups: int,
                      method: str) -> tuple[np.ndarray, np.ndarray]:
    """``group_slices`` of many features at once: feature ``i``'s ranked values are
    ``values[bounds[i]:bounds[i + 1]]``. Returns ``[features, n_groups]`` arrays of ranks within
    each feature (all 0 for a feature without values)."""
    check_method(method)
    bounds = np.asarray(bounds, np.int64)
    first_of, n = bounds[:-1], np.diff(bounds)
    if method == "rank":
        edges = np.round(linspace_rows(np.zeros(len(n)), n.astype(np.float64), n_groups + 1)).astype(np.int64)
        return edges[:, :-1], edges[:, 1:]
    tops = np.where(n > 0, values[np.minimum(first_of, len(values) - 1)] if len(values) else 0, 0)
    edges = linspace_rows(tops.astype(np.float64), np.zeros(len(n)), n_groups + 1)
    # the ranks above each edge: a group (lo, hi] is the ranks with a value <= hi and > lo
    above = count_leading(values, np.repeat(first_of, n_groups + 1), np.repeat(bounds[1:], n_groups + 1),
                          edges.ravel(), strict=True).reshape(len(n), n_groups + 1)
    first, past = above[:, :-1], above[:, 1:].copy()
    past[:, n_groups - 1:] = n[:, None]  # the last group is closed at 0
    return first, past


def linspace_rows(starts: np.ndarray, stops: np.ndarray, num: int) -> np.ndarray:
    """``np.linspace(starts[i], stops[i], num)`` for every ``i`` at once, ``[len(starts), num]``,
    by numpy's own arithmetic (so with the same rounding)."""
    step = (stops - starts) / max(1, num - 1)
    rows = np.arange(num)[None, :] * step[:, None] + starts[:, None]
    if num > 1:
        rows[:, -1] = stops
    return rows


def count_leading(descending: np.ndarray, first: np.ndarray, past: np.ndarray, thresholds: np.ndarray,
                  strict: bool) -> np.ndarray:
    """For each ``i``: how many values of ``descending[first[i]:past[i]]`` (highest first) are above
    ``thresholds[i]`` (``strict``) or at least it. One bisection for all queries, each step a
    vectorised comparison, as ``np.searchsorted`` would compare them one query at a time."""
    lo, hi = np.array(first, np.int64), np.array(past, np.int64)
    open_ = np.flatnonzero(lo < hi)
    while len(open_):
        mid = (lo[open_] + hi[open_]) // 2
        value, threshold = descending[mid], thresholds[open_]
        above = value > threshold if strict else value >= threshold
        lo[open_] = np.where(above, mid + 1, lo[open_])
        hi[open_] = np.where(above, hi[open_], mid)
        open_ = open_[lo[open_] < hi[open_]]
    return lo - first


def draw_ranks(first: np.ndarray, past: np.ndarray, per_group: int, seed: int, feature: np.ndarray,
               group: np.ndarray) -> np.ndarray:
    """``per_group`` ranks drawn uniformly without replacement from each slice ``[first, past)``
    (all of a smaller one), for many slices at once. Slice ``i`` is group ``group[i]`` of feature
    ``feature[i]``. Returns the ranks, slice after slice, ascending within each.

    Floyd's algorithm, vectorised over the slices: step s picks t uniformly from [0, j] with
    j = size - per_group + s, and takes j instead when t is already taken."""
    first, past = np.asarray(first, np.int64), np.asarray(past, np.int64)
    sizes, k = past - first, per_group
    counts = np.minimum(sizes, k)
    out = np.empty(int(counts.sum()), np.int64)
    starts = np.cumsum(counts) - counts
    small = sizes <= k  # every rank of the slice
    ranks = concatenated_ranges(first[small], past[small])
    out[np.repeat(starts[small] - first[small], sizes[small]) + ranks] = ranks
    big = np.flatnonzero(~small)
    if len(big):
        j = sizes[big, None] - k + np.arange(k)[None, :]
        key = _mix(np.uint64(seed), np.asarray(feature, np.uint64)[big], np.asarray(group, np.uint64)[big])
        u = (_hash(key[:, None] + np.arange(k, dtype=np.uint64)[None, :]) >> np.uint64(11)) * 2.0**-53
        t = np.floor(u * (j + 1)).astype(np.int64)  # uniform on [0, j]; j + 1 is far below 2**53
        taken = np.empty_like(t)
        for s in range(k):
            seen = (taken[:, :s] == t[:, s, None]).any(1)
            taken[:, s] = np.where(seen, j[:, s], t[:, s])
        out[starts[big, None] + np.arange(k)[None, :]] = np.sort(taken, axis=1) + first[big, None]
    return out


def concatenated_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])`` without the loop."""
    lengths = stops - starts
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(int(lengths.sum()))


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: 64 well-mixed bits from each 64-bit integer."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix(seed: np.uint64, feature: np.ndarray, group: np.ndarray) -> np.ndarray:
    """One key per (seed, feature, group), whose successors (key + step) hash independently."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        return _hash(_hash(_hash(seed + golden) + feature * golden) + group * golden) * np.uint64(64)
