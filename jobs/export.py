"""`latentstore export neuronpedia`: SAEDashboard's batch JSON for Neuronpedia, made from a store.

One ``batch-N.json`` per batch of features, with SAEDashboard's batch and feature fields
(``docs/DASHBOARDS.md`` lists them and what each holds). Beyond SAEDashboard, every
activation example carries ``dataset_row``, ``dataset_pos`` and ``token_index``: where its
qualifying token came from.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.dashboard_data import (DashboardBuilder, checked_features, DashboardSettings, Example, FeatureDashboard, load_logit_weights,
                                     window_starts)
from store import FeatureStore
from store.errors import ConfigError

BATCH_FEATURES = 128  # SAEDashboard's n_features_per_batch in Neuronpedia runs


def add_commands(commands) -> None:
    export = commands.add_parser("export", help="write a store's features in another tool's format",
                                 description="Write a store's features in another tool's format.")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    parser = formats.add_parser(
        "neuronpedia", help="SAEDashboard's batch-N.json files, as Neuronpedia imports them",
        description="Write SAEDashboard's Neuronpedia JSON (one batch-N.json per batch of features) from the "
                    "store: top activations, interval groups, histograms and density from the stored activations; "
                    "the logit tables from the SAE's W_dec and the model's W_U (loaded, never run).",
        epilog="example: latentstore export neuronpedia demo.zarr --hook blocks.1.hook_resid_post --out np/ "
               "--features 0:512",
    )
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--hook", required=True, help="the SAE's hook")
    parser.add_argument("--out", required=True, help="the folder to write batch-N.json files into")
    parser.add_argument("--features", type=feature_range, help="START:STOP (default: every feature)")
    parser.add_argument("--batch-size", type=int, default=BATCH_FEATURES,
                        help="features per batch file (default: %(default)s)")
    parser.add_argument("--sae-set", help="Neuronpedia's sae_set name (default: from the hook, e.g. 1-res)")
    parser.add_argument("--model-id", help="Neuronpedia's model_id (default: the run's model name)")
    parser.add_argument("--no-logits", dest="logits", action="store_false",
                        help="leave the logit tables empty (no weights are loaded)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(handler=_handle)


def feature_range(text: str) -> range:
    """``START:STOP`` as on the command line."""
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP, e.g. 0:4096") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"{text!r}: START must be at least 0 and less than STOP")
    return range(start, stop)


def export_neuronpedia(fs: FeatureStore, hook: str, out: str | Path, features: range | None = None,
                       batch_size: int = BATCH_FEATURES, logits: bool = True, sae_set: str | None = None,
                       model_id: str | None = None, progress: bool = False) -> list[Path]:
    """Write ``batch-N.json`` files (N counts batches from 0) and return their paths."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give at least 1 feature per batch.")
    features = checked_features(fs, hook, features)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_logit_weights(fs, hook) if logits else None
    builder = DashboardBuilder(fs, hook, weights, DashboardSettings())
    header = batch_header(fs, hook, sae_set, model_id)
    common = {"n_prompts_total": n_windows(builder), "n_tokens_in_prompt": int(fs.run["context_size"]),
              "dataset": fs.run["dataset"]["name"]}
    vocab = fs.vocab
    written, batch = [], []
    for dashboard in builder.build(features, progress=progress):
        batch.append({**neuronpedia_feature(dashboard, vocab), **common})
        if len(batch) == batch_size or dashboard.feature == features.stop - 1:
            path = out / f"batch-{len(written)}.json"
            path.write_text(json.dumps({**header, "features": batch}, allow_nan=False))
            written.append(path)
            batch = []
    return written


def batch_header(fs: FeatureStore, hook: str, sae_set: str | None, model_id: str | None) -> dict[str, Any]:
    match = re.match(r"blocks\.(\d+)\.", hook)
    layer = int(match.group(1)) if match else 0
    kind = hook.rsplit(".hook_", 1)[-1].split("_")[0]  # resid, mlp, attn, ...
    return {"model_id": model_id or Path(fs.run["model"]["name"]).name, "layer": layer,
            "sae_set": sae_set or f"{layer}-{kind}"}


def n_windows(builder: DashboardBuilder) -> int:
    """Prompts in SAEDashboard's sense: the context windows the model ran over."""
    return len(window_starts(builder.rows, builder.positions))


def neuronpedia_feature(d: FeatureDashboard, vocab: list[str] | None) -> dict[str, Any]:
    """One feature in SAEDashboard's fields (the batch-wide ones are added by the caller)."""
    def text(ids: Iterable[int]) -> list[str]:
        return [vocab[i] if vocab else str(i) for i in ids]

    logits = d.logits
    activations = []
    for group in d.groups:
        # SAEDashboard marks its top group with bin_min = bin_contains = -1 and bin_max = the maximum
        bounds = ((-1.0, d.max, -1.0) if group.kind == "top"
                  else (group.bin_min, group.bin_max, group.bin_contains))
        activations += [example_json(e, text, *bounds) for e in group.examples]
    return {
        "feature_index": d.feature,
        "neg_str": text(logits.bottom_ids) if logits else [],
        "neg_values": logits.bottom_values if logits else [],
        "pos_str": text(logits.top_ids) if logits else [],
        "pos_values": logits.top_values if logits else [],
        "frac_nonzero": d.frac_nonzero,
        "freq_hist_data_bar_values": d.hist_centers,
        "freq_hist_data_bar_heights": d.hist_counts,
        "logits_hist_data_bar_values": logits.hist_centers if logits else [],
        "logits_hist_data_bar_heights": logits.hist_counts if logits else [],
        "activations": activations,
    }


def example_json(e: Example, text, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": text(e.token_ids.tolist()), "values": e.values.tolist(), "qualifying_token_index": e.active,
            "dataset_row": e.row, "dataset_pos": e.pos, "token_index": e.token_index}


def _handle(args: argparse.Namespace) -> None:
    fs = FeatureStore.open(args.store)
    paths = export_neuronpedia(fs, args.hook, args.out, args.features, args.batch_size, args.logits,
                               args.sae_set, args.model_id, args.progress)
    print(f"wrote {len(paths)} batch files to {args.out}")
