"""The sweep worker: a plain class (no Ray import) that computes and writes a sweep's parts.

``__init__`` loads the model, the SAE and the prompts once; ``run_part`` runs ``ablation_sweep``
on one (prompt block, feature block) and writes it under ``sweeps/<name>/parts/``, returning only
its small completion marker. The spliced baseline of a prompt block is made once and kept for the
block's next feature block. Ray wraps this class as an actor in ``jobs/sweep.py``; tests call it
directly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.ablation import (StorePrompts, ablation_sweep, left_pad, mean_activations, resolve_positions,
                               spliced_baseline)
from pipeline.metrics import KLFromClean, LogitDiff, NextTokenLoss, TargetLoss
from pipeline.specs import SweepConfig
from pipeline.worker import pick_device
from store.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepJob:
    """What every worker needs: the config, validated by the driver, and what it resolved."""

    model: str  # the config's, or else the store's
    sae: str  # the SAE's source: the config's, or else the store's SAE ``sae_name``
    sae_name: str  # the store's name for it (store rows read its live features and means), else the source's
    hook: str  # where the SAE reads
    config: SweepConfig
    device: str | None = None  # None: the GPU Ray gave this worker, else the CPU
    n_threads: int | None = None  # torch threads on a CPU worker

    def record(self, n_prompts: int) -> dict:
        """The sweep's record in the store: what was ablated, where, how, measured by what."""
        a, prompts, store = self.config.ablation, self.config.prompts, self.config.store
        source = {"store_rows": list(prompts.rows)} if prompts.rows is not None else {"file": prompts.file}
        return {"model": self.model, "sae": self.sae, "sae_name": self.sae_name, "hook": self.hook,
                "prompts": source, "n_prompts": n_prompts,
                "metric": a.metric, "position": "all" if a.position is None else a.position,
                "features": "live" if a.features is None else list(a.features),
                "ablation": a.kind, "use_error_term": a.use_error_term, "method": a.method,
                "verify_top": a.verify_top, "prompts_per_part": store.prompts_per_part,
                "features_per_part": store.features_per_part}


@dataclass(frozen=True)
class Part:
    part_id: int
    prompt_start: int
    prompt_stop: int
    features: tuple[int, ...]


