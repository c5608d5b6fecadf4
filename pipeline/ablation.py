"""Feature ablation sweeps: the change in a metric when one SAE feature is ablated, for every
(prompt, feature) pair, with the numbers of the seed notebooks' loop and far fewer forwards.

Notebook 000 measures a feature's effect with one full forward per feature::

    baseline = metric(model.run_with_saes(tokens, saes=[sae]))
    for f in live_features:
        ablated = model.run_with_hooks_with_saes(
            tokens, saes=[sae], fwd_hooks=[(f"{hook}.hook_sae_acts_post", zero_feature_f_at_pos)])
        delta[:, f] = metric(ablated) - baseline

``ablation_sweep`` computes the same ``delta`` exactly, faster, because:

- **The decoder is linear.** The spliced SAE's output is ``decode(a)`` (plus the error
  term ``x - decode(a)`` when ``use_error_term``, computed from the un-ablated ``a``), so
  changing feature ``f`` from ``a_f`` to ``a_f'`` changes the hook's output by exactly
  ``(a_f' - a_f) * W_dec[f]`` (divided by ``|W_dec[f]|`` for TopK SAEs with
  ``rescale_acts_by_decoder_norm``; times the token's ``decoder_scale`` for SAEs that
  normalise activations at run time). Nothing is re-encoded.
- **Transcoders** change their output hook: the baseline splices them with
  ``TranscoderSplice`` (reconstruction plus skip path, plus error), and each ablation
  changes the output hook's activation by ``(a_f' - a_f) * W_dec[f]``.
- **Only changes are run.** A (prompt, feature) pair whose activation the ablation leaves
  as it is (a zero-ablated feature that does not fire there) has ``delta == 0`` exactly and
  costs nothing.
- **Many ablations share a forward**: one copy of the prompt per ablated feature, batched.
- **The forward starts at the SAE's layer** (``start_at_layer``) from the residual stream
  cached by the one baseline run; for ``hook_resid_post`` it starts one block later.
- **Only the positions an ablation changes are run.** Attention is causal, so an ablation at
  position p changes nothing before p: the copy runs positions p and later against the
  baseline's cached keys and values of the earlier ones (``pipeline.resume``). At the last
  position that is one token; with ``position=None``, a feature's copy runs from the first
  position where it fires.

``method="attribution"`` ranks every feature with one forward and one backward instead:
the estimate ``(a_f' - a_f) * d metric / d a_f`` (``-a_f * grad`` for zero ablation). It
is a first-order approximation with known misses; ``verify_top=N`` recomputes the N
strongest features exactly, and the ``method`` column says which number is which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.metrics import Metric, accepts_prompts, check_metric_output, positions_read
from pipeline.resume import Resume
from pipeline.saes import (RUN_TIME_NORMALIZATIONS, TranscoderSplice, decoder_scale, input_hook, is_transcoder,
                           model_hook_problems, output_hook)
from store.arguments import is_finite_number, is_whole, whole_number, whole_numbers
from store.errors import ConfigError

Ablation = Literal["zero", "mean"] | float
Features = Literal["live"] | Sequence[int]
PositionSpec = int | Sequence[int] | None

# sae_lens applies no run-time transform for these (their factors are folded into the weights on loading).
LINEAR_DECODE_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")


# -- prompts that are rows of a store ----------------------------------------------------------


@dataclass(frozen=True)
class StorePrompts:
    """Dataset rows of a store used as prompts: their tokens (left-padded, as notebook 000 pads)
    and where each lies in the store, so that a sweep reads live features and means from it, those
    of the store's SAE ``sae``."""

    store: Any  # store.FeatureStore
    rows: np.ndarray  # int64 [n_prompts]: dataset rows
    token_start: np.ndarray  # int64 [n_prompts]: store index of each prompt's first token
    lengths: np.ndarray  # int64 [n_prompts]
    tokens: torch.Tensor  # long [n_prompts, seq], left-padded
    attention_mask: torch.Tensor | None  # [n_prompts, seq], 0 at padding; None when nothing is padded
    sae: str | None = None  # the store's SAE swept, by name; None: the one at the swept SAE's hook

    @classmethod
    def from_store(cls, store, rows: Sequence[int], pad_token_id: int = 0, sae: str | None = None) -> StorePrompts:
        """Each row must fit in one window of the store (a prompt is what the model saw at once).
        ``sae`` names the store's SAE that is swept (a hook where one SAE sits); it is needed when
        several SAEs read the swept SAE's hook."""
        rows = whole_numbers("rows", rows, "dataset rows of the store")
        stored_rows = store.provenance()["row"].to_numpy()  # ascending: the store is in row order
        starts = np.searchsorted(stored_rows, rows, side="left")
        stops = np.searchsorted(stored_rows, rows, side="right")
        missing = rows[starts == stops]
        if len(missing):
            raise ConfigError(
                f"dataset rows {missing[:10].tolist()} are not in store {store.location} (empty rows make "
                f"no tokens; a --max-tokens run stops early). It holds rows {stored_rows[0]}..{stored_rows[-1]}."
            )
        context = store.run["context_size"]
        lengths = stops - starts
        long_rows = rows[lengths > context]
        if len(long_rows):
            held, tokens_of = np.unique(stored_rows, return_counts=True)
            fit = held[tokens_of <= context]
            shown = ", ".join(map(str, fit[:10])) + (", ..." if len(fit) > 10 else "")
            raise ConfigError(
                f"dataset rows {long_rows[:10].tolist()} span several {context}-token windows of the store; "
                "a prompt must be one window. "
                + (f"Rows that fit in one: {shown} ({len(fit)} of the {len(held)} rows it holds)." if len(fit) else
                   "None of its rows fits in one: give prompts in a file instead.")
            )
        tokens, mask = left_pad([torch.from_numpy(store.token_ids(int(start), int(start + n)).astype(np.int64))
                                 for start, n in zip(starts, lengths)], pad_token_id)
        return cls(store, rows, starts.astype(np.int64), lengths.astype(np.int64), tokens, mask, sae)

    def live_features(self, sae: str, positions: torch.Tensor | None) -> np.ndarray:
        """Features that the store's SAE ``sae`` saw firing at each prompt's ablated position (all
        its tokens for None)."""
        seq = self.tokens.shape[1]
        picked = []
        for i, (start, n) in enumerate(zip(self.token_start, self.lengths)):
            if positions is None:
                picked.append(np.arange(start, start + n))
            else:  # left padding: position p of the padded prompt is token p - (seq - n) of the row
                picked.append(np.array([start + int(positions[i]) - (seq - n)]))
        index = np.concatenate(picked)
        lo, hi = int(index.min()), int(index.max()) + 1
        csr = self.store.csr(sae, lo, hi)[index - lo]
        return np.unique(csr.indices).astype(np.int64)


