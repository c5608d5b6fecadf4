"""Benchmark: dashboard data for every feature of an SAE, from the store against recomputing it.

    python -m bench.dashboard                       # the embedded default, 50,000 tokens
    python -m bench.dashboard --tokens 200_000 --store big.zarr          # keep the store for another run

Both sides produce, for every feature, what SAEDashboard and sae_vis show: the top 20
activations with their windows, 10 equal-width interval groups of 5 examples, a 50-bin
activation histogram, the density, and the top/bottom 10 logits of ``W_dec[f] @ W_U`` with
their histogram.

- **store**: ``pipeline.dashboard_data.DashboardBuilder`` over a store extracted here first
  (the extraction is timed and printed too, as the one-time cost every later query shares);
  the weights are loaded, never run.
- **recompute**: as SAEDashboard and sae_vis do it, written here with sae_lens: for each batch
  of ``--batch-features`` features, run the model over every prompt (the store's windows)
  up to the SAE's layer, encode with the SAE, keep the batch's columns and compute the same
  data from them.

The two sides take turns over the same 512 features at a time (the store's turn, then the
recompute batches of those features), so that a load that comes and goes on a shared machine
slows both alike; each side's set-up (loading weights, the store's activations, the prompts)
counts on its side. The script prints each turn's timings, both totals, the speedup, and the
largest difference between the two sides' top activations (the store keeps bfloat16 values,
so about 1e-2 relative).

Measured on a quiet 2-core CPU, embedded default, 50,000 tokens, 2,048 features:
- resid_post_1_standard (L0 about 200, 10.4M stored activations): store 1.6 s, recompute 61.7 s,
  **39.6x** (turns 42.0x to 60.9x); with ``--store`` over a store extracted by an earlier run, so
  that the set-up reads it cold (0.8 s), 2.0 s against 61.5 s, **31.0x**;
- resid_post_2_topk (``--sae pipeline/default/saes/resid_post_2_topk``, L0 32): at its former
  2,048 features, store 0.6 s, recompute 86.5 s, **139.8x**; retrained at 640 features, store
  0.2 s, recompute 12.7 s, **63.5x** (turns 78.2x to 81.8x), and its exports against its 17.0 s
  extraction: neuronpedia 0.8 s (5.0%; 0.3 s without correlated features), delphi 0.2 s (1.2%).
Top activations agree within 3.8e-3 (bfloat16). Co-firing counts over the whole store, which the
recompute side does not make, took 10.7 s and 0.7 s more.

Exports, each against the extraction that made the store (goal: at most 10% of it):
- **neuronpedia**: ``latentstore export neuronpedia`` of every feature (its tokenizer loaded, the
  weights loaded, correlated features over the whole store, batch-N.json files written), and
  again with ``--no-correlated-features``;
- **delphi**: ``latentstore export delphi`` of the same SAE (split files from the index).

    python -m bench.dashboard --exports-only        # the exports alone, without the recompute side

Measured twice on the 2-core CPU while three other people worked on it (load average 3 to 4, so
noisy; the extraction took 24.6 s and 27.7 s, about 17 s quiet), standard SAE, 50,000 tokens:
neuronpedia 5.6 s and 5.7 s (22.6% and 20.4% of the extraction: **the goal is missed**; 166 MiB
in 16 files), without correlated features 1.3 s and 2.4 s (5.2% and 8.8%), delphi 1.5 s and 1.3 s
(6.3% and 4.7%). Measured again quiet, after the embedded TopK SAE was retrained (the standard SAE
measured is unchanged): extraction 17.6 s, neuronpedia 3.7 s (21.0%: **missed**), without
correlated features 1.3 s (7.3%), delphi 1.5 s (8.7%). Again, after the delphi export sorted each
latent's entries by token with two counting sorts: extraction 15.3 s, neuronpedia 3.5 s (22.6%:
**missed**), without correlated features 1.3 s (8.4%), delphi 0.7 s (4.5%). Again, in format 2.1 (index parts
chunked in 2^18 entries): extraction 15.3 s, neuronpedia 3.9 s (25.5%: **missed**), without correlated features
1.4 s (9.1%), delphi 0.3 s (2.1%). Again, after each window's tokens were made JSON once per batch
(2026-11-30, later): extraction 17.0 s, neuronpedia 3.2 s (18.7%: **missed**), without correlated features 1.3 s
(7.5%), delphi 0.5 s (3.1%). Again, once extraction workers ran torch on all of the cores (it was
one fewer, here one thread instead of two), so that the extraction the exports are held to is faster:
extraction 14.6 s, neuronpedia 3.3 s (22.3%: **missed**), without correlated features 1.0 s (6.7%),
delphi 0.4 s (2.9%). Again (2026-12-01), once the extraction's warm actors built its index: extraction
14.5 s, neuronpedia 3.4 s (23.4%: **missed**), without correlated features 1.1 s (7.6%), delphi 0.6 s
(4.0%). Again (2026-12-01, later; nothing on the exports' speed path changed): extraction 16.8 s,
neuronpedia 3.5 s (20.9%: **missed**), without correlated features 1.0 s (6.2%), delphi 0.4 s (2.1%).
Again (2026-12-01, a third session; nothing on the exports' speed path changed): extraction 16.4 s,
neuronpedia 3.8 s (23.1%: **missed**), without correlated features 1.2 s (7.6%), delphi 0.4 s (2.6%).
Again (2026-12-01, a fourth session), once the Gram matrix was BLAS's ``ssyrk`` into one reused buffer and
the features' sums came from the same chunks: extraction 13.8 s, neuronpedia 2.7 s (19.4%: **missed**),
without correlated features 1.3 s (9.2%), delphi 0.4 s (2.8%); on a store kept from an earlier
extraction of 11.5 s, 2.9 s (25.6%), 1.2 s (10.0%) and 0.4 s (3.1%). Again (2026-12-02), once CPU
extraction workers encoded a batch per core (nothing on the exports' path changed): extraction 15.5 s,
neuronpedia 2.7 s (17.6%: **missed**), without correlated features 1.4 s (8.8%), delphi 0.8 s (5.1%).
The Gram matrix was dense float32 BLAS at this CPU's peak (1.05e11 multiply-adds in 1.7 s); a sparse
product of the same activations took 8.2 s (scipy) and 10.1 s (torch CSR times dense), and only 18%
of the activations are those of the 10% most active features, so no split of dense and sparse parts pays.
What is left of the Neuronpedia export's
time is the correlated features' Gram matrix (1.05e11 multiply-adds for this SAE even counting each
pair once, 1.1 to 1.3 s on both cores at about 93 billion a second); the rest of the export alone is
9 to 10% of the extraction, so the goal cannot be met with whole-store correlations on this machine's
two cores; ``docs/DASHBOARDS.md`` has the details.

A wide SAE, as people export them (``--synthetic tiny --tokens 200000``: a random 4-layer model's TopK SAE
of 16,384 features, k 50, 200,000 pre-tokenized tokens; exports only), quiet: extraction 88.3 s,
neuronpedia 13.8 s (15.7%: **missed**; 1.8 GiB in 128 files), without correlated features 7.7 s (8.7%),
delphi 0.5 s (0.6%); again after each window's tokens were made JSON once per batch: extraction 87.1 s,
neuronpedia 10.6 s (12.2%: missed), without correlated features 5.5 s (6.3%), delphi 0.8 s (1.0%); again
once extraction workers ran torch on all of the cores: extraction 58.3 s, neuronpedia 10.3 s (**17.6%**:
missed), without correlated features 6.0 s (10.2%), delphi 0.5 s (0.9%); again on 2026-12-01 (a fourth
session: the sparse product's path only changed in how the features' sums are counted), two runs:
extraction 63.2 and 61.7 s, neuronpedia 11.0 and 10.7 s (**17.3% and 17.4%**: missed), without
correlated features 6.0 and 5.5 s, delphi 0.7 and 0.5 s. There the correlated features take about 5 s
of the export on its two threads (8.8 CPU-seconds: scipy's sparse products 4.4, half of that sizing
their output before filling it; ranking by r 3.6; torch's MKL product was slower on one thread).

    python -m bench.dashboard --synthetic tiny --tokens 200000
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

TURN_FEATURES = 512  # features per turn of each side: two of the builder's blocks, which it makes at once


def extract(args, folder: Path) -> tuple[str, float]:
    from jobs.extract import ExtractConfig, run_extract
    from pipeline import default
    from pipeline.dataset import DatasetSpec

    model, dataset = str(default.MODEL_DIR), DatasetSpec(str(default.TRAIN_CORPUS))
    sae = args.sae or str(next(p for p in default.default_sae_dirs() if p.is_dir()))
    if args.synthetic:  # a random model and its deepest TopK SAE over pre-tokenized rows, as bench.extract makes them
        from bench.extract import synthetic_assets

        model, saes, data = synthetic_assets(args.synthetic, folder)
        sae, dataset = saes[-1], DatasetSpec(data, tokens_column="ids")
    store = args.store or str(folder / "bench.zarr")
    start = time.perf_counter()
    run_extract(ExtractConfig.build(model=model, saes=(sae,), dataset=dataset, store=store,
                                    context_size=args.context_size, max_tokens=args.tokens, workers=args.workers,
                                    progress=False))
    return store, time.perf_counter() - start


def cofiring_only(fs, sae: str) -> float:
    """Seconds for every feature's co-firing counts over the whole store (the dashboard's extra)."""
    from pipeline.dashboard_data import DashboardBuilder, DashboardSettings

    start = time.perf_counter()
    settings = DashboardSettings(n_top=0, n_groups=0, n_bins=1)
    for _ in DashboardBuilder(fs, sae, None, settings).build():
        pass
    return time.perf_counter() - start


def prompts(fs) -> list[torch.Tensor]:
    """The store's windows as token batches of equal length, the prompts both sides describe."""
    from pipeline.dashboard_data import window_starts

    ids, prov = fs.token_ids(), fs.provenance()
    bounds = np.append(window_starts(prov["row"].to_numpy(), prov["pos"].to_numpy()), len(ids))
    by_length: dict[int, list[np.ndarray]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        by_length.setdefault(int(b - a), []).append(ids[a:b])
    return [torch.from_numpy(np.stack(windows)).long() for windows in by_length.values()]


@torch.inference_mode()
def recompute_batch(model, sae, hook: str, batches: list[torch.Tensor], features: list[int], W_U: torch.Tensor,
                    minibatch: int, special: torch.Tensor, rng: np.random.Generator) -> dict[int, dict]:
    """One feature batch, SAEDashboard's way: a forward over every prompt, then the batch's data."""
    layer = int(re.match(r"blocks\.(\d+)\.", hook).group(1))
    acts, windows = [], []
    for prompts_of_a_length in batches:
        for chunk in prompts_of_a_length.split(minibatch):
            _, cache = model.run_with_cache(chunk, names_filter=[hook], stop_at_layer=layer + 1)
            acts.append(sae.encode(cache[hook])[..., features].flatten(0, 1))
            windows += list(chunk)
    acts = torch.cat(acts)  # [every token, the batch's features]
    token_ids = torch.cat(windows)
    starts = np.cumsum([0] + [len(w) for w in windows])
    counted = ~torch.isin(token_ids, special)
    logits = sae.W_dec[features] @ W_U
    data = {}
    for j, feature in enumerate(features):
        column = torch.where(counted, acts[:, j], 0.0)
        nonzero = column[column > 0]
        values, where = column.topk(20)
        shown = where[values > 0].numpy()
        examples = [windows[int(np.searchsorted(starts, t, side="right") - 1)] for t in shown]
        edges = torch.linspace(float(values[0]), 0, 11)
        groups = []
        for hi, lo in zip(edges[:-1], edges[1:]):
            members = ((column <= hi) & (column > lo)).nonzero()[:, 0].numpy()
            if len(members):
                picked = rng.choice(members, size=min(5, len(members)), replace=False)
                groups.append([windows[int(np.searchsorted(starts, t, side="right") - 1)] for t in picked])
        data[feature] = {
            "top": values[values > 0].numpy(), "examples": examples, "groups": groups,
            "frac_nonzero": len(nonzero) / len(column),
            "hist": torch.histc(nonzero, bins=50, min=float(nonzero.min()), max=float(nonzero.max()))
            if len(nonzero) else None,
            "logits": (logits[j].topk(10), (-logits[j]).topk(10), torch.histc(logits[j], bins=50)),
        }
    return data


class Recompute:
    """SAEDashboard's side: the model, the SAE and the prompts, loaded once; then a forward over
    every prompt for each batch of features."""

    def __init__(self, fs, sae: str, args):
        from pipeline.dashboard_data import effective_unembed
        from pipeline.models import load_model
        from pipeline.saes import SAESource, load_sae

        record = fs.sae_record(sae)
        self.hook, self.args = record["hook"], args
        self.sae = load_sae(SAESource.parse(record["source"]))
        self.model = load_model(fs.run["model"]["name"])
        self.W_U = effective_unembed(self.model.W_U, self.model.ln_final.w, self.model.cfg.normalization_type)
        self.batches = prompts(fs)
        self.special = torch.tensor(sorted(fs.special_token_ids), dtype=torch.long)
        self.rng = np.random.default_rng(0)

    def __call__(self, features: list[int], batches: list[torch.Tensor] | None = None) -> dict[int, dict]:
        return recompute_batch(self.model, self.sae, self.hook, batches or self.batches, features, self.W_U,
                               self.args.minibatch, self.special, self.rng)


def side_by_side(fs, sae: str, args) -> dict:
    """Both sides over the same blocks of features, in turn (store block, then the recompute batches
    of the same features), so that load on a shared machine slows both alike."""
    from pipeline.dashboard_data import DashboardBuilder, DashboardSettings, load_logit_weights

    t = time.perf_counter()
    # without co-firing counts, which the recompute side does not make either (timed on their own)
    builder = DashboardBuilder(fs, sae, load_logit_weights(fs, sae), DashboardSettings(n_cofiring=0))
    store_s = setup_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = Recompute(fs, sae, args)
    recompute_s = time.perf_counter() - t
    theirs([0], [b[:1] for b in theirs.batches])  # warm-up, untimed: the first forward pays one-off costs
    d_sae, ours, top, blocks = fs.d_sae(sae), {}, {}, []
    for start in range(0, d_sae, TURN_FEATURES):
        block = range(start, min(d_sae, start + TURN_FEATURES))
        t = time.perf_counter()
        for d in builder.build(block):
            ours[d.feature] = np.array([e.activation for e in d.groups[0].examples]) if d.groups else np.zeros(0)
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        for a in range(block.start, block.stop, args.batch_features):
            data = theirs(list(range(a, min(block.stop, a + args.batch_features))))
            top.update({feature: d["top"] for feature, d in data.items()})
        theirs_s = time.perf_counter() - t
        store_s, recompute_s = store_s + ours_s, recompute_s + theirs_s
        blocks.append(theirs_s / ours_s)
        print(f"  features {block.start}:{block.stop}: store {ours_s:.2f} s, recompute {theirs_s:.1f} s "
              f"({theirs_s / ours_s:.1f}x)", flush=True)
    return {"store_s": store_s, "setup_s": setup_s, "recompute_s": recompute_s, "ours": ours, "theirs": top,
            "blocks": blocks}


def exports(fs, sae: str, folder: Path, extract_s: float) -> dict[str, float]:
    """Seconds for each export of every feature of SAE ``sae``, printed against the extraction's."""
    from jobs.export import export_neuronpedia
    from jobs.export_delphi import export_delphi
    from pipeline.tokens import use_tokenizer

    times = {}
    t = time.perf_counter()
    use_tokenizer(fs)
    written = export_neuronpedia(fs, sae, folder / "neuronpedia")
    times["neuronpedia"] = time.perf_counter() - t
    size = sum(p.stat().st_size for p in written)
    t = time.perf_counter()
    export_neuronpedia(fs, sae, folder / "neuronpedia-bare", correlated_features=False)
    times["neuronpedia_bare"] = time.perf_counter() - t
    t = time.perf_counter()
    splits = export_delphi(fs, folder / "delphi", [sae])[sae]
    times["delphi"] = time.perf_counter() - t
    size_delphi = sum(p.stat().st_size for p in splits)
    print(f"exports of all {fs.d_sae(sae):,} features of {sae} (extraction {extract_s:.1f} s; goal: at most 10%)")
    print(f"  neuronpedia  {times['neuronpedia']:8.1f} s  {100 * times['neuronpedia'] / extract_s:5.1f}% of the "
          f"extraction  ({len(written)} batch files, {size / 2**20:.1f} MiB)")
    print(f"    without correlated features (--no-correlated-features)  {times['neuronpedia_bare']:.1f} s  "
          f"{100 * times['neuronpedia_bare'] / extract_s:.1f}%")
    print(f"  delphi       {times['delphi']:8.1f} s  {100 * times['delphi'] / extract_s:5.1f}% of the extraction  "
          f"({len(splits)} split files, {size_delphi / 2**20:.1f} MiB)")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens extracted (default: %(default)s)")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--sae", help="an SAE, [NAME=]SOURCE as `latentstore extract --sae` takes it (default: the "
                                      "embedded default's first SAE)")
    parser.add_argument("--batch-features", type=int, default=128,
                        help="features per recompute batch, as Neuronpedia runs use (default: %(default)s)")
    parser.add_argument("--minibatch", type=int, default=64, help="prompts per forward (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="extraction workers (default: %(default)s)")
    parser.add_argument("--store", help="keep the extracted store here; an existing one is resumed, not redone "
                        "(default: a temporary folder)")
    parser.add_argument("--exports-only", action="store_true",
                        help="time the Neuronpedia and delphi exports against the extraction, nothing else")
    parser.add_argument("--synthetic", choices=["tiny", "gpt2-small"],
                        help="instead of the embedded default, a random model of this shape (bench.extract's) and "
                             "its deepest TopK SAE, as wide as the SAEs people export (tiny: 16,384 features, k 50); "
                             "implies --exports-only")
    args = parser.parse_args(argv)
    args.exports_only = args.exports_only or bool(args.synthetic)
    warnings.filterwarnings("ignore")

    from store import FeatureStore
    import pipeline.models, pipeline.saes  # noqa: F401  imported before either side is timed

    with tempfile.TemporaryDirectory() as folder:
        store, extract_s = extract(args, Path(folder))
        fs = FeatureStore.open(store)
        sae = fs.saes[0]
        print(f"{fs.n_tokens:,} tokens, SAE {sae} at {fs.sae_record(sae)['hook']}, {fs.d_sae(sae):,} features; "
              f"extraction (once) {extract_s:.1f} s")
        exports(fs, sae, Path(folder), extract_s)
        if args.exports_only:
            return
        run = side_by_side(fs, sae, args)
        cofiring_s = cofiring_only(fs, sae)
    ours, theirs = run["ours"], run["theirs"]
    compared = [f for f in theirs if len(theirs[f]) and len(ours[f]) == len(theirs[f])]
    diff = max((np.max(np.abs(ours[f] - theirs[f]) / np.abs(theirs[f]).max()) for f in compared), default=0.0)
    print(f"dashboard data for all {fs.d_sae(sae):,} features (each side's set-up included)")
    print(f"  from the store      {run['store_s']:8.1f} s  (set-up {run['setup_s']:.1f} s: the weights, and the "
          "activations read and made feature-major)")
    print(f"  recompute (model)   {run['recompute_s']:8.1f} s")
    print(f"  speedup             {run['recompute_s'] / run['store_s']:8.1f}x  "
          f"(turns: {min(run['blocks']):.1f}x to {max(run['blocks']):.1f}x)")
    print(f"  co-firing counts for every feature, over the whole store (the dashboard's extra): {cofiring_s:.1f} s")
    print(f"  top activations: largest relative difference {diff:.2e} over {len(compared)} features (bfloat16 store)")


if __name__ == "__main__":
    main()
