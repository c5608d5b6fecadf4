"""Splice evaluation: the metric and the loss with SAEs spliced in, against the clean model and
against zero-ablating each hook, per prompt and per named partition of a dataset.

Notebook 000 splices SAEs at sets of layers with ``run_with_saes`` and compares logit
differences with the clean run; notebook 001 zero-ablates an MLP layer per task and shows that
splicing the SAE's reconstruction there repairs the behaviour. ``splice_eval`` runs all of
these conditions over the same prompts:

- ``clean``: the model alone;
- ``spliced``: the SAEs of one set spliced in together (``run_with_saes``; transcoders as
  ``TranscoderSplice`` splices them: their output hook's activation replaced by what they write);
- ``zero``: the activation an SAE's output replaces set to zeros (an SAE's own hook, a
  transcoder's output hook, e.g. the MLP's output for an MLP transcoder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.metrics import Metric, NextTokenLoss, accepts_prompts, check_metric_output
from pipeline.saes import TranscoderSplice, input_hook, is_transcoder, model_hook_problems, output_hook
from store.errors import ConfigError, did_you_mean
from store.format import saes_named_by

CONDITIONS = ("clean", "spliced", "zero")


def splice_eval(
    model,
    saes: Mapping[str, Any] | Sequence,
    sae_sets: Sequence[Sequence[str]],
    tokens: torch.Tensor,
    metric: Metric,
    *,
    partition: Sequence[str] | None = None,
    use_error_term: bool = False,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per prompt and condition: ``prompt``, ``partition``, ``condition``, ``target``, ``metric``, ``loss``.

    Args:
        saes: sae_lens SAEs and transcoders by name (``{"res_16k": sae, ...}``), or a list of them,
            each named by the hook it reads (a transcoder by its input hook).
        sae_sets: the sets of SAEs spliced in together, each SAE by its name, or by the hook it
            reads where only one SAE given reads it, e.g. ``[["blocks.0.hook_resid_post"],
            ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]]``.
        tokens: ``[n_prompts, seq]``.
        metric: logits to one value per prompt (see ``pipeline.metrics``). A metric that takes
            ``prompts=`` runs in batches of ``batch_size``; any other sees all prompts at once.
        partition: a label per prompt (e.g. its task); ``None`` puts every prompt in ``"all"``.
        use_error_term: as in sae_lens: spliced SAEs pass on reconstruction plus error (for a
            transcoder, the output hook's activation minus what it writes).
        attention_mask: for left-padded tokens; the loss skips padding.

    ``target`` is what a condition changes: for ``spliced``, its SAEs' names joined by ``+``; for
    ``zero``, the hook zeroed. ``loss`` is each prompt's mean next-token cross-entropy.
    Summarize with ``splice_summary``.
    """
    named, sets = _resolve_sets(model, saes, sae_sets)
    n_prompts = len(tokens)
    labels = np.full(n_prompts, "all", dtype=object) if partition is None else np.asarray(partition, dtype=object)
    if labels.shape != (n_prompts,):
        raise ConfigError(f"partition has {labels.size} labels for {n_prompts} prompts: give one label per prompt.")
    loss = NextTokenLoss(tokens, attention_mask)
    zero_hooks = list(dict.fromkeys(output_hook(named[name]) for names in sets for name in names))

    def spliced(batch, mask, chosen):
        splices = [TranscoderSplice(sae, use_error_term) for sae in chosen if is_transcoder(sae)]
        with model.hooks(fwd_hooks=[hook for splice in splices for hook in splice.hooks]):
            return model.run_with_saes(batch, saes=[sae for sae in chosen if not is_transcoder(sae)],
                                       use_error_term=use_error_term, attention_mask=mask)

    conditions = [("clean", "", lambda batch, mask: model(batch, attention_mask=mask))]
    for names in sets:
        chosen = [named[name] for name in names]
        conditions.append(("spliced", "+".join(names), lambda batch, mask, chosen=chosen: spliced(batch, mask, chosen)))
    for hook in zero_hooks:
        conditions.append(("zero", hook, lambda batch, mask, hook=hook: model.run_with_hooks(
            batch, attention_mask=mask, fwd_hooks=[(hook, _zero)])))

    step = batch_size if accepts_prompts(metric) else n_prompts
    frames = []
    for condition, target, run in conditions:
        metric_values, loss_values = _evaluate(run, tokens, attention_mask, metric, loss, step)
        frames.append(pd.DataFrame({"prompt": np.arange(n_prompts), "partition": labels, "condition": condition,
                                    "target": target, "metric": metric_values, "loss": loss_values}))
    return pd.concat(frames, ignore_index=True)


