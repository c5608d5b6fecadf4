"""A shard's host side, overlapped with the device: batches arrive in order as the device encodes
them; on a thread pool, each SAE's statistics accumulate batch by batch (in order), while the
device encodes the next batch. On a GPU the sums, histogram and top-K candidates are accumulated
on the device itself (``pipeline.device_stats``), and the pool only keeps the candidates that
arrive. ``finish`` joins the batches into the shard's CSR arrays.

numpy releases the GIL in most of the work done here (sorts, element-wise passes, compression),
so the pool's threads run beside the forward.
The queue is bounded: past ``max_pending`` unfinished batches the device waits for the host.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import torch

from pipeline.device_stats import DeviceStats
from pipeline.encode import SparseBatch, concat_batches, host_copies
from store import stats
from store.format import index_dtype, storage_dtype
from store.writer import SparseActivations


class ShardBuilder:
    def __init__(self, pool: ThreadPoolExecutor, d_sae: dict[str, int], value_dtype: str,
                 top_k: int = stats.DEFAULT_TOP_K, max_pending: int = 8, stats_device: torch.device | None = None):
        self.pool, self.d_sae, self.value_dtype, self.max_pending = pool, d_sae, value_dtype, max_pending
        self.stats = {name: stats.Accumulator(d, value_dtype, top_k) for name, d in d_sae.items()}
        self.on_device = {name: DeviceStats(accumulator, stats_device) for name, accumulator in self.stats.items()} \
            if stats_device is not None else {}
        self.batches: dict[str, list[SparseBatch]] = {name: [] for name in d_sae}
        self._latest: dict[str, Future | None] = {name: None for name in d_sae}
        self._pending: deque[Future] = deque()

    def add(self, encoded: dict[str, SparseBatch]) -> None:
        for name, batch in encoded.items():
            on_host = replace(batch, entries=None)  # the device's copies are not kept
            self.batches[name].append(on_host)
            if name in self.on_device:
                candidates = host_copies(list(self.on_device[name].add(*batch.entries, len(batch.counts))))
                work = self._keep, candidates
            else:
                work = self._accumulate, on_host
            # each SAE's batches are added in order: a task waits for its SAE's previous one, which the
            # pool's FIFO queue has always started already
            self._latest[name] = self.pool.submit(*work, name, self._latest[name])
            self._pending.append(self._latest[name])
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()

    def _accumulate(self, batch: SparseBatch, name: str, before: Future | None) -> None:
        if before is not None:
            before.result()
        batch.wait()
        self.stats[name].add(batch.counts, batch.indices, batch.values)

    def _keep(self, candidates: tuple[list, object], name: str, before: Future | None) -> None:
        (feature, stored, token), copied = candidates
        if before is not None:
            before.result()
        if copied is not None:
            copied.synchronize()
        self.stats[name].keep(feature, stored.view(storage_dtype(self.value_dtype)), token)

    def finish(self, n_tokens: int) -> tuple[dict[str, SparseActivations], dict[str, stats.FeatureStats]]:
        """The shard's activations and statistics, per SAE, once every batch is in."""

        def one(name: str) -> tuple[SparseActivations, stats.FeatureStats]:
            indptr, indices, values = concat_batches(self.batches[name], index_dtype(self.d_sae[name]),
                                                     storage_dtype(self.value_dtype), n_tokens)
            if self._latest[name] is not None:
                self._latest[name].result()
            if name in self.on_device:
                self.stats[name].add_totals(*self.on_device[name].totals())
            return SparseActivations(indptr, indices, values), self.stats[name].result()

        done = {name: self.pool.submit(one, name) for name in self.d_sae}
        results = {name: future.result() for name, future in done.items()}
        self._pending.clear()
        return {h: r[0] for h, r in results.items()}, {h: r[1] for h, r in results.items()}


def pool_size(n_threads: int | None) -> int:
    """Host threads for a worker: its CPU share (at least two, so host work overlaps the device)."""
    return max(2, n_threads or os.cpu_count() or 1)

