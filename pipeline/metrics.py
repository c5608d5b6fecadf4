"""Built-in metrics: functions of a run's logits with one value per prompt.

A metric maps logits ``[batch, seq, vocab]`` to a tensor ``[batch]``. Any callable
with that shape works in ``ablation_sweep`` and ``splice_eval``: row ``i`` of the
logits is prompt ``i``, as in the seed notebooks' ``logits_to_ave_logit_diff(...,
per_prompt=True)``.

The built-ins also accept ``prompts``, a ``[batch]`` tensor saying which prompt
each row is. Sweeps pass it so that a batch can hold any mix of prompt copies;
a plain callable gets whole batches in prompt order instead (see
``pipeline.ablation``).

``position`` is one index (negative counts from the end, as with left padding)
or one index per prompt: it tells a sweep which logits a built-in reads. Which a plain
callable reads, a sweep learns from a trace of it (``positions_read``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.metric_names import DEFAULT_METRIC, METRICS, PROMPT_FIELDS  # noqa: F401  (the names, without torch)
from store.errors import ConfigError

Metric = Callable[..., torch.Tensor]
Position = int | Sequence[int] | torch.Tensor


def accepts_prompts(metric: Metric) -> bool:
    """Whether ``metric`` takes ``prompts=``, so that batches may mix prompts freely."""
    try:
        return "prompts" in inspect.signature(metric).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _positions(position: Position, n_prompts: int) -> torch.Tensor:
    pos = torch.as_tensor(position, dtype=torch.long)
    if pos.ndim == 0:
        return pos.expand(n_prompts).clone()
    if pos.shape != (n_prompts,):
        raise ConfigError(
            f"position has shape {tuple(pos.shape)}; give one index, or one per prompt ({n_prompts})."
        )
    return pos


def _rows(prompts: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_rows, device=device) if prompts is None else prompts.to(device)


def _at(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``logits[i, positions[i]]`` for every row: ``[batch, vocab]``."""
    return logits[torch.arange(len(logits), device=logits.device), positions.to(logits.device)]


