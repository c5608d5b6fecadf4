"""Splice evaluation: the metric and the loss with SAEs spliced in, against the clean model and
against zero-ablating each hook, per prompt and per named partition of a dataset.

Notebook 000 splices SAEs at sets of layers with ``run_with_saes`` and compares logit
differences with the clean run; notebook 001 zero-ablates an MLP layer per task and shows that
splicing the SAE's reconstruction there repairs the behaviour. ``splice_eval`` runs all of
these conditions over the same prompts:

- ``clean``: the model alone;
- ``spliced``: the SAEs of one hook set spliced in together (``run_with_saes``; transcoders as
  ``TranscoderSplice`` splices them: their output hook's activation replaced by what they write);
- ``zero``: the activation an SAE's output replaces set to zeros (an SAE's own hook, a
  transcoder's output hook, e.g. the MLP's output for an MLP transcoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.metrics import Metric, NextTokenLoss, accepts_prompts, check_metric_output
from pipeline.saes import TranscoderSplice, input_hook, is_transcoder, model_hook_problems, output_hook
from store.errors import ConfigError, did_you_mean

CONDITIONS = ("clean", "spliced", "zero")


def splice_eval(
    model,
    saes: Sequence,
    hook_sets: Sequence[Sequence[str]],
    tokens: torch.Tensor,
    metric: Metric,
    *,
    partition: Sequence[str] | None = None,
    use_error_term: bool = False,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per prompt and condition: ``prompt``, ``partition``, ``condition``, ``hooks``, ``metric``, ``loss``.

    Args:
        saes: sae_lens SAEs and transcoders, at most one reading each hook.
        hook_sets: the sets of hooks spliced in together, e.g. ``[["blocks.0.hook_resid_post"],
            ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]]``; every hook needs an SAE
            reading it (a transcoder is named by its input hook).
        tokens: ``[n_prompts, seq]``.
        metric: logits to one value per prompt (see ``pipeline.metrics``). A metric that takes
            ``prompts=`` runs in batches of ``batch_size``; any other sees all prompts at once.
        partition: a label per prompt (e.g. its task); ``None`` puts every prompt in ``"all"``.
        use_error_term: as in sae_lens: spliced SAEs pass on reconstruction plus error (for a
            transcoder, the output hook's activation minus what it writes).
        attention_mask: for left-padded tokens; the loss skips padding.

    ``loss`` is each prompt's mean next-token cross-entropy. Summarize with ``splice_summary``.
    """
    by_hook = _saes_by_hook(model, saes, hook_sets)
    n_prompts = len(tokens)
    labels = np.full(n_prompts, "all", dtype=object) if partition is None else np.asarray(partition, dtype=object)
    if labels.shape != (n_prompts,):
        raise ConfigError(f"partition has {labels.size} labels for {n_prompts} prompts: give one label per prompt.")
    loss = NextTokenLoss(tokens, attention_mask)
    zero_hooks = list(dict.fromkeys(output_hook(by_hook[h]) for hooks in hook_sets for h in hooks))

    def spliced(batch, mask, chosen):
        splices = [TranscoderSplice(sae, use_error_term) for sae in chosen if is_transcoder(sae)]
        with model.hooks(fwd_hooks=[hook for splice in splices for hook in splice.hooks]):
            return model.run_with_saes(batch, saes=[sae for sae in chosen if not is_transcoder(sae)],
                                       use_error_term=use_error_term, attention_mask=mask)

    conditions = [("clean", "", lambda batch, mask: model(batch, attention_mask=mask))]
    for hooks in hook_sets:
        chosen = [by_hook[h] for h in hooks]
        conditions.append(("spliced", "+".join(hooks), lambda batch, mask, chosen=chosen: spliced(batch, mask, chosen)))
    for hook in zero_hooks:
        conditions.append(("zero", hook, lambda batch, mask, hook=hook: model.run_with_hooks(
            batch, attention_mask=mask, fwd_hooks=[(hook, _zero)])))

    step = batch_size if accepts_prompts(metric) else n_prompts
    frames = []
    for condition, hooks, run in conditions:
        metric_values, loss_values = _evaluate(run, tokens, attention_mask, metric, loss, step)
        frames.append(pd.DataFrame({"prompt": np.arange(n_prompts), "partition": labels, "condition": condition,
                                    "hooks": hooks, "metric": metric_values, "loss": loss_values}))
    return pd.concat(frames, ignore_index=True)


def splice_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean metric and loss per partition, condition and hook set, with the number of prompts."""
    return (frame.groupby(["partition", "condition", "hooks"], sort=False)
            .agg(metric=("metric", "mean"), loss=("loss", "mean"), n_prompts=("prompt", "size"))
            .reset_index())


def _zero(activation: torch.Tensor, hook) -> torch.Tensor:
    return torch.zeros_like(activation)


def _saes_by_hook(model, saes: Sequence, hook_sets: Sequence[Sequence[str]]) -> dict:
    by_hook = {}
    problems = []
    for sae in saes:
        hook = input_hook(sae)
        if hook in by_hook:
            raise ConfigError(f"two SAEs read {hook}: give one SAE per hook.")
        by_hook[hook] = sae
        problems.extend(model_hook_problems(sae, model.hook_dict) if is_transcoder(sae) else [])
    for hooks in hook_sets:
        for hook in hooks:
            if hook not in model.hook_dict:
                problems.append(f"hook {hook!r} is not a hook of this model; it has: "
                                f"{did_you_mean(hook, list(model.hook_dict))}")
            elif hook not in by_hook:
                problems.append(f"no SAE was given for hook {hook!r}; the SAEs given read: "
                                f"{did_you_mean(hook, list(by_hook)) or 'nothing'}")
        outputs = [output_hook(by_hook[h]) for h in hooks if h in by_hook]
        for hook in hooks:
            sae = by_hook.get(hook)
            if sae is not None and is_transcoder(sae) and outputs.count(output_hook(sae)) > 1:
                problems.append(f"hook set {'+'.join(hooks)}: the transcoder reading {hook} and another SAE both "
                                f"replace {output_hook(sae)}; splice them in separate hook sets.")
    if not hook_sets:
        problems.append("no hook sets given: name at least one set of hooks to splice SAEs into.")
    if problems:
        raise ConfigError(problems)
    return by_hook


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
