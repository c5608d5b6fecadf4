"""Extraction speed and size, side by side in one run.

Up to four ways over the same windows, the same model and SAEs:

- bare limit: the forward to the deepest hook plus each SAE's ``encode``, storing nothing;
- bare, as run: the same, run as latentstore runs the model on a CPU, where that is faster: one
  stream per core on one torch thread each (``pipeline.encode.encode_streams``; here a model of its
  own each), each SAE encoding the tokens in blocks (``pipeline.encode.block_rows``): the strictest floor;
- latentstore: ``ExtractWorker.run_shard`` (the code a Ray actor runs, two shards at once as the
  actor takes them, with the actor's cores: here all of them): tokenize, window, encode, keep
  nonzeros, accumulate statistics, compress and write the shards;
- dense cache (how people do it now; skip with --no-dense): ``run_with_cache_with_saes`` and
  ``torch.save`` of each batch's dense ``hook_sae_acts_post``.

It prints tokens per second of each and the ratio latentstore / bare (goal: 0.85 on the embedded
default, 0.6 on the fast-device proxy), bytes per stored nonzero (goal: at most 3.0), the host
path alone (statistics, compression, writes of encoded batches) in nonzeros per second on one
thread and on every core (aim: 8 M), the feature-major index build against the extraction it
follows (goal: at most 0.30), and a worker's peak resident memory over the shards (a fresh
process). Timings alternate between the ways and report medians, since these machines are noisy.
Run:  python -m bench.extract  [--synthetic fast-proxy|tiny|gpt2-small] [--tokens N] [--no-dense]

Measured 2026-11-30 on the 2-core CPU machine, quiet, torch on 2 threads (before this work: 0.284
on the default and 0.27 on the proxy, host path 1.2 to 1.4 M/s, a worker at 5.8 GB). The bare
limit's own time varies from run to run here (9.0 to 12.2 s over the same batches), so the ratio
does too; three runs of the final code:

    embedded default, --tokens 200000 (4 shards of 65,536), 2 SAEs of 2,048, mean L0 119:
      latentstore 13,309 to 13,694 tok/s; bare 16,440 to 22,192 tok/s: 0.617, 0.755 and 0.831
      (goal 0.85: missed; the forward already uses both cores, so the host side's 2 CPU-seconds
      come out of it)
      2.152 bytes per nonzero; host path 19.3 to 23.3 M/s on one thread, 21.0 to 26.2 M/s on two
      index build 4.7 to 5.3 s, 0.32 to 0.37 of the extraction (goal 0.30: missed; it was 0.50)
      worker peak 1.46 GiB (its own VmHWM: the 2.22 GiB said before counted the bench's size too)
      earlier, with --shard-tokens 262144 (one shard): 0.835, 2.06 bytes per nonzero
    fast-proxy, --tokens 300000 (1 layer of width 32, TopK 4,096, k 64, 128-token rows):
      bare 28,452 tok/s, latentstore 23,136 tok/s: 0.813 (goal 0.6; 0.685 and 0.760 in earlier runs)
      2.362 bytes per nonzero; host path 12.2 M/s on one thread, 12.5 M/s on two
      index build 2.2 s, 0.17 of the extraction; worker peak 1.12 GiB

Re-measured the same day, quiet, after the index build found each entry's token by one pass over
the shard's pointers, two runs of this code: latentstore over bare 0.717 and 0.700 (bare limit 8.6
and 8.8 s, latentstore 12.0 and 12.6 s: goal missed); 2.104 bytes per nonzero; host path 23.4 and
17.9 M/s on one thread, 25.5 and 19.7 M/s on two; index build 4.58 and 5.01 s, 0.38 and 0.40 of the
extraction (goal missed); worker peak 1.35 GiB. In-process over the same batches, the forward and
encode alone took 8.4 s and with the sparse extraction (nonzero, casts, counts) 9.3 s; a shard's
statistics and write_shard took about 1.0 and 1.1 s of host time for the 47.7M nonzeros. Two
variants, one run each, were tried and not kept, as they made no difference beyond the noise: the
host pool's threads at a lower priority (nice 15: 0.716) and the statistics accumulated in torch on
the CPU as on a GPU (0.705).

Re-measured later the same day, quiet, three runs, after the index build planned its parts across
the SAEs (two tasks sharing the 47.7M entries evenly in three parts, where each SAE had been split
in two), wrote its parts in chunks of 2^18 entries (format 2.1; zarr's per-chunk work had been a
third of the build) and arranged the entries bucket by bucket as it sorted them: index build 3.40,
3.58 and 3.46 s, **0.28, 0.30 and 0.29** of the extraction (goal 0.30: met, narrowly; 3.94 s, 0.33,
before the last of the three changes; 3.46 s, 0.28, once more after each bucket was keyed in cache and
pieces were halved for the longest-first hand-out, with latentstore over bare 0.715 and a worker
peak of 1.47 GiB); latentstore over bare 0.669, 0.722 and 0.743 (goal missed,
as before: the bare limit took 8.1 to 8.8 s, latentstore 11.9 to 12.1 s); bytes per nonzero 2.104;
host path 22.2 to 23.4 M/s on one thread; worker peak 1.48 GiB. Reading and tokenizing a shard
before it takes the device (0.35 s of these 200,000 tokens) made no difference here, where the
forward already uses both cores; on a GPU the device no longer waits for it. Nor did a 0.5 ms GIL
switch interval (0.743, one run). The fast-device proxy, one run of this code (--synthetic fast-proxy
--tokens 300000): bare 29,325 tok/s, latentstore 24,759 tok/s, **0.844** (goal 0.6); 2.362 bytes per
nonzero; host path 13.4 M/s on one thread, 13.7 M/s on two; index build 1.45 s, 0.12 of the extraction.

Found later the same day: `latentstore extract` gave its one CPU worker the machine's cores less one
as torch threads (one, here), while this benchmark runs the worker on all of them (two). So at the
command line the quick start's extraction ran at 10.7k tokens/s (18.8 s), not the 16.4k measured
here: about 0.47 of the bare limit, not 0.72. Workers now run torch on their whole share of the
cores (Ray still keeps one logical CPU for itself): 16.3k tokens/s, 12.6 s at the command line.
There the index step after it took 4.5 s, 0.36 of it (goal 0.30: missed at the command line): its
Ray tasks start fresh worker processes (about 1 s), where this benchmark builds the parts on threads
of this warm process. One run of this benchmark after that change (which does not touch it):
latentstore over bare 0.793 (bare 10.03 s, latentstore 12.65 s; goal 0.85: missed), 2.104 bytes per
nonzero, host path 20.1 M/s on one thread and 24.5 M/s on two, index build 3.22 s, 0.25 of the
extraction, worker peak 1.50 GiB.

Later the same day the command line's index step moved onto the extraction's warm actors (when
they hold every CPU, as by default): after the quick start's extraction (12.0, 12.3 and 12.7 s),
`run_index` took 3.10, 3.62 and 3.22 s, **0.26, 0.29 and 0.25** (goal 0.30: met, narrowly; 4.4 to
4.5 s, 0.36, on fresh tasks). This benchmark, which builds on threads of its own process, is
unchanged by it; one run of it on that code (2026-12-01): latentstore over bare **0.751** (bare 9.39
s, latentstore 12.50 s; goal 0.85 missed), 2.104 bytes per nonzero, host path 21.6 M/s on one thread
and 23.6 M/s on two, index build 3.48 s, 0.28 of the extraction, worker peak 1.52 GiB. The fast-device
proxy, one run the same day (--synthetic fast-proxy --tokens 300000): bare 29,024 tok/s, latentstore
24,096 tok/s, **0.830** (goal 0.6); 2.362 bytes per nonzero; host path 13.6 M/s on one thread, 14.0 M/s
on two; index build 1.46 s, 0.12 of the extraction.

Found 2026-12-01, and not adopted: glibc's malloc maps every allocation above its threshold (at
most 32 MiB) afresh and unmaps it on free, so each batch's [4,096 tokens, 2,048 features] float32
latents (32 MiB) are faulted in page by page: the bare limit took 164k to 399k page faults a pass
(8.3 to 8.7 s, five passes in one process), latentstore 0.6M to 0.9M. Told by ``mallopt`` to keep
freed memory (thresholds of 1 GiB), the same process ran the bare limit in 7.5 to 7.8 s and
latentstore in 10.8 s (a ratio of 0.70: the bare limit gains more), with a few thousand faults. It
is process-wide and grew the heap of a loop of 64 MiB tensors to 750 MB where 290 MB sufficed
without it, so it is left out. Encoding each batch in pieces of 8 MiB of latents (below the
threshold) instead changed latentstore by 2 to 3%, within this machine's noise, so it is left out too.

Measured again 2026-12-01 (later), after a session of hardening that changed nothing on the extraction
path, three runs while other work came and went (the bare limit took 9.00 to 10.93 s): latentstore over
bare **0.663, 0.690 and 0.729** (latentstore 13.0 to 15.0 s; goal 0.85 missed); the code before that
session, run between them, gave 0.726 (bare 9.36 s, latentstore 12.89 s), so the spread is this
machine's, not a change; 2.104 bytes per nonzero; host path 17.2 to 20.3 M/s on one thread, 20.1 to
21.6 M/s on two; index build 3.19 to 4.16 s, 0.23 to 0.31 of the extraction; worker peak 1.46 GiB.
The fast-device proxy, one run the same hour (--synthetic fast-proxy --tokens 300000): bare 28,336
tok/s, latentstore 23,813 tok/s, **0.840** (goal 0.6); 2.362 bytes per nonzero; host path 13.5 M/s on
one thread, 13.4 M/s on two; index build 1.37 s, 0.11 of the extraction.
In-process over the quick start's 52 batches, the sparse extraction (``pipeline.encode.nonzeros``, the
counts and casts) costs about 13 ms per SAE and batch against the encode's 31 ms: ``!= 0`` 2.4 ms,
``nonzero`` 7.2 ms, the gather 2.1 ms. A flat ``nonzero`` with a divmod (14.1 ms), ``to_sparse_csr``
(18.6 ms), numpy's ``flatnonzero`` (11 ms on the mask alone) and ``masked_select`` (86 ms) were all
slower. Both ways keep both cores busy (OpenMP's threads spin: 1.99 cores of CPU time); with
``OMP_WAIT_POLICY=PASSIVE`` the bare limit slowed to 10.3 to 10.8 s and still used 1.75 cores, so no
idle core is left for the host side.

Measured again 2026-12-01 (a third session, of hardening; on the extraction path it changed only that
zarr writes each chunk without first comparing it with the fill value, which had been half the time of
an uncompressed write and a third of an lz4 one in isolation): two runs of the default, --tokens 200000
--no-dense, latentstore over bare **0.783 and 0.645** (bare limit 11.85 and 9.37 s, latentstore 15.15
and 14.53 s; goal 0.85 missed), 2.104 bytes per nonzero, host path 21.0 and 21.8 M/s on one thread
(17.2 to 20.3 before), 24.4 and 26.9 M/s on two, index build 3.44 and 3.11 s, **0.23 and 0.21** of the
extraction (goal 0.30 met), worker peak 1.45 GiB. The fast-device proxy (--synthetic fast-proxy
--tokens 300000), this code and the code before the session alternating: this code 0.746, 0.774 and
0.785 (latentstore 13.47, 14.72, 13.61 s), the code before 0.843 and 0.806 (13.10, 13.82 s): the same
within this machine's noise, goal 0.6 met either way; 2.362 bytes per nonzero; host path 11.6 to 13.4
M/s on one thread; index build 1.74 to 2.00 s, 0.13 to 0.14; worker peak 1.13 GiB. Left out again:
indices under lz4 instead of zstd level 1 (delta and bitshuffle before either) compress 2.5 to 3.6
times faster but take 0.772 bytes per entry against 0.693 (0.08 more per nonzero, about 4% of the
store) for about 1% of the default's extraction time.

Measured 2026-12-01 (a fourth session; nothing on the extraction path changed), one run of the
default, --tokens 200000 --no-dense: latentstore over bare **0.671** (bare limit 8.06 s, latentstore
12.01 s; goal 0.85 missed), 2.104 bytes per nonzero, host path 26.1 M/s on one thread and 26.5 M/s on
two, index build 3.20 s, **0.27** of the extraction (goal 0.30 met), worker peak 1.43 GiB. Where the
3.7 s go, in-process over the same batches, medians of three alternating passes: the bare limit 8.3 to
8.6 s; the encoder alone (forward, encode and the sparse extraction) 9.3 s; with the statistics on the
host pool beside it 9.7 to 10.4 s; whole shards one at a time (adding tokenizing, 0.31 s, and
``write_shard``, 0.88 s, after each shard's forward) 11.0 to 11.6 s; two shards in flight, as the
actor runs them, 11.5 to 12.3 s (the one-at-a-time order was faster in three runs of four, by 3 to 6%,
within this machine's noise, so it is not adopted: on a GPU it would leave the device idle while the
host writes). The statistics, on the host pool, slow the forward beside them by 0.4 to 1.0 s (their
own work is about 0.9 CPU-seconds); numpy's gathers with ``intp``
indices, run on two threads at once, ran at 0.20 to 0.34 of one thread's speed in a test of their own
(most other calls of the statistics ran at 1.3 to 1.8), but that test was noisy at a batch's sizes, so
no change was made from it. No one part is the gap: over the bare limit the sparse extraction adds about 0.7 s,
the statistics' hold-up 0.4 to 1.0 s, tokenizing 0.31 s and the writes 0.88 s; 0.85 needs the four
together under 1.5 s.

Measured 2026-12-02 (a fifth session), after the encoder began to encode and read each SAE's latents
a cache-sized block of tokens at a time on a CPU (``pipeline.encode.block_rows``: 2 MiB of float32
latents, at least 128 tokens), and this benchmark began to time a second floor, the bare limit
encoding in those same blocks. One run each, the default (--tokens 200000 --no-dense): bare limit
9.09 s, bare in blocks 7.75 s, latentstore 13.53 s: latentstore over bare **0.672** (goal 0.85
missed), over the blocked floor 0.573; 2.104 bytes per nonzero; host path 18.8 M/s on one thread,
20.0 M/s on two; index build 4.79 s, **0.35** of the extraction (goal 0.30 missed in this run; 4.20
to 4.88 s, 0.29 to 0.36, over four runs this day, against 3.2 to 3.5 s the day before: the machine
ran slower throughout, the bare limit too); worker peak 1.27 GiB. The code before the blocks,
alternating with it: 0.729 against 0.735, the same within the noise. The fast-device proxy
(--synthetic fast-proxy --tokens 300000), whose TopK SAE of 4,096 features over a 32-wide model
spends its time on 64 MiB latents a batch: bare limit 10.89 s, bare in blocks 6.16 s, latentstore
10.67 s: **1.020** over the bare limit (goal 0.6; the code before the blocks gave 0.750 beside it),
but 0.577 over the blocked floor, which the same blocks make 1.8 times faster than a notebook's
encode; 2.362 bytes per nonzero; host path 9.2 M/s on one thread, 9.1 M/s on two; index build 2.07
s, 0.19; worker peak 0.87 GiB. In-process over the default's batches, the encoder with the blocks
took 222 against 229 ms a batch whole; with every shard run alone and its statistics waited for
after each batch (no host work beside the forward), latentstore took 13.64 s, and 13.42 s
overlapped, in runs of their own: the gap to the floor is not the two sides contending for the cores. Nor was it page
faults: torch's THP_MEM_ALLOC_ENABLE cut them fivefold and the time not at all.

Measured 2026-12-02 (a sixth session), after a CPU worker began to encode one batch per core at once,
each on one torch thread (``pipeline.encode.encode_streams``), and this benchmark's strict floor began to
run the bare limit the same way (two streams here, blocks). What the fifth session ruled out was in fact
the gap: timed per call in-process, the encoder's calls took 14.5 s over the quick start's batches
beside the host threads against 11.3 s alone, so each CPU-second of host work cost the forward about
a second, not half of one, as an operation spread over both cores waits for the core a host thread
holds. Three runs of the default (--tokens 200000 --no-dense), the machine slowing from run to run
(the host path alone fell from 20.7 to 13.4 M/s): bare limit 9.57, 10.43 and 12.11 s; as run 7.66,
8.83 and 8.77 s; latentstore 10.15, 12.34 and 13.79 s: latentstore over bare **0.943, 0.845 and
0.878** (goal 0.85: met in two runs of three; it was 0.63 to 0.74 before), over the strict floor
0.755, 0.715 and 0.636; 2.104 bytes per nonzero; host path 20.7, 18.2 and 13.4 M/s on one thread,
30.9, 17.3 and 17.9 M/s on two; index build 3.21, 4.71 and 4.54 s, **0.32, 0.38 and 0.33** of the
extraction (goal 0.30 missed: the extraction it is held to got faster, the build did not); worker
peak 1.45 GiB. The fast-device proxy, one run (--synthetic fast-proxy --tokens 300000): bare limit
12.04 s, as run 5.76 s, latentstore 9.10 s: **1.323** over the bare limit (goal 0.6), **0.632** over
the strict floor (0.577 before); 2.362 bytes per nonzero; host path 11.6 M/s on one thread, 11.3 M/s
on two; index build 2.10 s, 0.23; worker peak 0.90 GiB. At the command line, the quick start's
extraction bar read 13 and 14 s against 15 and 18 s for the code before, run alternating with it.

The index build runs as `latentstore index` plans it (``store.index.plan_layout``: parts that share
the entries evenly over the CPUs, the longest first), on one thread per CPU for Ray's tasks.

No GPU was lent to this work, so the GPT-2-small-shaped GPU run (``--synthetic gpt2-small``) has
not been made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import DEFAULT_SHARD_TOKENS, DatasetSpec, plan_shards, row_lengths
from pipeline.encode import block_rows
from pipeline.models import load_model, save_model, stop_layer
from pipeline.saes import input_hook
from pipeline.shard_builder import ShardBuilder
from pipeline.specs import ExtractConfig
from pipeline.worker import SHARDS_IN_FLIGHT, ExtractJob, ExtractWorker
from store import stats as stats_mod
from store.writer import ShardData, StoreWriter

SYNTHETIC = {
    # GPT-2 small's shape, random weights: for GPU runs without the hub (SAEs at layers 6 and 8).
    "gpt2-small": dict(model=dict(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_vocab=50257,
                                  d_mlp=3072), layers=(6, 8), d_sae=24576, k=64, row_tokens=512),
    "tiny": dict(model=dict(n_layers=4, d_model=256, n_ctx=256, d_head=32, n_heads=8, d_vocab=4096, d_mlp=1024),
                 layers=(2, 3), d_sae=16384, k=50, row_tokens=512),
    # A fast-device proxy: forward and encode are cheap per nonzero, as on a GPU, so the host side shows.
    "fast-proxy": dict(model=dict(n_layers=1, d_model=32, n_ctx=128, d_head=8, n_heads=4, d_vocab=4096, d_mlp=128),
                       layers=(0,), d_sae=4096, k=64, row_tokens=128),
}


@contextmanager
def torch_threads(n: int):
    """torch on ``n`` threads meanwhile: a notebook's way uses every core, while the worker set one
    thread for each of its streams."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synthetic_assets(name: str, root: Path) -> tuple[str, list[str], str]:
    """A model built from a config, TopK SAEs of controlled sparsity, and a pre-tokenized dataset."""
    import datasets
    from sae_lens import HookedSAETransformer, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    shape = SYNTHETIC[name]
    cfg = HookedTransformerConfig(act_fn="gelu", normalization_type="LN", **shape["model"])
    model = HookedSAETransformer(cfg)
    save_model(model, root / "model")
    saes = []
    for layer in shape["layers"]:
        hook = f"blocks.{layer}.hook_resid_post"
        sae = TopKSAE(TopKSAEConfig(d_in=cfg.d_model, d_sae=shape["d_sae"], k=shape["k"],
                                    metadata=SAEMetadata(hook_name=hook, prepend_bos=False)))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.05)
        sae.save_model(root / f"sae{layer}")
        saes.append(str(root / f"sae{layer}"))
    rows = torch.randint(0, cfg.d_vocab, (max(1, 2_000_000 // shape["row_tokens"]), shape["row_tokens"])).tolist()
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
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-cache way (slow on wide SAEs)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory run in a fresh process")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        if args.synthetic:
            model_dir, sae_dirs, data = synthetic_assets(args.synthetic, work)
            spec = DatasetSpec(data, tokens_column="ids")
            args.goal = 0.6 if args.synthetic == "fast-proxy" else 0.85
        else:
            model_dir, sae_dirs, data = default_assets()
            spec = DatasetSpec(data)
            args.goal = 0.85
        run(args, work, model_dir, sae_dirs, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, model_dir: str, sae_dirs: list[str], spec: DatasetSpec) -> None:
    store = work / "bench.zarr"
    config = ExtractConfig.build(model=model_dir, saes=tuple(sae_dirs), dataset=spec, store=str(store),
                                 context_size=args.context_size, batch_size=args.batch_size, value_dtype="bfloat16")
    # one worker on this machine, with the torch threads `latentstore extract` gives it (ray_session.worker_resources)
    job = ExtractJob(config, prepend_bos=spec.tokens_column is None, device=args.device, n_threads=os.cpu_count())
    worker = ExtractWorker(job)
    device = worker.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # The shards of the first --tokens tokens exactly (as --max-tokens plans them), and their windows.
    lengths = row_lengths(worker.dataset, spec, worker.model.tokenizer, worker.model.cfg.d_vocab)
    shards = plan_shards(lengths, args.context_size, job.prepend_bos, args.shard_tokens, args.tokens)
    windows = [worker.windows(shard) for shard in shards]
    n_tokens = sum(w.n_tokens for w in windows)
    batches = [
        (torch.from_numpy(w.tokens[i : i + args.batch_size, : int(w.lengths[i : i + args.batch_size].max())]),
         w.lengths[i : i + args.batch_size])
        for w in windows for i in range(0, len(w.lengths), args.batch_size)
    ]
    model, saes = worker.model, list(worker.saes.values())
    hooks = [input_hook(sae) for sae in saes]  # the worker keys its SAEs by name
    stop = stop_layer(hooks)

    @torch.inference_mode()
    def bare_batches(model, some: list, blocked: bool) -> None:
        for tokens, _ in some:
            _, cache = model.run_with_cache(tokens.to(device), names_filter=list(dict.fromkeys(hooks)),
                                            stop_at_layer=stop)
            for sae, hook in zip(saes, hooks):
                inputs = cache[hook].flatten(0, -2)
                for block in inputs.split(block_rows(inputs, sae.cfg.d_sae) if blocked else len(inputs)):
                    sae.encode(block)
        sync()

    def bare() -> None:  # as a notebook runs it: one batch at a time, torch on every core
        with torch_threads(os.cpu_count()):
            bare_batches(model, batches, blocked=False)

    # latentstore's way on a CPU: one stream per core on one torch thread each (a model of its own each,
    # as run_with_cache's hooks are the model's), each SAE encoding in blocks
    n_streams = worker.n_streams
    models = [model] + [load_model(job.model, device, job.model_dtype) for _ in range(n_streams - 1)]

    def bare_as_run() -> None:
        with torch_threads(1 if n_streams > 1 else os.cpu_count()), ThreadPoolExecutor(n_streams) as streams:
            list(streams.map(lambda i: bare_batches(models[i], batches[i::n_streams], blocked=True),
                             range(n_streams)))

    def ours() -> None:  # as a Ray actor runs them: SHARDS_IN_FLIGHT calls at once
        with ThreadPoolExecutor(SHARDS_IN_FLIGHT) as calls:
            list(calls.map(worker.run_shard, shards))
        sync()

    dense_dir = work / "dense"

    @torch.inference_mode()
    @torch_threads(os.cpu_count())
    def dense() -> None:
        shutil.rmtree(dense_dir, ignore_errors=True)
        dense_dir.mkdir()
        for i, (tokens, lengths) in enumerate(batches):
            _, cache = model.run_with_cache_with_saes(tokens.to(device), saes=saes, use_error_term=True,
                                                      names_filter=[f"{h}.hook_sae_acts_post" for h in hooks])
            torch.save({h: cache[f"{h}.hook_sae_acts_post"].cpu() for h in hooks}, dense_dir / f"batch{i}.pt")
        sync()

    writer = StoreWriter(str(store))
    run_record = {"bench": True, "saes": [{"name": name} for name in worker.saes]}  # a resume checks markers by it
    writer.begin(run_record, {}, overwrite=True)
    # the bare limit as a notebook runs it; and as latentstore runs the model on a CPU (in blocks, one
    # stream per core), which is faster there: latentstore's cost over the strictest floor
    ways = {"bare limit": bare, "bare, as run": bare_as_run, "latentstore": ours}
    if not args.no_dense:
        ways["dense cache"] = dense
    times: dict[str, list[float]] = {name: [] for name in ways}
    bare()  # warm up kernels and caches once
    for _ in range(args.repeats):
        for name, fn in ways.items():
            if name == "latentstore":
                for shard in shards:
                    writer.delete_shard(shard.shard_id)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    markers = writer.completed_shards()
    nnz = sum(sum(m["nnz"].values()) for m in markers.values())
    store_bytes = dir_bytes(store)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, {n_tokens:,} tokens in {len(shards)} shards, {len(saes)} SAEs "
          f"(d_sae {saes[0].cfg.d_sae}), mean L0 {nnz / n_tokens / len(saes):.1f}, median of {args.repeats}")
    print(f"{'way':<14}{'seconds':>10}{'tokens/s':>12}{'bytes':>16}")
    for name in ways:
        size = {"latentstore": store_bytes, "dense cache": dir_bytes(dense_dir) if dense_dir.exists() else 0}.get(name)
        print(f"{name:<14}{median[name]:>10.2f}{n_tokens / median[name]:>12,.0f}{(f'{size:,}' if size else '-'):>16}")
    print(f"latentstore / bare limit, tokens per second: {median['bare limit'] / median['latentstore']:.3f}  "
          f"(goal >= {args.goal}); over the bare limit run as latentstore runs the model ({n_streams} "
          f"stream(s), blocks): {median['bare, as run'] / median['latentstore']:.3f}")
    print(f"bytes per stored nonzero (all arrays, bfloat16 values): {store_bytes / nnz:.3f}  (goal <= 3.0)")
    if "dense cache" in ways:
        print(f"dense cache / latentstore: time {median['dense cache'] / median['latentstore']:.2f}x, "
              f"bytes {dir_bytes(dense_dir) / store_bytes:.1f}x")

    host = host_path(worker, shards, writer, args.repeats)
    print(f"host path alone (statistics, compression, writes), nonzeros per second: one core "
          f"{host[1] / 1e6:.1f} M, all {os.cpu_count()} cores {host[os.cpu_count()] / 1e6:.1f} M  (goal 8 M)")

    build = index_build(writer, [markers[s.shard_id] for s in shards], [(h, s.cfg.d_sae) for h, s in worker.saes.items()])
    print(f"feature-major index build: {build:.2f} s, {build / median['latentstore']:.2f} of the extraction it "
          f"follows  (goal <= 0.30)")
    if not args.no_rss:
        print(f"worker peak resident memory over these shards: {peak_rss(job, run_record, shards, work) / 2**30:.2f} GiB")


def host_path(worker: ExtractWorker, shards: list, writer: StoreWriter, repeats: int) -> dict[int, float]:
    """Nonzeros per second of a shard's host side alone (ShardBuilder and write_shard) on pools of one
    thread and of every core, over batches encoded beforehand."""
    encoded, nnz = [], 0
    for shard in shards:
        w = worker.windows(shard)
        parts = []
        for i in range(0, len(w.lengths), worker.job.batch_size):
            lengths = w.lengths[i : i + worker.job.batch_size]
            tokens = torch.from_numpy(w.tokens[i : i + worker.job.batch_size, : int(lengths.max())]).to(worker.device)
            parts.append(worker.encoder(tokens, torch.from_numpy(lengths).to(worker.device)))
        encoded.append((shard, w, parts))
        nnz += sum(len(b.wait().indices) for batch in parts for b in batch.values())
    d_sae = {hook: sae.cfg.d_sae for hook, sae in worker.saes.items()}
    rates = {}
    for n_threads in sorted({1, os.cpu_count()}):
        best = np.inf
        with ThreadPoolExecutor(n_threads) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                for shard, w, parts in encoded:
                    builder = ShardBuilder(pool, d_sae, worker.job.value_dtype, worker.job.top_k)
                    for batch in parts:
                        builder.add(batch)
                    acts, stats = builder.finish(w.n_tokens)
                    data = ShardData(shard.shard_id, shard.row_start, shard.row_stop, shard.token_limit,
                                     w.flat_tokens(), w.rows, w.positions, acts, stats)
                    writer.write_shard(data, worker.job.value_dtype, d_sae, worker.job.top_k, pool=pool)
                best = min(best, time.perf_counter() - start)
        rates[n_threads] = nnz / best
    return rates


def index_build(writer: StoreWriter, markers: list[dict], saes: list[tuple[str, int]]) -> float:
    """Seconds to build the feature-major index of the bench store, in this process, as `latentstore
    index` plans and runs it: its parts, one at a time on each CPU (threads here for Ray's tasks; the
    work releases the GIL)."""
    from jobs.index import plan
    from store import index

    counts = {}
    for hook, d_sae in saes:
        merged = stats_mod.merge_shards(writer.location, markers, hook, d_sae, "bfloat16")
        stats_mod.write_merged(writer.location, hook, merged, sum(m["n_tokens"] for m in markers))
        counts[hook] = merged.count
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as tasks:
        todo, _ = plan(writer.location, counts, markers, "bfloat16", os.cpu_count())
        list(tasks.map(lambda job: index.build_part(writer.location, job[0], job[1], markers, "<u4"), todo))
    for hook, _ in saes:
        index.finalize(writer.location, hook)
    return time.perf_counter() - start


def peak_rss(job: ExtractJob, run_record: dict, shards: list, work: Path) -> int:
    """The peak resident memory, in bytes, of a fresh process that loads a worker and runs the shards."""
    import multiprocessing

    job = replace(job, config=job.config.changed(store=str(work / "rss.zarr")))
    StoreWriter(job.store).begin(run_record, {}, overwrite=True)
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(_run_and_measure, (job, shards))
    finally:  # closed and joined, not terminated: a terminated worker leaves semaphores behind
        pool.close()
        pool.join()


def _run_and_measure(job: ExtractJob, shards: list) -> int:
    worker = ExtractWorker(job)
    with ThreadPoolExecutor(SHARDS_IN_FLIGHT) as calls:
        list(calls.map(worker.run_shard, shards))
    return _own_peak_rss()


def _own_peak_rss() -> int:
    """This process's peak resident bytes. Linux keeps ru_maxrss across exec, so a process spawned
    from the bench reports the bench's own size there; its address space's VmHWM is its own."""
    import resource

    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
