"""Extraction speed and size, side by side in one run.

Three ways over the same windows, the same model and SAEs:

- bare limit: the forward to the deepest hook plus each SAE's ``encode``, storing nothing;
- latentstore: ``ExtractWorker.run_shard`` (the code a Ray actor runs): tokenize, window,
  encode, keep nonzeros, write compressed shards to a zarr store;
- dense cache (how people do it now): ``run_with_cache_with_saes`` and ``torch.save`` of each
  batch's dense ``hook_sae_acts_post``.

It prints tokens per second of each, the ratio latentstore / bare (goal: at least 0.85 on CPU),
bytes per stored nonzero (goal: at most 3.0 with bfloat16 values) and the dense cache's time and
bytes against ours. Timings alternate between the ways and report medians, since these machines
are noisy. Run:  python -m bench.extract  [--synthetic gpt2-small] [--tokens N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.dataset import DatasetSpec, plan_shards
from pipeline.models import load_model, save_model, stop_layer
from pipeline.saes import SAESource, load_sae
from pipeline.worker import ExtractJob, ExtractWorker
from store.writer import StoreWriter

SYNTHETIC = {
    # GPT-2 small's shape, random weights: for GPU runs without the hub.
    "gpt2-small": dict(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_vocab=50257, d_mlp=3072),
    "tiny": dict(n_layers=4, d_model=256, n_ctx=256, d_head=32, n_heads=8, d_vocab=4096, d_mlp=1024),
}


def synthetic_assets(name: str, root: Path, d_sae: int, k: int) -> tuple[str, list[str], str]:
    """A model built from a config, two TopK SAEs of controlled sparsity, and a token dataset."""
    import datasets
    from sae_lens import HookedSAETransformer, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    shape = SYNTHETIC[name]
    cfg = HookedTransformerConfig(act_fn="gelu", normalization_type="LN", **shape)
    model = HookedSAETransformer(cfg)
    save_model(model, root / "model")
    layers = (shape["n_layers"] // 2, shape["n_layers"] * 3 // 4)
    saes = []
    for layer in layers:
        hook = f"blocks.{layer}.hook_resid_pre"
        sae = TopKSAE(TopKSAEConfig(d_in=shape["d_model"], d_sae=d_sae, k=k,
                                    metadata=SAEMetadata(hook_name=hook, prepend_bos=False)))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.05)
        sae.save_model(root / f"sae{layer}")
        saes.append(str(root / f"sae{layer}"))
    rows = torch.randint(0, shape["d_vocab"], (4096, 512)).tolist()
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(str(root / "data"))
    return str(root / "model"), saes, str(root / "data")


def default_assets() -> tuple[str, list[str], str]:
    from pipeline import default

    return str(default.MODEL_DIR), [str(p) for p in default.default_sae_dirs()], str(default.TRAIN_CORPUS)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="a random model of this shape instead of "
                        "the embedded default")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens per measured pass")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=16384, help="synthetic SAEs' width")
    parser.add_argument("--k", type=int, default=50, help="synthetic SAEs' active features per token")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        if args.synthetic:
            model_dir, sae_dirs, data = synthetic_assets(args.synthetic, work, args.d_sae, args.k)
            spec = DatasetSpec(data, tokens_column="ids")
        else:
            model_dir, sae_dirs, data = default_assets()
            spec = DatasetSpec(data)
        run(args, work, model_dir, sae_dirs, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, model_dir: str, sae_dirs: list[str], spec: DatasetSpec) -> None:
    store = work / "bench.zarr"
    job = ExtractJob(model=model_dir, saes=tuple(sae_dirs), dataset=spec, store=str(store),
                     context_size=args.context_size, batch_size=args.batch_size,
                     prepend_bos=spec.tokens_column is None, value_dtype="bfloat16", device=args.device,
                     n_threads=os.cpu_count())
    worker = ExtractWorker(job)
    device = worker.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # The shards that hold the first --tokens tokens, and their windows for the other two ways.
    shards, windows, n_tokens = [], [], 0
    for shard in plan_shards(len(worker.dataset), args.shard_rows):
        w = worker.windows(shard)
        shards.append(shard)
        windows.append(w)
        n_tokens += w.n_tokens
        if n_tokens >= args.tokens:
            break
    batches = [
        (torch.from_numpy(w.tokens[i : i + args.batch_size, : int(w.lengths[i : i + args.batch_size].max())]),
         w.lengths[i : i + args.batch_size])
        for w in windows for i in range(0, len(w.lengths), args.batch_size)
    ]
    model = load_model(model_dir, device)
    saes = [load_sae(SAESource.parse(d), device=str(device)) for d in sae_dirs]
    hooks = [s.cfg.metadata.hook_name for s in saes]
    stop = stop_layer(hooks)

    @torch.inference_mode()
    def bare() -> None:
        for tokens, _ in batches:
            _, cache = model.run_with_cache(tokens.to(device), names_filter=hooks, stop_at_layer=stop)
            for sae, hook in zip(saes, hooks):
                sae.encode(cache[hook])
        sync()

    def ours() -> None:
        for shard in shards:
            worker.run_shard(shard)
        sync()

    dense_dir = work / "dense"

    @torch.inference_mode()
    def dense() -> None:
        shutil.rmtree(dense_dir, ignore_errors=True)
        dense_dir.mkdir()
        for i, (tokens, lengths) in enumerate(batches):
            _, cache = model.run_with_cache_with_saes(tokens.to(device), saes=saes, use_error_term=True,
                                                      names_filter=[f"{h}.hook_sae_acts_post" for h in hooks])
            torch.save({h: cache[f"{h}.hook_sae_acts_post"].cpu() for h in hooks}, dense_dir / f"batch{i}.pt")
        sync()

    StoreWriter(str(store)).begin({"bench": True}, {}, overwrite=True)
    ways = {"bare limit": bare, "latentstore": ours, "dense cache": dense}
    times: dict[str, list[float]] = {name: [] for name in ways}
    bare()  # warm up kernels and caches once
    for _ in range(args.repeats):
        for name, fn in ways.items():
            if name == "latentstore":
                for shard in shards:
                    StoreWriter(str(store)).delete_shard(shard.shard_id)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    nnz = sum(sum(m["nnz"].values()) for m in StoreWriter(str(store)).completed_shards().values())
    store_bytes, dense_bytes = dir_bytes(store), dir_bytes(dense_dir)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, {n_tokens:,} tokens, {len(saes)} SAEs (d_sae {saes[0].cfg.d_sae}), "
          f"mean L0 {nnz / n_tokens / len(saes):.1f}, median of {args.repeats}")
    print(f"{'way':<14}{'seconds':>10}{'tokens/s':>12}{'bytes':>16}")
    for name in ways:
        size = {"latentstore": store_bytes, "dense cache": dense_bytes}.get(name)
        print(f"{name:<14}{median[name]:>10.2f}{n_tokens / median[name]:>12,.0f}{(f'{size:,}' if size else '-'):>16}")
    print(f"latentstore / bare limit, tokens per second: {median['bare limit'] / median['latentstore']:.3f}  (goal >= 0.85)")
    print(f"bytes per stored nonzero (all arrays, bfloat16 values): {store_bytes / nnz:.3f}  (goal <= 3.0)")
    print(f"dense cache / latentstore: time {median['dense cache'] / median['latentstore']:.2f}x, "
          f"bytes {dense_bytes / store_bytes:.1f}x")


if __name__ == "__main__":
    main()