def left_pad(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token sequences as one left-padded batch (as notebook 000 pads), and its attention mask:
    1 at each real token, 0 at padding; None when nothing is padded."""
    seq = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), seq), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), seq), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, seq - len(p):], mask[i, seq - len(p):] = p, 1
    return tokens, None if bool(mask.all()) else mask


def mean_activations(store, sae: str) -> np.ndarray:
    """Each feature's mean activation over every token of the store, zeros included: the value
    that notebook-style mean ablation puts in. Read from the per-feature statistics of the
    store's SAE ``sae`` (a name, or a hook where one SAE sits)."""
    return store.feature_stats(sae)["mean_all"].to_numpy(np.float32)


# -- the sweep -----------------------------------------------------------------------------------


@dataclass
class Baseline:
    """One spliced run over a batch of prompts: what every ablation of them is compared with and
    built from. ``spliced_baseline`` makes it; several ``ablation_sweep`` calls over the same
    prompts (each with a block of features) can share it."""

    sae: Any
    tokens: torch.Tensor  # [n_prompts, seq], on the model's device
    metric: Metric
    use_error_term: bool
    resume: Resume  # finishes the ablated copies' forwards from the SAE's output hook
    runner: MetricRunner
    values: torch.Tensor  # [n_prompts]: the metric
    acts: torch.Tensor  # [n_prompts, seq, d_sae]: hook_sae_acts_post
    hook_out: torch.Tensor  # [n_prompts, seq, d_out]: what the spliced SAE passed on at its output hook
    scale: torch.Tensor | None = None  # [n_prompts, seq, 1]: decoder_scale, for run-time normalisation


class MetricRunner:
    """Evaluates the metric on rows that are copies of any prompts, given their logits from some
    position on (the earlier positions' are the baseline's; see ``pipeline.resume``), or only the
    last positions' where the metric reads no others (``tail``).

    A metric that accepts ``prompts=`` is told which prompt each row is. Any other metric
    sees whole batches in prompt order: the baseline's logits with some rows swapped for
    ablated copies, each copy of a prompt in its own batch (one buffer, whose swapped rows are
    put back after each call: the metric must not write to it). Which positions a metric reads is
    known from a built-in's ``position`` (one per prompt, counted from the end), or from a trace of
    a plain metric (``positions_read``); one that reads only positions from the end within the
    given ones reads the given logits as they are; any other gets every position's.
    """

    def __init__(self, metric: Metric, baseline_logits: torch.Tensor):
        self.metric, self.baseline_logits = metric, baseline_logits
        self.n_prompts = len(baseline_logits)
        self.indexed = accepts_prompts(metric)
        # the positions read: of each prompt ([n_prompts], a built-in's), of every prompt ([n], a plain
        # metric's), or None when the metric may read any
        if self.indexed:
            position = getattr(metric, "position", None)
            known = isinstance(position, torch.Tensor) and position.shape == (self.n_prompts,)
            self._read = position if known else None
        else:
            self._read = positions_read(metric, baseline_logits)
        self._batch: torch.Tensor | None = None  # what a plain metric is given: the baseline's, rows swapped in

    def all_prompts(self) -> torch.Tensor:
        """The metric of the baseline."""
        logits = self.baseline_logits.clone()  # kept as it is, whatever the metric does with its input
        values = self.metric(logits, prompts=torch.arange(len(logits))) if self.indexed else self.metric(logits)
        return check_metric_output(values, self.n_prompts)

    def __call__(self, logits: torch.Tensor, prompts: torch.Tensor, since: int = 0,
                 tail: int | None = None) -> torch.Tensor:
        """The metric of copies of ``prompts`` whose logits from position ``since`` on are ``logits``
        (only the last ``tail`` positions' when ``tail`` is what ``self.tail`` said for them)."""
        if self.indexed:
            if since and tail is None:
                logits = torch.cat([self.baseline_logits[prompts.to(logits.device), :since].to(logits.dtype), logits], 1)
            return check_metric_output(self.metric(logits, prompts=prompts), len(prompts))
        out = torch.empty(len(prompts), dtype=torch.float32)
        seen: dict[int, int] = {}
        rounds: list[list[int]] = []
        for row, prompt in enumerate(prompts.tolist()):
            k = seen[prompt] = seen.get(prompt, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(row)
        shared = not logits.requires_grad  # a gradient needs each round's batch as it was
        if shared and self._batch is None:
            self._batch = self.baseline_logits.clone()
        given = self.baseline_logits.shape[1] - logits.shape[1]  # the first position ``logits`` holds
        for rows in rounds:
            rows_t = torch.tensor(rows)
            batch = self._batch if shared else self.baseline_logits.clone()
            swapped = prompts[rows_t].to(batch.device)
            batch[swapped, given:] = logits[rows_t.to(logits.device)].to(batch.dtype)
            values = check_metric_output(self.metric(batch), self.n_prompts)
            out[rows_t] = values[prompts[rows_t]].float().cpu()
            if shared:
                batch[swapped, given:] = self.baseline_logits[swapped, given:]  # the baseline's again
        return out

    def check_unmodified(self) -> None:
        """A plain metric is given one batch of logits, round after round, with rows swapped in and
        back: refuse the results if the metric changed it in place."""
        if self._batch is not None and not torch.equal(self._batch, self.baseline_logits):
            raise ConfigError("the metric changed the logits it was given in place, so the sweep's other numbers "
                              "would be wrong: compute from them without writing to them (e.g. "
                              "logits.log_softmax(-1), not logits.log_softmax_(-1)), or accept prompts= (see "
                              "pipeline.metrics).")

    def tail(self, prompts: torch.Tensor, since: int) -> int | None:
        """How many of the last positions the metric reads for these prompts, when it reads only
        positions counted from the end at ``since`` or later: then the logits of those positions
        alone serve it. None when it may read any."""
        if self._read is None:
            return None
        read = self._read[prompts.to(self._read.device)] if self.indexed else self._read
        seq = self.baseline_logits.shape[1]
        if not ((read < 0) & (read >= since - seq)).all():
            return None
        return int(-read.min())


def ablation_sweep(
    model,
    sae,
    tokens: torch.Tensor | StorePrompts,
    metric: Metric,
    features: Features = "live",
    position: PositionSpec = -1,
    use_error_term: bool = False,
    ablation: Ablation = "zero",
    *,
    method: Literal["exact", "attribution"] = "exact",
    verify_top: int | None = None,
    means: np.ndarray | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = False,
    baseline: Baseline | None = None,
) -> pd.DataFrame:
    """The metric with each feature ablated minus the metric of the spliced baseline.

    Args:
        model: a ``HookedSAETransformer``.
        sae: a sae_lens SAE or transcoder; its ``cfg.metadata.hook_name`` says what it reads, and
            a transcoder's ``hook_name_out`` which activation its output replaces.
        tokens: ``[n_prompts, seq]`` token ids, or ``StorePrompts`` (rows of a store, whose
            live features and mean activations then come from the store's SAE ``tokens.sae``,
            by default the one at the SAE's hook).
        metric: logits ``[batch, seq, vocab]`` to ``[batch]``; see ``pipeline.metrics``.
        features: ``"live"`` (every feature active at the ablated position of any prompt, as in
            notebook 000) or a list of feature ids.
        position: the position ablated, one per prompt, or None for every position.
        use_error_term: sae_lens's meaning: the spliced SAE passes on its reconstruction plus the
            error term computed from the un-ablated activations, so the baseline is the clean model.
            For a transcoder the error is the output hook's clean activation minus what the
            transcoder writes from its input (skip path included).
        ablation: ``"zero"``; ``"mean"``: the feature's mean activation over all tokens of the store,
            zeros included (or ``means[f]``); a number ``s``: the activation times ``s``.
        method: ``"exact"``, or ``"attribution"`` for the gradient-times-change estimate.
        verify_top: with attribution, recompute the N features of largest estimated effect exactly.
        means: ``[d_sae]`` mean activations for ``ablation="mean"``; overrides the store's.
        attention_mask: for left-padded ``tokens``, as TransformerLens takes it.
        batch_size: prompt copies per forward.
        baseline: ``spliced_baseline`` of these prompts with this SAE, metric and error term, to share
            among calls that each ablate a block of features; made here when None.

    Returns:
        One line per (prompt, feature): ``prompt``, ``feature``, ``delta``, ``method`` (which
        method produced ``delta``), ``attribution`` (with ``method="attribution"``), and the
        store's dataset ``row`` when the prompts come from a store.
    """
    store_prompts = tokens if isinstance(tokens, StorePrompts) else None
    if store_prompts is not None:
        tokens, attention_mask = store_prompts.tokens, store_prompts.attention_mask
    _check_inputs(model, sae, tokens, ablation, method, verify_top, batch_size)
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    n_prompts, seq = tokens.shape
    positions = resolve_positions(position, n_prompts, seq, attention_mask)
    store_sae = None if store_prompts is None else _store_sae(store_prompts, sae)
    means = _means(ablation, means, store_prompts, store_sae, sae.cfg.d_sae)

    if baseline is None:
        baseline = spliced_baseline(model, sae, tokens, metric, use_error_term, attention_mask)
    elif not (baseline.sae is sae and baseline.metric is metric and baseline.use_error_term == use_error_term
              and torch.equal(baseline.tokens, tokens)):
        raise ConfigError("baseline= was made for other prompts, another SAE or metric, or the other use_error_term: "
                          "make it with spliced_baseline(model, sae, tokens, metric, use_error_term, attention_mask) "
                          "for these.")

    if isinstance(features, str):
        if features != "live":
            raise ConfigError(f"features={features!r}: give 'live' or a list of feature ids.")
        feature_ids = (store_prompts.live_features(store_sae, positions) if store_prompts is not None
                       else live_features(baseline.acts, positions, attention_mask))
    else:
        feature_ids = check_feature_ids(features, sae.cfg.d_sae)

    ids = torch.from_numpy(feature_ids).to(device)
    directions = decoder_directions(sae, ids).to(baseline.hook_out.dtype)
    acts = baseline.acts[..., ids]  # [n, seq, n_features]
    change = ablated_values(acts, ablation, None if means is None else torch.from_numpy(means)[ids.cpu()].to(acts)) - acts
    if positions is not None:  # only the ablated position changes
        keep = torch.zeros_like(change, dtype=torch.bool)
        keep[torch.arange(n_prompts), positions.to(device)] = True
        change = change * keep

    frame = pd.DataFrame({
        "prompt": np.repeat(np.arange(n_prompts), len(feature_ids)),
        "feature": np.tile(feature_ids, n_prompts),
    })
    if method == "exact":
        delta = exact_deltas(baseline, directions, change, batch_size, progress)
        frame["delta"] = delta.reshape(-1).numpy().astype(np.float64)
        frame["method"] = "exact"
    else:
        estimate = attribution_estimates(baseline, directions, change, batch_size)
        frame["delta"] = estimate.reshape(-1).numpy().astype(np.float64)
        frame["method"] = "attribution"
        frame["attribution"] = frame["delta"]
        if verify_top:
            top = torch.argsort(estimate.abs().amax(0), descending=True)[:verify_top]
            exact = exact_deltas(baseline, directions[top], change[..., top], batch_size, progress)
            rows = (np.arange(n_prompts)[:, None] * len(feature_ids) + top.numpy()[None, :]).reshape(-1)
            frame.loc[rows, "delta"] = exact.reshape(-1).numpy().astype(np.float64)
            frame.loc[rows, "method"] = "exact"
    if store_prompts is not None:
        frame.insert(1, "row", store_prompts.rows[frame["prompt"].to_numpy()])
    frame.attrs["baseline"] = baseline.values.cpu().tolist()
    return frame


def _check_inputs(model, sae, tokens, ablation: Ablation, method: str, verify_top: int | None,
                  batch_size: int) -> None:
    problems = model_hook_problems(sae, model.hook_dict)
    if problems:
        raise ConfigError(problems)
    if not is_ablation(ablation):
        raise ConfigError(f"ablation={ablation!r}: use 'zero', 'mean' or a finite scale factor such as 0.5.")
    normalization = getattr(sae.cfg, "normalize_activations", "none")
    if normalization not in LINEAR_DECODE_NORMALIZATIONS + RUN_TIME_NORMALIZATIONS:
        raise ConfigError(
            f"the SAE at {input_hook(sae)} normalizes activations as {normalization!r}, which this sweep does not know "
            f"how to decode; it knows {', '.join(LINEAR_DECODE_NORMALIZATIONS + RUN_TIME_NORMALIZATIONS)}. "
            "Fold the normalization into the weights, or ablate with run_with_hooks_with_saes."
        )
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
        raise ConfigError("tokens must be an integer tensor [n_prompts, seq] (or StorePrompts.from_store(...)).")
    if method not in ("exact", "attribution"):
        raise ConfigError(f"method={method!r}: use 'exact' or 'attribution'.")
    if verify_top is not None and (method != "attribution" or verify_top < 0):
        raise ConfigError("verify_top=N re-checks attribution's N strongest features: use it with method='attribution', N >= 0.")
    whole_number("batch_size", batch_size, 1, "how many prompt copies each forward runs")
    if verify_top is not None:
        whole_number("verify_top", verify_top, 0, "how many of attribution's strongest features to recompute")


def is_ablation(kind: Any) -> bool:
    """Whether ``kind`` is an ablation: "zero", "mean" or a finite scale factor."""
    if isinstance(kind, str):
        return kind in ("zero", "mean")
    return isinstance(kind, (int, float)) and is_finite_number(kind)  # a plain number: the record is JSON


def resolve_positions(position: PositionSpec, n_prompts: int, seq: int,
                      attention_mask: torch.Tensor | None, first: int = 0) -> torch.Tensor | None:
    """Non-negative position per prompt (None: every position), refusing positions outside a prompt
    (its errors number the prompts from ``first``)."""
    if position is None:
        return None
    if not is_whole(position):  # as_tensor would take 1.5 for 1
        whole_numbers("position", position, "the position ablated, one per prompt (or one for all, or None)")
    pos = torch.as_tensor(position, dtype=torch.long)
    if pos.ndim == 0:
        pos = pos.expand(n_prompts)
    if pos.shape != (n_prompts,):
        raise ConfigError(f"position gives {pos.numel()} indices for {n_prompts} prompts: give one, or one per prompt.")
    problems = []
    for i, p in enumerate(pos.tolist()):
        if not -seq <= p < seq:
            problems.append(f"position {p} is outside prompt {first + i}, which has {seq} tokens "
                            f"(valid: {-seq}..{seq - 1}).")
        elif attention_mask is not None and not attention_mask[i, p]:
            problems.append(f"position {p} of prompt {first + i} is padding, not one of the prompt's tokens.")
    if problems:
        more = [f"... and {len(problems) - 10} more prompts like these"] if len(problems) > 10 else []
        raise ConfigError(problems[:10] + more)
    return pos % seq


def _store_sae(prompts: StorePrompts, sae) -> str:
    """The name of the store's SAE that is ``sae``: the one the prompts name, else the one at its
    hook. One of another hook or width would give live features and means of another SAE."""
    try:
        record = prompts.store.sae_record(prompts.sae or input_hook(sae))
    except ConfigError as e:
        e.add_note("Name the store's SAE that is swept: StorePrompts.from_store(store, rows, sae=NAME).")
        raise
    if (record["hook"], record["d_sae"]) != (input_hook(sae), sae.cfg.d_sae):
        raise ConfigError(
            f"the store's SAE {record['name']!r} reads {record['hook']} with {record['d_sae']} features, but the "
            f"SAE swept reads {input_hook(sae)} with {sae.cfg.d_sae}: the store's live features and means are "
            "another SAE's. Sweep the store's SAE, or name it: StorePrompts.from_store(store, rows, sae=NAME)."
        )
    return record["name"]


def _means(ablation: Ablation, means: np.ndarray | None, store_prompts: StorePrompts | None, store_sae: str | None,
           d_sae: int) -> np.ndarray | None:
    if isinstance(ablation, str) and ablation not in ("zero", "mean"):
        raise ConfigError(f"ablation={ablation!r}: use 'zero', 'mean' or a scale factor such as 0.5.")
    if isinstance(ablation, bool) or not isinstance(ablation, (str, int, float)):
        raise ConfigError(f"ablation={ablation!r}: use 'zero', 'mean' or a scale factor such as 0.5.")
    if ablation != "mean":
        return None
    if means is None and store_prompts is None:
        raise ConfigError(
            "ablation='mean' needs each feature's mean activation: pass means=array of d_sae values, "
            "or prompts from a store (StorePrompts.from_store), whose tokens give the means."
        )
    if means is None:
        return mean_activations(store_prompts.store, store_sae)
    means = np.asarray(means, dtype=np.float32)
    if means.shape != (d_sae,):
        raise ConfigError(f"means has shape {means.shape}; expected one mean per feature, ({d_sae},).")
    return means


def check_feature_ids(features: Sequence[int], d_sae: int) -> np.ndarray:
    ids = np.unique(whole_numbers("features", features, "feature ids (or 'live')"))
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if len(bad):
        raise ConfigError(f"features {bad[:10].tolist()} are not features of this SAE, which has ids 0..{d_sae - 1}.")
    return ids


@torch.no_grad()
def spliced_baseline(model, sae, tokens: torch.Tensor, metric: Metric, use_error_term: bool = False,
                     attention_mask: torch.Tensor | None = None) -> Baseline:
    """The SAE spliced in as ``run_with_saes`` splices it (a transcoder as ``TranscoderSplice``
    does) over ``tokens`` (on the model's device), caching what the ablations start from."""
    n, seq = tokens.shape
    resume = Resume(model, output_hook(sae), tokens, None if attention_mask is None else attention_mask.to(tokens.device))
    if is_transcoder(sae):
        splice = TranscoderSplice(sae, use_error_term)
        with model.hooks(fwd_hooks=splice.hooks):
            logits, cache = model.run_with_cache(tokens, names_filter=resume.cache_names,
                                                 **resume.baseline_kwargs())
        acts, hook_out, scale = splice.acts, splice.output, None
    else:
        hook = input_hook(sae)
        acts_name, out_name, in_name = (f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_output",
                                        f"{hook}.hook_sae_input")
        logits, cache = model.run_with_cache_with_saes(
            tokens, saes=[sae], use_error_term=use_error_term,
            names_filter=[acts_name, out_name, in_name, *resume.cache_names], **resume.baseline_kwargs(),
        )
        acts, hook_out = cache[acts_name], cache[out_name]
        scale = decoder_scale(sae, cache[in_name])
        scale = None if scale is None else scale.reshape(n, seq, 1)
    resume.remember(cache)
    runner = MetricRunner(metric, logits)
    values = runner.all_prompts().detach()
    return Baseline(sae=sae, tokens=tokens, metric=metric, use_error_term=use_error_term, resume=resume,
                    runner=runner, values=values, acts=acts, hook_out=hook_out.reshape(n, seq, -1), scale=scale)


@torch.no_grad()
def latents(model, sae, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The SAE's latents over ``tokens``, ``[n_prompts, seq, d_sae]``: its ``hook_sae_acts_post`` as
    ``run_with_cache_with_saes`` gives it; for a transcoder, ``encode`` of its input hook's activation."""
    hook = input_hook(sae)
    if is_transcoder(sae):
        _, cache = model.run_with_cache(tokens, names_filter=[hook], attention_mask=attention_mask)
        return sae.encode(cache[hook])
    name = f"{hook}.hook_sae_acts_post"
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=[name], attention_mask=attention_mask)
    return cache[name]


def live_features(acts: torch.Tensor, positions: torch.Tensor | None,
                  attention_mask: torch.Tensor | None) -> np.ndarray:
    """Features active at any prompt's ablated position (any real token for None): the union."""
    if positions is None:
        real = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device) if attention_mask is None \
            else attention_mask.to(acts.device).bool()
        fired = (acts != 0)[real].any(0)
    else:
        fired = (acts[torch.arange(len(acts)), positions.to(acts.device)] != 0).any(0)
    return fired.nonzero()[:, 0].cpu().numpy().astype(np.int64)


def decoder_directions(sae, features: torch.Tensor) -> torch.Tensor:
    """What one unit of each feature adds to the SAE's output, ``[n_features, d_in]``."""
    directions = sae.W_dec[features].detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        # Such TopK SAEs decode acts / |W_dec[f]| (sae_lens's act_times_W_dec).
        directions = directions / sae.W_dec[features].detach().norm(dim=-1, keepdim=True)
    return directions


def ablated_values(acts: torch.Tensor, ablation: Ablation, means: torch.Tensor | None) -> torch.Tensor:
    """What each activation becomes: 0, the feature's mean, or the activation scaled."""
    if ablation == "zero":
        return torch.zeros_like(acts)
    if ablation == "mean":
        return means.expand_as(acts).clone()
    return acts * float(ablation)


def copy_order(change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, feature index, first changed position) of every pair the ablation changes, those
    changed from the same position together (a batch then recomputes from its earliest one), and
    within them first copies of all prompts first (then a batch holds few copies of any one
    prompt; see ``MetricRunner``)."""
    changed = change != 0  # [n_prompts, seq, n_features]
    prompt, feature = changed.any(1).nonzero(as_tuple=True)
    first = changed.to(torch.uint8).argmax(1)[prompt, feature]  # the first True along the positions
    prompt, feature, first = prompt.cpu().numpy(), feature.cpu().numpy(), first.cpu().numpy()
    counts = np.bincount(prompt, minlength=change.shape[0])
    rank = np.arange(len(prompt)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.lexsort((prompt, rank, -first))
    return torch.from_numpy(prompt[order]), torch.from_numpy(feature[order]), torch.from_numpy(first[order])


@torch.no_grad()
def exact_deltas(baseline: Baseline, directions: torch.Tensor, change: torch.Tensor, batch_size: int,
                 progress: bool) -> torch.Tensor:
    """``[n_prompts, n_features]`` metric changes, one prompt copy per pair the ablation changes,
    each recomputed from the first position its batch changes (all positions where the forward
    cannot start at a position)."""
    n_prompts, _, n_features = change.shape
    resume, runner = baseline.resume, baseline.runner
    delta = torch.zeros((n_prompts, n_features), dtype=torch.float32)
    prompts, feats, firsts = copy_order(change)
    device = baseline.hook_out.device
    for start in tqdm(range(0, len(prompts), batch_size), desc="ablate", unit="batch", disable=not progress):
        p, f = prompts[start:start + batch_size], feats[start:start + batch_size]
        pd_, fd = p.to(device), f.to(device)
        since = int(firsts[start:start + batch_size].min()) if resume.suffix_runs else 0
        step = change[pd_, since:, fd]  # [batch, seq - since]
        added = step[..., None] * directions[fd][:, None, :]
        if baseline.scale is not None:
            added = added * baseline.scale[pd_, since:]
        hook_out = baseline.hook_out[pd_, since:] + added
        tail = runner.tail(pd_, since)
        values = runner(resume(hook_out, pd_, since, tail), pd_, since, tail)
        delta[p, f] = values.float().cpu() - baseline.values[pd_].float().cpu()
    runner.check_unmodified()
    return delta


def attribution_estimates(baseline: Baseline, directions: torch.Tensor, change: torch.Tensor,
                          batch_size: int) -> torch.Tensor:
    """``[n_prompts, n_features]`` first-order estimates ``sum_pos change * d metric / d act``,
    from one forward and one backward per batch of prompts."""
    n_prompts, _, n_features = change.shape
    estimate = torch.zeros((n_prompts, n_features), dtype=torch.float32)
    device = baseline.hook_out.device
    for start in range(0, n_prompts, batch_size):
        p = torch.arange(start, min(n_prompts, start + batch_size), device=device)
        zero = torch.zeros(change[p].shape, dtype=change.dtype, device=device, requires_grad=True)
        with torch.enable_grad():
            # Adds exactly zero, but makes the hook's output a function of each feature's activation.
            added = zero @ directions
            hook_out = baseline.hook_out[p] + (added if baseline.scale is None else added * baseline.scale[p])
            values = baseline.runner(baseline.resume(hook_out, p), p)
            (grad,) = torch.autograd.grad(values.sum(), zero)
        estimate[p.cpu()] = (grad * change[p]).sum(1).float().cpu()
    return estimate


def heatmap(frame: pd.DataFrame, title: str | None = None):
    """Prompt by feature heatmap of ``delta`` (notebook 000's ``imshow(causal_effects)``), in plotly."""
    import plotly.express as px

    grid = frame.pivot(index="prompt", columns="feature", values="delta")
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
    fig = px.imshow(grid.to_numpy(), x=[str(f) for f in grid.columns], y=[str(p) for p in grid.index],
                    color_continuous_scale="RdBu", zmin=-limit, zmax=limit, aspect="auto",
                    labels={"x": "feature", "y": "prompt", "color": "delta"},
                    title=title or "Change in metric when ablating each feature")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig
