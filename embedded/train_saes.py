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
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from sae_lens.saes.topk_sae import act_times_W_dec, calculate_topk_aux_acts

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
    aux_loss_coefficient: float = 1.0  # topk only: weight of the auxiliary loss that trains dead features
    # topk only: dead features the auxiliary loss reconstructs the residual with, per token (see AuxKTopKSAE);
    # None keeps sae_lens's own auxiliary loss (d_in // 2 of them)
    aux_k: int | None = None
    # "zeros" (sae_lens's) or "mean": start the decoder bias at the mean activation (see initial_b_dec)
    b_dec_init: Literal["zeros", "mean"] = "zeros"
    # "random" (sae_lens's: random unit rows times decoder_init_norm, encoder tied) or "data": rows are
    # centred activations drawn from the training windows, scaled the same way (see initial_sae)
    decoder_init: Literal["random", "data"] = "random"
    lr: float = 1e-3
    training_tokens: int = 2_000_000
    seed: int = 0


DEFAULT_SPECS = (
    SAESpec(name="resid_post_1_standard", hook_name="blocks.1.hook_resid_post", architecture="standard", seed=10),
    # Started from the data (see initial_sae): with sae_lens's random start, 43 to 64% of the
    # features died in trials, whatever the auxiliary loss's weight or size. 640 wide: the widest
    # measured that keeps at most 10% dead over the full run (2048 left 33%, 1024 17%, 768 12%;
    # pipeline/default/README.md).
    SAESpec(name="resid_post_2_topk", hook_name="blocks.2.hook_resid_post", architecture="topk", d_sae=640,
            seed=20, b_dec_init="mean", decoder_init="data"),
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
    # First shuffled windows whose activations start b_dec (b_dec_init="mean") and the decoder (decoder_init="data").
    n_windows_for_init: int = 256
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
    return TopKTrainingSAEConfig(**common, k=spec.k, aux_loss_coefficient=spec.aux_loss_coefficient)


class AuxKTopKSAE(TopKTrainingSAE):
    """sae_lens's TopK training SAE with a chosen number of dead features in its auxiliary loss.

    The auxiliary loss (Gao et al. 2024, appendix A.2) reconstructs the live features' residual
    from the ``aux_k`` dead features with the largest positive pre-activations (the ReLU as in the
    paper and EleutherAI's ``sparsify``; sae_lens 6.54 also takes negative ones). sae_lens fixes
    ``aux_k`` at ``d_in // 2``. Only training changes: the saved SAE is an ordinary ``topk`` SAE.
    """

    def __init__(self, cfg: TopKTrainingSAEConfig, aux_k: int):
        super().__init__(cfg)
        self.aux_k = aux_k

    def calculate_topk_aux_loss(self, sae_in: torch.Tensor, sae_out: torch.Tensor, hidden_pre: torch.Tensor,
                                dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        if dead_neuron_mask is None or (n_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (sae_in - sae_out).detach()
        acts = calculate_topk_aux_acts(min(self.aux_k, n_dead), hidden_pre.relu(), dead_neuron_mask)
        recons = act_times_W_dec(acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        # As sae_lens: the loss is scaled down while fewer than aux_k features are dead.
        scale = min(n_dead / self.aux_k, 1.0)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def scaled_activations(model: Any, hook_name: str, windows: torch.Tensor, d_in: int) -> torch.Tensor:
    """``[n_tokens, d_in]`` activations at ``hook_name`` over ``windows``, in the units the SAE trains in.

    Training scales inputs by ``sqrt(d_in) / mean norm`` (``expected_average_only_in``); the
    same factor, measured on these windows, is applied here.
    """
    layer = int(hook_name.split(".")[1])
    _, cache = model.run_with_cache(windows, names_filter=hook_name, stop_at_layer=layer + 1, return_type=None)
    acts = cache[hook_name].flatten(0, 1)
    return acts * (d_in**0.5 / acts.norm(dim=-1).mean())


def initial_sae(cfg: SAETrainConfig, spec: SAESpec, runner_cfg: LanguageModelSAERunnerConfig, model: Any,
                windows: torch.Tensor) -> TopKTrainingSAE | None:
    """The SAE to start from where ``spec`` asks for more than sae_lens's own start; None otherwise."""
    if spec.aux_k is None and spec.b_dec_init == "zeros" and spec.decoder_init == "random":
        return None
    if spec.architecture != "topk":
        raise ValueError(f"{spec.name}: aux_k, b_dec_init and decoder_init are implemented for topk SAEs only.")
    sae_cfg = TopKTrainingSAEConfig.from_dict(runner_cfg.get_training_sae_cfg_dict())  # as the runner builds it
    sae = TopKTrainingSAE(sae_cfg) if spec.aux_k is None else AuxKTopKSAE(sae_cfg, aux_k=spec.aux_k)
    if spec.b_dec_init == "zeros" and spec.decoder_init == "random":
        return sae
    acts = scaled_activations(model, spec.hook_name, windows[: cfg.n_windows_for_init], sae.cfg.d_in)
    mean = acts.mean(0)
    if spec.b_dec_init == "mean":
        sae.b_dec.data = mean
    if spec.decoder_init == "data":
        if len(acts) < sae.cfg.d_sae:
            raise ValueError(f"{spec.name}: decoder_init='data' needs {sae.cfg.d_sae} activations; "
                             f"{cfg.n_windows_for_init} windows give {len(acts)}. Raise n_windows_for_init.")
        pick = torch.randperm(len(acts), generator=torch.Generator().manual_seed(spec.seed))[: sae.cfg.d_sae]
        rows = acts[pick] - mean
        rows = rows / rows.norm(dim=-1, keepdim=True) * (sae.cfg.decoder_init_norm or 1.0)
        sae.W_dec.data = rows.contiguous()
        sae.W_enc.data = rows.T.clone().contiguous()
    return sae


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
        # sae_lens does not seed torch itself; seeding here makes each SAE's start independent of the others.
        torch.manual_seed(spec.seed)
        runner_cfg = runner_config(cfg, spec, model.cfg.model_name, d_in=model.cfg.d_model)
        sae = initial_sae(cfg, spec, runner_cfg, model, windows[order])
        LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model,
                                       override_sae=sae).run()
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
    parser.add_argument("--lr", type=float, default=None, help="override every SAE's learning rate")
    parser.add_argument("--k", type=int, default=None, help="override every TopK SAE's k")
    parser.add_argument("--aux-loss-coefficient", type=float, default=None,
                        help="override every TopK SAE's auxiliary loss weight")
    parser.add_argument("--aux-k", type=int, default=None, help="override every TopK SAE's aux_k")
    parser.add_argument("--b-dec-init", choices=("zeros", "mean"), default=None, help="override every SAE's b_dec_init")
    parser.add_argument("--decoder-init", choices=("random", "data"), default=None,
                        help="override every SAE's decoder_init")
    parser.add_argument("--dead-feature-window", type=int, default=SAETrainConfig.dead_feature_window)
    parser.add_argument("--n-threads", type=int, default=SAETrainConfig.n_threads)
    for name in ("context_size", "train_batch_size_tokens", "n_batches_in_buffer", "store_batch_size_prompts",
                 "n_batches_for_norm_estimate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(SAETrainConfig, name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {name: value for name in ("training_tokens", "d_sae", "lr", "k", "aux_loss_coefficient",
                                          "aux_k", "b_dec_init", "decoder_init")
                 if (value := getattr(args, name)) is not None}
    specs = tuple(replace(s, **overrides) for s in DEFAULT_SPECS if args.only is None or s.name in args.only)
    cfg = SAETrainConfig(
        model_dir=args.model_dir, train_corpus=args.train_corpus, out_dir=args.out_dir, specs=specs,
        context_size=args.context_size, train_batch_size_tokens=args.train_batch_size_tokens,
        n_batches_in_buffer=args.n_batches_in_buffer, store_batch_size_prompts=args.store_batch_size_prompts,
        n_batches_for_norm_estimate=args.n_batches_for_norm_estimate,
        dead_feature_window=args.dead_feature_window, n_threads=args.n_threads,
    )
    return train_saes(cfg)


if __name__ == "__main__":
    main()