@dataclass(frozen=True)
class LogitDiff:
    """Logit of the right answer minus the logit of the wrong one, at ``position`` (notebook 000's
    ``logits_to_ave_logit_diff(..., per_prompt=True)``)."""

    answer_tokens: torch.Tensor  # long [n_prompts, 2]: (right, wrong)
    position: Position = -1

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.answer_tokens, dtype=torch.long)
        if tokens.ndim != 2 or tokens.shape[1] != 2:
            raise ConfigError(
                f"answer_tokens has shape {tuple(tokens.shape)}; expected [n_prompts, 2] holding "
                "(right answer, wrong answer) token ids. Build it with LogitDiff.from_strings."
            )
        object.__setattr__(self, "answer_tokens", tokens)
        object.__setattr__(self, "position", _positions(self.position, len(tokens)))

    @classmethod
    def from_strings(cls, model, answers: Sequence[str], wrong_answers: Sequence[str],
                     position: Position = -1) -> LogitDiff:
        if len(answers) != len(wrong_answers):
            raise ConfigError(f"{len(answers)} answers but {len(wrong_answers)} wrong answers: give one of each per prompt.")
        pairs = [(single_token(model, a, "answer"), single_token(model, w, "wrong answer"))
                 for a, w in zip(answers, wrong_answers)]
        return cls(torch.tensor(pairs, dtype=torch.long), position)

    def __call__(self, logits: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        rows = _rows(prompts, len(logits), self.answer_tokens.device)
        final = _at(logits, self.position[rows])
        answers = self.answer_tokens[rows].to(logits.device)
        picked = final.gather(-1, answers)
        return picked[:, 0] - picked[:, 1]


@dataclass(frozen=True)
class TargetLoss:
    """Cross-entropy of a given target token at ``position``: ``-log p(target)``."""

    targets: torch.Tensor  # long [n_prompts]
    position: Position = -1

    def __post_init__(self) -> None:
        targets = torch.as_tensor(self.targets, dtype=torch.long)
        if targets.ndim != 1:
            raise ConfigError(f"targets has shape {tuple(targets.shape)}; expected one token id per prompt.")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "position", _positions(self.position, len(targets)))

    @classmethod
    def from_strings(cls, model, targets: Sequence[str], position: Position = -1) -> TargetLoss:
        return cls(torch.tensor([single_token(model, t, "target") for t in targets]), position)

    def __call__(self, logits: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        rows = _rows(prompts, len(logits), self.targets.device)
        log_probs = _at(logits, self.position[rows]).float().log_softmax(-1)
        return -log_probs.gather(-1, self.targets[rows].to(logits.device)[:, None])[:, 0]


@dataclass(frozen=True)
class NextTokenLoss:
    """Each prompt's mean next-token cross-entropy over its own tokens (what
    ``model(tokens, return_type="loss")`` averages), skipping padding where a mask is given."""

    tokens: torch.Tensor  # long [n_prompts, seq]
    attention_mask: torch.Tensor | None = None  # [n_prompts, seq], 0 at padding

    def __call__(self, logits: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        rows = _rows(prompts, len(logits), self.tokens.device)
        tokens = self.tokens[rows].to(logits.device)
        log_probs = logits[:, :-1].float().log_softmax(-1)
        per_token = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
        if self.attention_mask is None:
            return per_token.mean(-1)
        mask = self.attention_mask[rows].to(logits.device)
        # A prediction counts where both the token read and the token predicted are real.
        weight = (mask[:, :-1] * mask[:, 1:]).to(per_token.dtype)
        return (per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1)


@dataclass(frozen=True)
class KLFromClean:
    """KL(clean || this run) of the next-token distribution at ``position``, per prompt."""

    clean_log_probs: torch.Tensor  # float [n_prompts, vocab], log-softmax of the clean run there
    position: Position = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", _positions(self.position, len(self.clean_log_probs)))

    @classmethod
    @torch.no_grad()
    def from_model(cls, model, tokens: torch.Tensor, position: Position = -1,
                   attention_mask: torch.Tensor | None = None) -> KLFromClean:
        """The clean model's distribution at ``position`` of every prompt (one forward)."""
        logits = model(tokens, attention_mask=attention_mask)
        pos = _positions(position, len(tokens))
        return cls(_at(logits, pos).float().log_softmax(-1), pos)

    def __call__(self, logits: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        rows = _rows(prompts, len(logits), self.clean_log_probs.device)
        clean = self.clean_log_probs[rows].to(logits.device)
        log_probs = _at(logits, self.position[rows]).float().log_softmax(-1)
        return (clean.exp() * (clean - log_probs)).sum(-1)


def single_token(model, text: str, what: str) -> int:
    """The id of ``text`` when it is exactly one token of the model's tokenizer."""
    if model.tokenizer is None:
        raise ConfigError(f"the model has no tokenizer, so the {what} {text!r} cannot be tokenized; pass token ids.")
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ConfigError(
            f"the {what} {text!r} is {len(ids)} tokens ({pieces}), but a logit difference compares "
            "single tokens. Choose answers that are one token each (a leading space often makes a word "
            "one token), or compare their first tokens."
        )
    return ids[0]


# Operations whose output at a position depends on the input at that position alone: what a metric
# reads through them, it reads of the logits. A softmax is one only over the vocabulary.
_POSITIONWISE = {"aten._to_copy.default", "aten.clone.default", "aten.detach.default", "aten.alias.default"}
_OVER_VOCAB = {"aten._log_softmax.default", "aten._softmax.default"}


def positions_read(metric: Metric, logits: torch.Tensor) -> torch.Tensor | None:
    """The positions ``metric`` reads of logits shaped like ``logits``, counted from the end, or
    None when it may read any.

    It is read off a trace of ``metric`` on fake tensors shaped like ``logits`` (``make_fx``: no
    logits are computed or copied, and the metric's own tensors are taken as they are): the positions
    are known when every use of the logits, directly or through position-wise operations (a dtype
    change, a softmax over the vocabulary), picks constant positions (``logits[:, -1]``,
    ``logits[:, -3:]``). A metric that branches on values cannot be traced and reads any, as does
    one that uses the logits in any other way. A sweep then unembeds only those last positions."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = make_fx(metric, tracing_mode="fake", _allow_non_fake_inputs=True)(logits).graph
    except Exception:  # noqa: BLE001  (a metric make_fx cannot trace, or a torch without this API: read any)
        return None
    seq, ndim = logits.shape[1], logits.ndim
    read: set[int] = set()
    aligned = [n for n in graph.nodes if n.op == "placeholder"]  # nodes whose dim 1 is the positions
    while aligned:
        for use in aligned.pop().users:
            op, args = str(use.target), [*use.args, None, None, None]
            if op in _POSITIONWISE or (op in _OVER_VOCAB and args[1] % ndim == ndim - 1):
                aligned.append(use)
            elif op == "aten.select.int" and args[1] % ndim == 1:
                read.add(range(seq)[args[2]])
            elif op == "aten.slice.Tensor" and (args[1] or 0) % ndim == 1:
                read.update(range(seq)[slice(args[2], args[3], args[4] or 1)])
            else:
                return None
    return torch.tensor(sorted(read), dtype=torch.long) - seq if read else None


def check_metric_output(values: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """The metric's output, refused unless it is one number per prompt."""
    if not isinstance(values, torch.Tensor) or values.shape != (n_prompts,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ConfigError(
            f"the metric returned {shape}; it must return one value per prompt, a tensor of shape "
            f"({n_prompts},). If it averages over prompts (like logits_to_ave_logit_diff without "
            "per_prompt=True), return the per-prompt values instead."
        )
    return values
