"""Statistics accumulated in torch on the encoding device (as on a GPU; here on the CPU) equal the
host's accumulation and brute force, and so does the shard they are written with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipeline.encode import SparseBatch
from pipeline.shard_builder import ShardBuilder
from store import stats
from tests.test_stats import assert_equal_to_brute_force, stored_csr

BOUNDS = [0, 0, 1, 300, 301, 1200, 1207, 2000]  # batches of 0, 1, 299, 1, 899, 7 and 793 tokens


def batches(m, stored: np.ndarray) -> list[SparseBatch]:
    """The CSR's tokens in batches, each with its entries as the encoder leaves them on the device."""
    out = []
    for a, b in zip(BOUNDS[:-1], BOUNDS[1:]):
        lo, hi = m.indptr[a], m.indptr[b]
        counts = np.diff(m.indptr[a : b + 1])
        token = torch.from_numpy(np.repeat(np.arange(b - a), counts))
        on_device = stored[lo:hi].view(np.int16) if stored.dtype.itemsize == 2 else stored[lo:hi]
        entries = (token, torch.from_numpy(m.indices[lo:hi].astype(np.int64)), torch.from_numpy(on_device.copy()))
        out.append(SparseBatch(counts, m.indices[lo:hi].astype(np.uint16), stored[lo:hi], entries=entries))
    return out


def build(m, stored: np.ndarray, value_dtype: str, stats_device) -> tuple:
    with ThreadPoolExecutor(2) as pool:
        builder = ShardBuilder(pool, {"h": m.shape[1]}, value_dtype, top_k=4, stats_device=stats_device)
        for batch in batches(m, stored):
            builder.add({"h": batch})
        acts, feature_stats = builder.finish(m.shape[0])
    return acts["h"], feature_stats["h"]


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float16", "float32"])
def test_device_statistics_equal_the_hosts(value_dtype, monkeypatch):
    m, stored = stored_csr(2000, 30, value_dtype, seed=11)
    on_device_acts, on_device = build(m, stored, value_dtype, torch.device("cpu"))
    on_host_acts, on_host = build(m, stored, value_dtype, None)
    assert_equal_to_brute_force(on_device, m, 4)
    for name in ("count", "max", "top_value", "top_token", "hist"):
        np.testing.assert_array_equal(getattr(on_device, name), getattr(on_host, name), err_msg=name)
    np.testing.assert_allclose(on_device.sum, on_host.sum, rtol=1e-12)
    np.testing.assert_allclose(on_device.sum_sq, on_host.sum_sq, rtol=1e-12)
    for name in ("indptr", "indices", "values"):  # the shard's own arrays are the same either way
        np.testing.assert_array_equal(getattr(on_device_acts, name), getattr(on_host_acts, name))


def test_device_pruning_follows_the_hosts_compaction(monkeypatch):
    """With compaction after every few candidates, the device prunes by the K-th values the host
    keeps raising while batches come; what it drops could never reach a top-K list."""
    monkeypatch.setattr(stats, "COMPACT_AT", 8)
    m, stored = stored_csr(2000, 6, "bfloat16", seed=12)
    kept = []
    original = stats.Accumulator.keep

    def counting(self, features, stored_values, tokens):
        kept.append(len(features))
        original(self, features, stored_values, tokens)

    monkeypatch.setattr(stats.Accumulator, "keep", counting)
    _, on_device = build(m, stored, "bfloat16", torch.device("cpu"))
    assert_equal_to_brute_force(on_device, m, 4)
    assert 0 < sum(kept[2:]) < m.indptr[BOUNDS[-1]] - m.indptr[BOUNDS[2]]  # later batches were pruned
