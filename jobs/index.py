"""`latentstore index`: build the feature-major index of a complete store, as a Ray job.

The work is one call per (SAE, feature range), which scans every shard for its
range and writes its own part: Ray tasks, one per CPU at once, or at the end of
`latentstore extract`, its warm actors. Parts with a completion marker are
skipped, so a rerun after a crash does only what is missing.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from store import FeatureStore, index as index_mod
from store.errors import ConfigError
from store.format import check_writes
from store.lease import hold_lease

log = logging.getLogger(__name__)
MIN_SPLIT_NNZ = 1 << 20  # entries below which an index part is not split off to use more CPUs


def run_index(location: str, workers: int | None = None, address: str | None = None,
              part_nnz: int = index_mod.DEFAULT_PART_NNZ, progress: bool = True,
              min_parts: int | None = None, builders: tuple[list, int] | None = None) -> dict[str, int]:
    """Build (or finish) every SAE's index, holding the store's writer lease, in ``workers`` tasks at
    once (default: one per CPU). Returns the number of parts per SAE (by name). ``min_parts`` splits
    every SAE into that many parts at least, however few its entries (for tests of several parts).
    ``builders``: remote callables with ``build_part``'s arguments and the parts each builds at once,
    in place of the tasks (the extraction's warm actors' ``build_index_part``, at its end)."""
    from jobs import pool
    from jobs.ray_session import connect, in_worker

    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give how many tasks build parts at once, at least 1 (default: one "
                          "per CPU).")
    FeatureStore.open(location)  # says what is wrong with a path that holds no store, which the lease cannot
    with hold_lease(location, "latentstore index") as lease:  # re-entrant: `latentstore extract` holds it already
        fs = FeatureStore.open(location)  # again, as the lease holder sees it
        check_writes(fs.attrs, fs.location)  # before Ray starts: a store of an older major is read-only
        fs.require_complete(then="index it")
        ray = connect(address, workers or 1)
        shards = fs.attrs["shards"]
        token_dtype = "<u4" if fs.n_tokens < 2**32 else "<u8"
        if builders is None:
            # Tasks: each part is one call of build_part, one per CPU at once (the driver only waits),
            # retried where a worker died.
            n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            builders = ([ray.remote(num_cpus=1, max_retries=3)(in_worker(index_mod.build_part))] * n_workers, 1)
        callables, calls = builders
        todo, n_parts = plan(fs.location, {name: fs.stats(name).count for name in fs.saes}, shards,
                             fs.value_dtype, len(callables) * calls, min_parts, part_nnz)
        policy = pool.Policy(
            label="index", location=fs.location, calls_per_worker=calls,
            submit=lambda build, item: build.remote(fs.location, item[0], item[1], shards, token_dtype),
            describe=lambda item: f"building index part {item[1].part_id} of {item[0]}")
        for _ in pool.run(ray, callables, todo, policy, progress=progress):
            pass
        lease.check()
        for name in fs.saes:
            index_mod.finalize(fs.location, name)
        return n_parts


def plan(location: str, counts: dict[str, np.ndarray], shards: list[dict], value_dtype: str, n_workers: int,
         min_parts: int | None = None, part_nnz: int = index_mod.DEFAULT_PART_NNZ
         ) -> tuple[list[tuple[str, index_mod.Part]], dict[str, int]]:
    """Begin (or reopen) each SAE's index (``counts``: its features' entry counts). Returns the parts
    still to build, the longest first, and each SAE's number of parts (those it was begun with, when
    it resumes). The parts share the entries out evenly over ``n_workers`` (``index.plan_layout``),
    or with ``min_parts``, each SAE is cut into that many parts of equal entries (fewer only if it
    has fewer features)."""
    if min_parts:
        layout = {name: index_mod.plan_parts(c, min_parts, part_nnz) for name, c in counts.items()}
    else:
        layout = index_mod.plan_layout(counts, n_workers, MIN_SPLIT_NNZ, part_nnz)
    todo, n_parts = [], {}
    for name, feature_counts in counts.items():
        parts, done = index_mod.begin(location, name, feature_counts, shards, value_dtype, layout[name])
        n_parts[name] = len(parts)
        todo += [(int(feature_counts[p.start:p.stop].sum()), name, p) for p in parts if p.part_id not in done]
    return [(name, part) for _, name, part in sorted(todo, key=lambda job: -job[0])], n_parts


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "index", help="build the feature-major index of a store",
        description="Write, for every SAE, its activations ordered by feature, highest first, so that one "
                    "feature's examples are a short read. `latentstore extract` does this at the end unless "
                    "--no-index. Rerun after a crash: finished parts are kept.",
    )
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--workers", type=int,
                        help="parallel tasks, among which the parts share the entries out evenly (default: one "
                             "per CPU of the cluster)")
    parser.add_argument("--address", help="a Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> None:
    parts = run_index(args.store, workers=args.workers, address=args.address, progress=args.progress)
    total = int(np.sum(list(parts.values())))
    print(f"indexed {len(parts)} SAEs in {total} parts: {args.store}")
