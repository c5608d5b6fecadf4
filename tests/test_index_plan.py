"""How `latentstore index` cuts each SAE's features into parts (store.index.plan_layout): every
feature in exactly one part, the tasks' shares even when they take the parts longest first, an SAE
re-read by as few parts as that allows, no part past the memory bound, and a resumed index kept in
the parts it was begun with."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import scipy.sparse as sp

from store.index import longest_first_load, plan_layout, plan_parts

MIN_SPLIT = 1 << 20


def sizes(counts: dict[str, np.ndarray], layout: dict) -> dict[str, list[int]]:
    return {name: [int(counts[name][p.start:p.stop].sum()) for p in parts] for name, parts in layout.items()}


def makespan(part_sizes: list[int], n_workers: int) -> int:
    """The entries the busiest task builds when parts go out longest first to the next free task,
    as `latentstore index` hands them out (written out here, beside the planner's own count)."""
    loads = [0] * n_workers
    for size in sorted(part_sizes, reverse=True):
        heapq.heapreplace(loads, loads[0] + size)
    assert longest_first_load([(size,) for size in sorted(part_sizes, reverse=True)], n_workers) == max(loads)
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


def test_unequal_saes_taken_longest_first_stay_within_a_split_of_their_share():
    # cut only at the SAEs' ends, these five pieces taken longest first would give one task 7M of 12M
    counts = {name: np.full(1000, n) for name, n in zip("abcde", (3000, 3000, 2000, 2000, 2000))}
    assert makespan([3_000_000, 3_000_000, 2_000_000, 2_000_000, 2_000_000], 2) == 7_000_000
    rng = np.random.default_rng(1)
    shapes = [(counts, 2)] + [({f"s{i}": rng.integers(0, int(rng.integers(1, 40_000)), int(rng.integers(1, 3000)))
                                for i in range(int(rng.integers(1, 7)))}, int(rng.integers(1, 17))) for _ in range(100)]
    for shape, n_workers in shapes:
        layout = plan_layout(shape, n_workers, MIN_SPLIT)
        check_cover(shape, layout)
        part_sizes = [size for parts in sizes(shape, layout).values() for size in parts]
        share = max(sum(part_sizes) / n_workers, MIN_SPLIT)
        assert makespan(part_sizes, n_workers) <= share + MIN_SPLIT
        assert len(part_sizes) <= len(shape) + 5 * n_workers


def test_a_feature_larger_than_a_share_is_not_chased_with_more_cuts():
    counts = {"a": np.full(2000, 1000), "b": np.full(500, 1000)}
    counts["a"][7] = 30_000_000  # more than a task's share, and no cut divides a feature
    layout = plan_layout(counts, 4, MIN_SPLIT)
    check_cover(counts, layout)
    part_sizes = [size for parts in sizes(counts, layout).values() for size in parts]
    assert makespan(part_sizes, 4) == 30_000_000 + 7_000  # the feature and its part's share of the rest
    assert len(part_sizes) <= 2 + 4 * 4


def test_a_resumed_index_keeps_the_parts_it_was_begun_with(tmp_path):
    from jobs.index import plan
    from store import FeatureStore, index
    from tests.test_store_format import write_synthetic

    m = sp.random(400, 64, density=0.3, format="csr", random_state=0, dtype=np.float32) + 0.0
    write_synthetic(tmp_path / "s.zarr", [m[:200], m[200:]])
    fs = FeatureStore.open(str(tmp_path / "s.zarr"))
    counts, shards = np.bincount(m.indices, minlength=64), fs.attrs["shards"]
    begun, _ = index.begin(fs.location, "h", counts, shards, fs.value_dtype, plan_parts(counts, 3))
    index.build_part(fs.location, "h", begun[1], shards, "<u4")
    # planned afresh it would be one part (its entries are few); resumed, it is the three begun, one done
    assert len(plan_layout({"h": counts}, 2, MIN_SPLIT)["h"]) == 1
    todo, n_parts = plan(fs.location, {"h": counts}, shards, fs.value_dtype, 2)
    assert n_parts == {"h": 3}
    assert sorted(part.part_id for _, part in todo) == [0, 2]
    assert [part for _, part in todo] == sorted((p for p in begun if p.part_id != 1),
                                                key=lambda p: -int(counts[p.start:p.stop].sum()))
