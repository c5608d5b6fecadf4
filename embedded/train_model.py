"""Step 3: train a small TransformerLens model on the train split, on CPU.

A plain torch loop: AdamW, linear warm-up then cosine decay, gradient clipping.
Windows are drawn in a seeded random order, so a run is repeatable on one
machine (float summation order may differ across CPUs).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from embedded.data import token_windows
from pipeline.models import save_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelTrainConfig:
    train_corpus: Path
    tokenizer_dir: Path
    out_dir: Path
    n_layers: int = 4
    d_model: int = 192
    n_heads: int = 6
    d_mlp: int = 768
    n_ctx: int = 256
    n_steps: int = 360
    batch_size: int = 16  # windows per step
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_fraction: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.1  # on matrices only; gains and biases are left alone
    grad_clip: float = 1.0
    init_seed: int = 0  # HookedTransformerConfig.seed: weight initialisation
    data_seed: int = 1  # order in which windows are drawn
    n_threads: int = 2


def build_model(cfg: ModelTrainConfig, d_vocab: int) -> HookedTransformer:
    model_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
        d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", default_prepend_bos=True, seed=cfg.init_seed,
        model_name="latentstore-stdlib",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens 3.9's HookedTransformer deprecation notice
        return HookedTransformer(model_cfg)


def lr_at(step: int, cfg: ModelTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.n_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: ModelTrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def train_model(cfg: ModelTrainConfig) -> tuple[HookedTransformer, dict[str, Any]]:
    """Train, save with ``pipeline.models.save_model`` and return the model and a summary."""
    torch.set_num_threads(cfg.n_threads)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer_dir))
    windows = token_windows(cfg.train_corpus, tokenizer, cfg.n_ctx)
    model = build_model(cfg, d_vocab=len(tokenizer))
    model.tokenizer = tokenizer  # set_tokenizer would look for the hub
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.data_seed)
    order = torch.randperm(len(windows), generator=generator)
    cursor = 0
    start = time.monotonic()
    model.train()
    bar = tqdm(range(cfg.n_steps), desc="model", mininterval=10)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # next epoch, new order
            order, cursor = torch.randperm(len(windows), generator=generator), 0
        batch = windows[order[cursor: cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(batch, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    save_model(model, cfg.out_dir, tokenizer)
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "n_train_windows": len(windows),
        "n_tokens_seen": cfg.n_steps * cfg.batch_size * cfg.n_ctx,
        "n_params": sum(p.numel() for p in model.parameters()),
        "final_train_loss": loss.item(),
        "wall_s": round(time.monotonic() - start, 1),
    }
    log.info("model: %s", {k: v for k, v in summary.items() if k != "config"})
    return model, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-corpus", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    for name in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "n_steps", "batch_size", "warmup_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(ModelTrainConfig, name))
    parser.add_argument("--lr", type=float, default=ModelTrainConfig.lr)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return train_model(ModelTrainConfig(**vars(args)))[1]


if __name__ == "__main__":
    main()
