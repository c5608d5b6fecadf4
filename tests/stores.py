"""Extraction configs and stores that many test modules share.

Each extraction starts Ray actors that import torch, TransformerLens and sae_lens, which costs
more than the extraction of a test dataset itself; so one complete store serves every test that
only reads a store (tests that damage one work on a copy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs.extract import ExtractConfig, run_extract
from pipeline.dataset import DatasetSpec
from store import FeatureStore


def config(assets, store, **changes) -> ExtractConfig:
    """The test extraction: every SAE of ``assets`` over its jsonl, small windows and shards.
    ``changes``: settings by their short names (``ExtractConfig.build``'s)."""
    base = dict(
        model=str(assets["model_dir"]),
        saes=tuple(str(d) for d in assets["sae_dirs"].values()),
        dataset=DatasetSpec(str(assets["jsonl"])),
        store=str(store),
        context_size=16,
        batch_size=4,
        shard_tokens=384,
        workers=1,
        top_k=7,  # small, so that queries past a feature's top-K read the index or scan the shards
        progress=False,
    )
    return ExtractConfig.build(**{**base, **changes})


def shared_store(assets, tmp_path_factory) -> FeatureStore:
    """One uninterrupted single-worker run of ``config``, with its index, made once per session.
    Treat it as read-only: copy it before changing anything."""
    path = Path(tmp_path_factory.getbasetemp()) / "shared.zarr"
    if not (path / "zarr.json").exists() or not FeatureStore.open(str(path)).complete:
        run_extract(config(assets, path))
    return FeatureStore.open(str(path))


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.n_tokens == b.n_tokens
    assert a.run == b.run
    np.testing.assert_array_equal(a.token_ids(), b.token_ids())
    assert a.provenance().equals(b.provenance())
    for name in a.saes:
        x, y = a.csr(name), b.csr(name)
        np.testing.assert_array_equal(x.indptr, y.indptr)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.data, y.data)


def assert_prefix_of(fs: FeatureStore, reference: FeatureStore) -> None:
    """``fs`` holds the first of ``reference``'s tokens (the same rows and windows) and its activations."""
    n = fs.n_tokens
    assert 0 < n < reference.n_tokens
    np.testing.assert_array_equal(fs.token_ids(), reference.token_ids(0, n))
    assert fs.provenance().equals(reference.provenance(0, n))
    for name in fs.saes:
        assert (fs.csr(name) != reference.csr(name, 0, n)).nnz == 0
