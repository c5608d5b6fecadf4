"""Query latency and index build time, side by side in one run.

1. A synthetic store of ``--tokens`` tokens (default 5 million) shaped like real SAE activations
   (Zipf feature frequencies, ``--l0`` active features per token, exponential values), written
   through the real shard writer, statistics merge and index job. Then the median latency of
   ``top_activations(k=20)`` over 200 random live features (goal: at most 10 ms on local disk),
   against answering the same query by scanning the token-major shards (goal: at least 100x).
2. On the embedded default model and SAEs: the time ``latentstore extract`` took (without the
   index) against the time the index build took on that store.

Run:  python -m bench.query  [--tokens 5_000_000] [--skip-extract]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from store import FeatureStore
from store import stats as stats_mod
from store.writer import ShardData, SparseActivations, StoreWriter

HOOK = "blocks.6.hook_resid_pre"
SAE = "synthetic"  # the synthetic SAE's name, which keys its data (not its hook)


def synthetic_store(location: str, n_tokens: int, d_sae: int, l0: int, shard_tokens: int, seed: int = 0) -> float:
    """Write a store of SAE-like activations; returns the seconds spent writing shards."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, d_sae + 1) ** 1.1
    p = p[rng.permutation(d_sae)] / p.sum()
    scale = rng.lognormal(0.0, 0.5, d_sae).astype(np.float32)
    writer = StoreWriter(location)
    run = {"model": {"name": "synthetic"}, "dataset": {"name": "synthetic"}, "context_size": 128,
           "prepend_bos": False, "value_dtype": "bfloat16", "top_k": stats_mod.DEFAULT_TOP_K,
           "saes": [{"name": SAE, "hook": HOOK, "d_sae": d_sae, "source": "synthetic", "architecture": "synthetic"}]}
    writer.begin(run, {"n_shards": -(-n_tokens // shard_tokens)}, overwrite=True)
    markers, start = [], time.perf_counter()
    for shard_id, first in enumerate(range(0, n_tokens, shard_tokens)):
        n = min(shard_tokens, n_tokens - first)
        features = np.sort(rng.choice(d_sae, size=(n, l0), p=p), axis=1)
        keep = np.ones_like(features, bool)
        keep[:, 1:] = features[:, 1:] != features[:, :-1]  # a feature fires once per token
        indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
        indices = features[keep].astype(np.uint16)
        values = (rng.exponential(1.0, len(indices)) * scale[indices]).astype(np.float32)
        bits = (values.view(np.uint32) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) >> 16  # round to bf16
        rows = first // 128 + np.arange(n) // 128
        shard = ShardData(shard_id, int(rows[0]), int(rows[-1]) + 1, None,
                          rng.integers(0, 50_000, n).astype(np.int32), rows.astype(np.int64),
                          (np.arange(n) % 128).astype(np.int32),
                          {SAE: SparseActivations(indptr, indices, bits.astype(np.uint16))})
        markers.append(writer.write_shard(shard, "bfloat16", {SAE: d_sae}))
    seconds = time.perf_counter() - start
    merged = stats_mod.merge_shards(location, markers, SAE, d_sae, "bfloat16")
    stats_mod.write_merged(location, SAE, merged, n_tokens)
    keys = ("shard_id", "row_start", "row_stop", "token_limit", "n_tokens", "nnz")
    writer.finalize([{k: m[k] for k in keys} for m in markers], {"n_tokens": n_tokens})
    return seconds


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def query_latency(args, work: Path) -> None:
    from jobs.index import run_index

    location = str(work / "synthetic.zarr")
    write_s = synthetic_store(location, args.tokens, args.d_sae, args.l0, args.shard_tokens)
    index_s = timed(lambda: run_index(location, workers=args.workers, progress=False))
    fs = FeatureStore.open(location)
    nnz = fs.nnz(SAE)
    print(f"synthetic store: {fs.n_tokens:,} tokens, {nnz:,} nonzeros (mean L0 {nnz / fs.n_tokens:.1f}), "
          f"d_sae {args.d_sae}, {len(fs.shards)} shards")
    print(f"  writing shards {write_s:.1f} s, index build {index_s:.1f} s")

    rng = np.random.default_rng(1)
    live = np.nonzero(fs.stats(SAE).count > 0)[0]
    features = rng.choice(live, size=200, replace=False)
    warm = timed(lambda: fs.top_activations(SAE, int(features[0]), k=20))  # loads the token table once
    fast = [timed(lambda f=f: fs.top_activations(SAE, int(f), k=20)) for f in features]
    plain = FeatureStore.open(location)
    plain._indexes[SAE] = None  # the same store read as if it had no index or statistics: a scan

    def scan(feature: int):
        tokens, values = plain._scan_feature(SAE, feature)
        return plain._examples(tokens[:20], values[:20], (8, 4))

    plain._examples(np.zeros(0, np.int64), np.zeros(0, np.float32), (8, 4))  # same warm token table
    slow = [timed(lambda f=f: scan(int(f))) for f in features[: args.scan_samples]]
    same = all(
        np.array_equal(fs.top_activations(SAE, int(f), k=20, exclude_special_tokens=False)["token_index"],
                       scan(int(f))["token_index"])
        for f in features[:2]
    )
    fast_ms, slow_ms = statistics.median(fast) * 1e3, statistics.median(slow) * 1e3
    print(f"top_activations(k=20), median over {len(fast)} random live features: {fast_ms:.2f} ms "
          f"(first query, loading the token table: {warm * 1e3:.0f} ms)  goal <= 10 ms")
    print(f"scanning the token-major shards, median over {len(slow)} features: {slow_ms:.0f} ms")
    print(f"speedup: {slow_ms / fast_ms:.0f}x  (goal >= 100x); same answers: {same}")


def extract_vs_index(args, work: Path) -> None:
    from jobs.extract import ExtractConfig, run_extract
    from jobs.index import run_index
    from pipeline import default
    from pipeline.dataset import DatasetSpec

    cfg = ExtractConfig.build(model=str(default.MODEL_DIR), saes=tuple(str(p) for p in default.default_sae_dirs()),
                              dataset=DatasetSpec(str(default.TRAIN_CORPUS)), store=str(work / "default.zarr"),
                              max_tokens=args.extract_tokens, index=False, workers=1, progress=False)
    extract_s = timed(lambda: run_extract(cfg))
    index_s = timed(lambda: run_index(cfg.store.path, workers=args.workers, progress=False))
    print(f"embedded default, {args.extract_tokens:,} tokens: extraction {extract_s:.1f} s, "
          f"index build {index_s:.1f} s ({index_s / extract_s:.1%} of extraction)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=5_000_000)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=131072)
    parser.add_argument("--scan-samples", type=int, default=5, help="features timed on the slow scan")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extract-tokens", type=int, default=100_000)
    parser.add_argument("--skip-extract", action="store_true", help="only the synthetic store")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    try:
        query_latency(args, work)
        if not args.skip_extract:
            extract_vs_index(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
