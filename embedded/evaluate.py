"""Step 5: measure the shipped model and SAEs on the held-out eval split.

Everything is computed on a fixed set of evenly spaced eval windows, so the
numbers reproduce from the shipped files in seconds:

- the model's loss per token, against a unigram model fitted on the train split;
- per SAE: explained variance and mean L0 (over every position but the BOS one,
  whose activation is the same in every window), the fraction of features that
  never fire on any position, the firing rate of the densest feature (the share
  of non-BOS positions on which the most often active feature fires), and the
  loss with the SAE spliced in (no error term) against the clean loss and the
  loss with the hook's output zeroed. The fraction of the zero-ablation gap
  that splicing recovers is
  ``(zero_ablation - spliced) / (zero_ablation - clean)``.

``--write`` stores the result in ``metrics.json`` and rewrites the table
between the metrics markers of the README next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from embedded.corpus import read_jsonl_gz
from embedded.data import token_windows
from pipeline.models import load_model

log = logging.getLogger(__name__)

TABLE_START = "<!-- metrics:start -->"
TABLE_END = "<!-- metrics:end -->"


@dataclass(frozen=True)
class EvalConfig:
    model_dir: Path
    sae_dirs: dict[str, Path]
    train_corpus: Path
    eval_corpus: Path
    n_windows: int = 64
    context_size: int = 128
    batch_size: int = 16  # windows per forward pass
    n_threads: int = 2  # torch CPU threads


def eval_windows(cfg: EvalConfig, tokenizer: Any) -> torch.Tensor:
    """``cfg.n_windows`` windows spread evenly over the eval split (so every file region is sampled)."""
    windows = token_windows(cfg.eval_corpus, tokenizer, cfg.context_size)
    if len(windows) < cfg.n_windows:
        raise ValueError(f"{cfg.eval_corpus} gives {len(windows)} windows of {cfg.context_size}; asked for {cfg.n_windows}.")
    return windows[torch.linspace(0, len(windows) - 1, cfg.n_windows).round().long()]


def unigram_loss(train_corpus: Path, tokenizer: Any, tokens: torch.Tensor) -> float:
    """Cross-entropy (nats per token) of the next tokens under train-split unigram frequencies, add-one smoothed."""
    counts = torch.ones(len(tokenizer), dtype=torch.float64)
    for ids in tokenizer([row["text"] for row in read_jsonl_gz(train_corpus)])["input_ids"]:
        counts += torch.bincount(torch.tensor(ids), minlength=len(tokenizer)).double()
    log_probs = (counts / counts.sum()).log()
    return -log_probs[tokens[:, 1:]].mean().item()


def batched_loss(run: Any, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss of ``run(batch)`` (per-token losses) over all windows."""
    losses = [run(tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)]
    return torch.cat([l.flatten() for l in losses]).mean().item()


def evaluate_sae(model: Any, sae: SAE, tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    hook = sae.cfg.metadata.hook_name
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    body_fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    sse = l0_sum = 0.0
    body_acts = []
    for i in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[i: i + batch_size], names_filter=hook, return_type=None)
        features = sae.encode(cache[hook])
        fired |= (features > 0).flatten(0, 1).any(0)
        body = cache[hook][:, 1:]  # the BOS position is left out of EV and L0
        sse += (sae.decode(features[:, 1:]) - body).pow(2).sum().item()
        l0_sum += (features[:, 1:] > 0).sum().item()
        body_fire_counts += (features[:, 1:] > 0).flatten(0, 1).sum(0)
        body_acts.append(body.reshape(-1, sae.cfg.d_in))
    acts = torch.cat(body_acts)
    sst = (acts - acts.mean(0)).pow(2).sum().item()

    def zero(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(activation)

    per_token = {"return_type": "loss", "loss_per_token": True}
    clean = batched_loss(lambda t: model(t, **per_token), tokens, batch_size)
    spliced = batched_loss(lambda t: model.run_with_saes(t, saes=[sae], use_error_term=False, **per_token),
                           tokens, batch_size)
    ablated = batched_loss(lambda t: model.run_with_hooks(t, fwd_hooks=[(hook, zero)], **per_token), tokens, batch_size)
    return {
        "hook_name": hook,
        "architecture": sae.cfg.architecture(),
        "d_sae": sae.cfg.d_sae,
        "explained_variance": 1 - sse / sst,
        "mean_l0": l0_sum / len(acts),
        "dead_fraction": 1 - fired.float().mean().item(),
        "max_firing_rate": body_fire_counts.max().item() / len(acts),
        "loss_clean": clean,
        "loss_spliced": spliced,
        "loss_zero_ablation": ablated,
        "fraction_recovered": (ablated - spliced) / (ablated - clean),
    }


@torch.inference_mode()
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.n_threads)
    model = load_model(str(cfg.model_dir))
    tokens = eval_windows(cfg, model.tokenizer)
    model_loss = batched_loss(lambda t: model(t, return_type="loss", loss_per_token=True), tokens, cfg.batch_size)
    metrics: dict[str, Any] = {
        "n_windows": cfg.n_windows,
        "context_size": cfg.context_size,
        "n_eval_tokens": tokens.numel(),
        "model_loss": model_loss,
        "unigram_loss": unigram_loss(cfg.train_corpus, model.tokenizer, tokens),
        "saes": {},
    }
    for name, path in cfg.sae_dirs.items():
        sae = SAE.load_from_disk(str(path)).eval()
        metrics["saes"][name] = evaluate_sae(model, sae, tokens, cfg.batch_size)
        log.info("%s: %s", name, metrics["saes"][name])
    log.info("model loss %.3f, unigram %.3f", metrics["model_loss"], metrics["unigram_loss"])
    return metrics