def read_prompt_file(path: str) -> list[tuple[int, dict]]:
    """A prompt file's lines, one JSON object each, with their line numbers in the file (from 1;
    blank lines skipped). UTF-8, with or without a byte-order mark."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"--prompts {path} cannot be read ({e.strerror or e}): give a .jsonl file, one JSON "
                        "object a line.") from None
    lines = []
    for i, raw in enumerate(data.splitlines()):
        try:
            text = raw.decode("utf-8-sig" if i == 0 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--prompts {path}: line {i + 1} is not UTF-8 text ({e.reason} at byte {e.start}). "
                            "Save the file as UTF-8.") from None
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"--prompts {path}: line {i + 1} is not JSON ({e}).") from e
        if not isinstance(line, dict):
            raise DataError(f"--prompts {path}: line {i + 1} is not a JSON object.")
        lines.append((i + 1, line))
    return lines


class SweepWorker:
    """Loads the model, the SAE and the prompts once; computes and writes parts."""

    def __init__(self, job: SweepJob):
        from pipeline.models import load_model
        from pipeline.saes import SAESource, load_sae
        from store import FeatureStore
        from store.sweeps import SweepWriter

        self.job, cfg = job, job.config
        self.device = pick_device(job.device)
        if self.device.type == "cpu" and job.n_threads:
            torch.set_num_threads(job.n_threads)
        self.model = load_model(job.model, self.device)
        self.sae = load_sae(SAESource.parse(job.sae), device=str(self.device),
                            dtype=str(self.model.cfg.dtype).removeprefix("torch."))
        self.writer = SweepWriter(cfg.store.path, cfg.name)
        self._last_block = None  # ((start, stop), what _block made for those prompts)
        self.means = None
        if cfg.prompts.rows is not None:
            self.store = FeatureStore.open(cfg.store.path)
            self.rows = np.arange(*cfg.prompts.rows)
            self.texts = None
            if cfg.ablation.kind == "mean":
                self.means = mean_activations(self.store, job.sae_name)
        else:
            self.store = None
            self.texts = [line for _, line in read_prompt_file(cfg.prompts.file)]
            self.tokens, self.mask = self._tokenize([line["prompt"] for line in self.texts])

    def n_prompts(self) -> int:
        return len(self.rows) if self.texts is None else len(self.texts)

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Left-padded, with BOS, as notebook 000 tokenizes."""
        if self.model.tokenizer is None:
            raise ConfigError(f"--model {self.job.model} has no tokenizer, so text prompts cannot be tokenized.")
        pieces = [self.model.to_tokens(p, prepend_bos=True)[0].cpu() for p in prompts]
        return left_pad(pieces, self.model.tokenizer.pad_token_id or 0)

    def prompts(self, start: int, stop: int):
        """(tokens or StorePrompts, attention mask, metric) for prompts [start, stop)."""
        prompts, tokens, mask = self._prompt_tokens(start, stop)
        return prompts, mask, self._metric(start, stop, tokens, mask)

    def _prompt_tokens(self, start: int, stop: int):
        """(tokens or StorePrompts, their tokens, attention mask) for prompts [start, stop)."""
        if self.texts is None:
            prompts = StorePrompts.from_store(self.store, self.rows[start:stop], sae=self.job.sae_name)
            return prompts, prompts.tokens, prompts.attention_mask
        tokens, mask = self.tokens[start:stop], None if self.mask is None else self.mask[start:stop]
        return tokens, tokens, mask

    def _metric(self, start: int, stop: int, tokens: torch.Tensor, mask: torch.Tensor | None, clean: bool = True):
        """The metric of prompts [start, stop); without ``clean``, None for kl (its clean run is a forward)."""
        metric_name = self.job.config.ablation.metric
        lines = None if self.texts is None else self.texts[start:stop]
        if metric_name == "logit_diff":
            return LogitDiff.from_strings(self.model, [l["answer"] for l in lines], [l["wrong_answer"] for l in lines])
        if metric_name == "loss" and lines is not None:
            return TargetLoss.from_strings(self.model, [l["answer"] for l in lines])
        if metric_name == "loss":
            return NextTokenLoss(tokens, mask)
        return KLFromClean.from_model(self.model, tokens.to(self.device), attention_mask=mask) if clean else None

    def _blocks(self) -> list[tuple[int, int]]:
        step, n = self.job.config.store.prompts_per_part, self.n_prompts()
        return [(start, min(n, start + step)) for start in range(0, n, step)]

    def check_prompts(self) -> int:
        """Every prompt as a part will meet it, checked before the sweep's record is written, without
        a forward: store rows that the store holds, each within one window; the ablated position inside
        each prompt; answers of one token. Returns the number of prompts."""
        for start, stop in self._blocks():
            _, tokens, mask = self._prompt_tokens(start, stop)
            resolve_positions(self.job.config.ablation.position, len(tokens), tokens.shape[1], mask, first=start)
            self._metric(start, stop, tokens, mask, clean=False)
        return self.n_prompts()

    def live_features(self) -> np.ndarray:
        """The union over all prompts of the features active at the ablated position."""
        position, found = self.job.config.ablation.position, []
        for start, stop in self._blocks():
            prompts, tokens, mask = self._prompt_tokens(start, stop)
            if isinstance(prompts, StorePrompts):
                positions = resolve_positions(position, len(prompts.rows), tokens.shape[1], mask)
                found.append(prompts.live_features(self.job.sae_name, positions))
            else:
                found.append(self._live_from_run(tokens, mask))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    @torch.no_grad()
    def _live_from_run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
        from pipeline.ablation import latents, live_features

        acts = latents(self.model, self.sae, tokens.to(self.device), None if mask is None else mask.to(self.device))
        positions = resolve_positions(self.job.config.ablation.position, len(tokens), tokens.shape[1], mask)
        return live_features(acts, positions, mask)

    def _block(self, start: int, stop: int):
        """The prompts [start, stop), their mask, metric and spliced baseline. The parts of one block
        of prompts differ only in their features, so the last block's are kept for the next part."""
        if self._last_block is None or self._last_block[0] != (start, stop):
            self._last_block = None  # freed before the next block's baseline is made
            prompts, mask, metric = self.prompts(start, stop)
            tokens = (prompts.tokens if isinstance(prompts, StorePrompts) else prompts).to(self.device)
            baseline = spliced_baseline(self.model, self.sae, tokens, metric, self.job.config.ablation.use_error_term,
                                        None if mask is None else mask.to(self.device))
            self._last_block = ((start, stop), (prompts, mask, metric, baseline))
        return self._last_block[1]

    def run_part(self, part: Part) -> dict:
        """Compute and write one part; returns its completion marker. Safe to call again."""
        from store.sweeps import SweepPart

        existing = self.writer.completed_part(part.part_id)
        if existing is not None:  # a retried call whose first attempt finished
            return existing
        cfg = self.job.config
        a = cfg.ablation
        prompts, mask, metric, baseline = self._block(part.prompt_start, part.prompt_stop)
        frame = ablation_sweep(
            self.model, self.sae, prompts, metric, features=list(part.features), position=a.position,
            use_error_term=a.use_error_term, ablation=a.kind, method=a.method,
            verify_top=a.verify_top, means=self.means,
            attention_mask=None if isinstance(prompts, StorePrompts) else mask, batch_size=cfg.resources.batch_size,
            baseline=baseline,
        )
        frame["prompt"] += part.prompt_start
        return self.writer.write_part(SweepPart.from_frame(part.part_id, frame))
