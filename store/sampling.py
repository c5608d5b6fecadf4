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
    check_method(method)
    n = len(values)
    if not n or not n_groups:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if method == "rank":
        bounds = np.linspace(0, n, n_groups + 1).round().astype(np.int64)
        return bounds[:-1], bounds[1:]
    edges = np.linspace(float(values[0]), 0, n_groups + 1)
    negated = -values.astype(np.float64)  # ascending; rank r has value > x exactly when -value < -x
    first = np.searchsorted(negated, -edges[:-1], side="left")  # the first rank with value <= hi
    past = np.searchsorted(negated, -edges[1:], side="left")  # the first rank with value <= lo
    past[-1] = n
    return first.astype(np.int64), past.astype(np.int64)


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