def metrics_table(metrics: dict[str, Any]) -> str:
    """The README's metrics section, in Markdown."""
    lines = [
        f"Held-out eval split, {metrics['n_windows']} windows of {metrics['context_size']} tokens "
        f"({metrics['n_eval_tokens']} tokens). Losses in nats per token.",
        "",
        f"Model loss {metrics['model_loss']:.3f} (perplexity {math.exp(metrics['model_loss']):.1f}); "
        f"unigram baseline {metrics['unigram_loss']:.3f} (perplexity {math.exp(metrics['unigram_loss']):.1f}).",
        "",
        "| SAE | hook | arch | d_sae | explained var. | mean L0 | dead | densest feature fires | loss clean | spliced "
        "| zero-ablated | gap recovered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["saes"].items():
        lines.append(
            f"| `{name}` | `{m['hook_name']}` | {m['architecture']} | {m['d_sae']} | {m['explained_variance']:.3f} "
            f"| {m['mean_l0']:.1f} | {m['dead_fraction']:.1%} | {m['max_firing_rate']:.1%} | {m['loss_clean']:.3f} "
            f"| {m['loss_spliced']:.3f} | {m['loss_zero_ablation']:.3f} | {m['fraction_recovered']:.1%} |"
        )
    return "\n".join(lines)


def write_metrics(metrics: dict[str, Any], metrics_path: Path, readme_path: Path | None) -> None:
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    if readme_path is None:
        return
    text = readme_path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{readme_path} has no {TABLE_START} ... {TABLE_END} section to hold the metrics table.")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    readme_path.write_text(f"{head}{TABLE_START}\n{metrics_table(metrics)}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pipeline import default

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default.MODEL_DIR)
    parser.add_argument("--sae-dirs", type=Path, nargs="*", default=None, help="default: the shipped SAEs")
    parser.add_argument("--train-corpus", type=Path, default=default.TRAIN_CORPUS)
    parser.add_argument("--eval-corpus", type=Path, default=default.EVAL_CORPUS)
    parser.add_argument("--n-windows", type=int, default=EvalConfig.n_windows)
    parser.add_argument("--context-size", type=int, default=EvalConfig.context_size)
    parser.add_argument("--n-threads", type=int, default=EvalConfig.n_threads)
    parser.add_argument("--write", type=Path, default=None, metavar="METRICS_JSON",
                        help="write metrics here and update the metrics table of the README.md beside it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sae_dirs = default.SAE_DIRS if args.sae_dirs is None else {p.name: p for p in args.sae_dirs}
    metrics = evaluate(EvalConfig(model_dir=args.model_dir, sae_dirs=sae_dirs, train_corpus=args.train_corpus,
                                  eval_corpus=args.eval_corpus, n_windows=args.n_windows,
                                  context_size=args.context_size, n_threads=args.n_threads))
    if args.write is not None:
        readme = args.write.parent / "README.md"
        write_metrics(metrics, args.write, readme if readme.is_file() else None)
    return metrics


if __name__ == "__main__":
    main()