def splice_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean metric and loss per partition, condition and target, with the number of prompts."""
    return (frame.groupby(["partition", "condition", "target"], sort=False)
            .agg(metric=("metric", "mean"), loss=("loss", "mean"), n_prompts=("prompt", "size"))
            .reset_index())


def _zero(activation: torch.Tensor, hook) -> torch.Tensor:
    return torch.zeros_like(activation)


def _resolve_sets(model, saes: Mapping[str, Any] | Sequence, sae_sets: Sequence[Sequence[str]]
                  ) -> tuple[dict[str, Any], list[list[str]]]:
    """The SAEs by name, and each set as names; every problem with either, together."""
    if isinstance(saes, Mapping):
        named = dict(saes)
    else:
        named = {}
        for sae in saes:
            if input_hook(sae) in named:
                raise ConfigError(f"two SAEs read {input_hook(sae)}: give the SAEs by name, as {{name: sae}}.")
            named[input_hook(sae)] = sae
    problems = [f"{name}: {p}" for name, sae in named.items() for p in model_hook_problems(sae, model.hook_dict)]
    hooks = {name: input_hook(sae) for name, sae in named.items()}
    sets = []
    for keys in sae_sets:
        names = []
        for key in keys:
            at_hook = saes_named_by(key, hooks)
            if len(at_hook) == 1:
                names.append(at_hook[0])
            elif at_hook:
                problems.append(f"hook {key!r} is read by {len(at_hook)} of the SAEs given: {', '.join(at_hook)}. "
                                "Name one of them instead of the hook.")
            elif key in model.hook_dict:
                problems.append(f"no SAE was given for hook {key!r}; the SAEs given: "
                                f"{did_you_mean(key, list(named)) or 'none'}")
            else:
                problems.append(f"{key!r} names none of the SAEs given, and is not a hook of this model; the SAEs "
                                f"given: {did_you_mean(key, list(named)) or 'none'}")
        outputs = [output_hook(named[name]) for name in names]
        for name in names:
            if outputs.count(output_hook(named[name])) > 1:
                problems.append(f"set {'+'.join(keys)}: {name} and another SAE of the set both replace "
                                f"{output_hook(named[name])}; splice them in separate sets.")
                break
        sets.append(names)
    if not sae_sets:
        problems.append("no sets given: name at least one set of SAEs to splice in.")
    if problems:
        raise ConfigError(problems)
    return named, sets


@torch.no_grad()
def _evaluate(run, tokens: torch.Tensor, attention_mask: torch.Tensor | None, metric: Metric,
              loss: NextTokenLoss, step: int) -> tuple[np.ndarray, np.ndarray]:
    indexed = accepts_prompts(metric)
    metric_parts, loss_parts = [], []
    for start in range(0, len(tokens), step):
        prompts = torch.arange(start, min(len(tokens), start + step))
        mask = None if attention_mask is None else attention_mask[prompts]
        logits = run(tokens[prompts], mask)
        values = metric(logits, prompts=prompts) if indexed else metric(logits)
        metric_parts.append(check_metric_output(values, len(prompts)).float().cpu())
        loss_parts.append(loss(logits, prompts=prompts).float().cpu())
    return torch.cat(metric_parts).numpy(), torch.cat(loss_parts).numpy()
