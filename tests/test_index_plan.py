"""How `latentstore index` cuts each SAE's features into parts (store.index.plan_layout): every
feature in exactly one part, the tasks' shares even, an SAE re-read by as few parts as that allows,
and no part past the memory bound."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from store.index import plan_layout

MIN_SPLIT = 1 << 20


def sizes(counts: dict[str, np.ndarray], layout: dict) -> dict[str, list[int]]:
    return {name: [int(counts[name][p.start:p.stop].sum()) for p in parts] for name, parts in layout.items()}


def makespan(part_sizes: list[int], n_workers: int) -> int:
    """The entries the busiest task builds when parts go out longest first to the next free task,
    as `latentstore index` hands them out."""
    loads = [0] * n_workers
    for size in sorted(part_sizes, reverse=True):
        heapq.heapreplace(loads, loads[0] + size)
    return max(loads)


def check_cover(counts: dict[str, np.ndarray], layout: dict) -> None:
    assert layout.keys() == counts.keys()
    for name, parts in layout.items():
        assert [p.part_id for p in parts] == list(range(len(parts)))
        assert parts[0].start == 0 and parts[-1].stop == len(counts[name])
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.stop > p.start for p in parts)


def test_the_default_shape_is_two_tasks_of_equal_share():
    # the embedded default: 41.3M entries over 2,048 features and 6.4M over 640
    counts = {"a": np.full(2048, 20_177), "b": np.full(640, 10_000)}
    layout = plan_layout(counts, 2, MIN_SPLIT)
    check_cover(counts, layout)
    got = sizes(counts, layout)
    assert [len(got["a"]), len(got["b"])] == [2, 1]  # each part re-reads its SAE's shards: no more than needed
    total = sum(map(sum, got.values()))
    assert makespan(got["a"] + got["b"], 2) <= total / 2 + 20_177  # even, to one feature's entries


@pytest.mark.parametrize("n_saes, n_workers", [(1, 1), (1, 3), (2, 2), (3, 2), (5, 4), (4, 16)])
def test_equal_saes_share_evenly(n_saes, n_workers):
    counts = {f"s{i}": np.full(1000, 10_000) for i in range(n_saes)}
    layout = plan_layout(counts, n_workers, MIN_SPLIT)
    check_cover(counts, layout)
    got = sizes(counts, layout)
    part_sizes = [size for parts in got.values() for size in parts]
    total = n_saes * 10_000_000
    assert makespan(part_sizes, n_workers) <= total / n_workers + 2 * 10_000
    # an SAE is cut at most where a task's share ends, so there are fewer than n_saes + n_workers parts
    assert len(part_sizes) < n_saes + n_workers


def test_small_stores_and_empty_saes_are_not_split():
    counts = {"a": np.full(100, 1000), "b": np.zeros(50, np.int64), "c": np.full(10, 3)}
    layout = plan_layout(counts, 8, MIN_SPLIT)
    check_cover(counts, layout)
    assert {name: len(parts) for name, parts in layout.items()} == {"a": 1, "b": 1, "c": 1}


def test_no_part_passes_the_memory_bound_and_no_sliver_is_cut():
    rng = np.random.default_rng(0)
    counts = {name: rng.integers(0, 40_000, d) for name, d in (("a", 4096), ("b", 700), ("c", 3000))}
    part_nnz = 12_000_000
    for n_workers in (1, 2, 3, 7):
        layout = plan_layout(counts, n_workers, MIN_SPLIT, part_nnz)
        check_cover(counts, layout)
        got = sizes(counts, layout)
        # a part past the bound by a sliver at each end at most (plus the feature it cuts at)
        assert all(size <= part_nnz + 2 * MIN_SPLIT + 40_000 for parts in got.values() for size in parts)
        # a cut nearer than MIN_SPLIT entries to an SAE's end is left out
        assert all(min(parts) >= MIN_SPLIT - 40_000 for parts in got.values() if len(parts) > 1)
        assert makespan([size for parts in got.values() for size in parts], n_workers) <= \
            max(sum(map(sum, got.values())) / n_workers + MIN_SPLIT, max(map(max, got.values())))
