"""Step 4: train the default SAEs with sae_lens's own training runner.

The runner gets the trained model and a pre-tokenized, shuffled dataset of
BOS-first windows directly (``override_model``, ``override_dataset``), so
nothing is fetched from a hub. Each SAE is written in sae_lens's disk format
(``cfg.json`` + ``sae_weights.safetensors``), which ``SAE.load_from_disk`` reads.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)

from embedded.data import token_windows
from pipeline.models import load_model

log = logging.getLogger(__name__)

# Files the runner writes besides the weights and cfg.json: the training
# config and per-feature firing rates. Kept as provenance; both are small.
RUNNER_EXTRA_FILES = ("runner_cfg.json", "sparsity.safetensors")


@dataclass(frozen=True)
class SAESpec:
    name: str  # directory name under the output dir
    hook_name: str  # exactly TransformerLens's
    architecture: Literal["standard", "topk"]
    d_sae: int = 2048
    l1_coefficient: float = 5.0  # standard only: weight of the L1 penalty
    k: int = 32  # topk only: active features per token
    lr: float = 1e-3
    training_tokens: int = 2_000_000
    seed: int = 0


DEFAULT_SPECS = (
    SAESpec(name="resid_post_1_standard", hook_name="blocks.1.hook_resid_post", architecture="standard", seed=10),
    SAESpec(name="resid_post_2_topk", hook_name="blocks.2.hook_resid_post", architecture="topk", seed=20),
)


@dataclass(frozen=True)
class SAETrainConfig:
    model_dir: Path
    train_corpus: Path
    out_dir: Path
    specs: tuple[SAESpec, ...] = DEFAULT_SPECS
    context_size: int = 128
    train_batch_size_tokens: int = 4096
    # The runner's activation buffer holds n_batches_in_buffer * context_size
    # tokens per prompt batch; it must cover train_batch_size_tokens.
    n_batches_in_buffer: int = 32
    store_batch_size_prompts: int = 32
    # Batches used to estimate the activation norm (sae_lens's default of 1000 is far too slow on CPU).
    n_batches_for_norm_estimate: int = 20
    lr_warm_up_steps: int = 50
    # Steps without firing after which a feature counts as dead, so that the
    # TopK auxiliary loss starts to train it. sae_lens's default (1000) is
    # longer than the whole run here, which left over half the features dead.
    dead_feature_window: int = 50
    data_seed: int = 2  # shuffles the windows handed to the runner
    n_threads: int = 2

    def __post_init__(self) -> None:
        if self.n_batches_in_buffer * self.context_size < self.train_batch_size_tokens:
            raise ValueError(
                f"n_batches_in_buffer * context_size = {self.n_batches_in_buffer * self.context_size} tokens "
                f"is below train_batch_size_tokens = {self.train_batch_size_tokens}; raise n_batches_in_buffer."
            )


def sae_config(spec: SAESpec, d_in: int) -> StandardTrainingSAEConfig | TopKTrainingSAEConfig:
    common: dict[str, Any] = {"d_in": d_in, "d_sae": spec.d_sae, "normalize_activations": "expected_average_only_in"}
    if spec.architecture == "standard":
        return StandardTrainingSAEConfig(**common, l1_coefficient=spec.l1_coefficient, l1_warm_up_steps=100)
    return TopKTrainingSAEConfig(**common, k=spec.k)


def runner_config(cfg: SAETrainConfig, spec: SAESpec, model_name: str, d_in: int) -> LanguageModelSAERunnerConfig:
    n_steps = spec.training_tokens // cfg.train_batch_size_tokens
    return LanguageModelSAERunnerConfig(
        sae=sae_config(spec, d_in),
        model_name=model_name,
        # The model is ours, never processed by from_pretrained; an empty dict
        # records that and spares users sae_lens's "load it like so" warning.
        model_from_pretrained_kwargs={},
        hook_name=spec.hook_name,
        dataset_path=str(cfg.train_corpus),  # provenance only: the data comes from override_dataset
        is_dataset_tokenized=True,
        streaming=False,
        context_size=cfg.context_size,
        prepend_bos=True,
        training_tokens=spec.training_tokens,
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        lr=spec.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_scheduler_name="cosineannealing",
        lr_decay_steps=n_steps - cfg.lr_warm_up_steps,
        lr_end=spec.lr / 10,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.dead_feature_window,
        n_eval_batches=2,
        eval_batch_size_prompts=8,
        device="cpu",
        seed=spec.seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(cfg.out_dir / spec.name),
        verbose=False,
    )


def train_saes(cfg: SAETrainConfig) -> dict[str, Any]:
    """Train every SAE in ``cfg.specs`` in turn; return a summary per SAE."""
    torch.set_num_threads(cfg.n_threads)
    model = load_model(str(cfg.model_dir))
    windows = token_windows(cfg.train_corpus, model.tokenizer, cfg.context_size)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.data_seed))
    dataset = datasets.Dataset.from_dict({"input_ids": windows[order].tolist()})
    summaries: dict[str, Any] = {}
    for spec in cfg.specs:
        start = time.monotonic()
        runner_cfg = runner_config(cfg, spec, model.cfg.model_name, d_in=model.cfg.d_model)
        LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model).run()
        summaries[spec.name] = {**asdict(spec), "wall_s": round(time.monotonic() - start, 1)}
        log.info("sae %s: trained in %.0f s", spec.name, summaries[spec.name]["wall_s"])
    return summaries


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--train-corpus", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--training-tokens", type=int, default=None, help="override every SAE's token budget")
    parser.add_argument("--d-sae", type=int, default=None, help="override every SAE's width")
    parser.add_argument("--only", nargs="*", default=None, help="train only these SAE names")
    for name in ("context_size", "train_batch_size_tokens", "n_batches_in_buffer", "store_batch_size_prompts",
                 "n_batches_for_norm_estimate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(SAETrainConfig, name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("training_tokens", args.training_tokens), ("d_sae", args.d_sae)) if v is not None}
    specs = tuple(replace(s, **overrides) for s in DEFAULT_SPECS if args.only is None or s.name in args.only)
    cfg = SAETrainConfig(
        model_dir=args.model_dir, train_corpus=args.train_corpus, out_dir=args.out_dir, specs=specs,
        context_size=args.context_size, train_batch_size_tokens=args.train_batch_size_tokens,
        n_batches_in_buffer=args.n_batches_in_buffer, store_batch_size_prompts=args.store_batch_size_prompts,
        n_batches_for_norm_estimate=args.n_batches_for_norm_estimate,
    )
    return train_saes(cfg)


if __name__ == "__main__":
    main()
