"""`latentstore sweep`: an ablation sweep sharded over Ray workers, resumable, kept in a store.

The prompts are split into blocks of ``prompts_per_part`` and the sweep's features into
blocks of ``features_per_part``; each (prompt block, feature block) is one part, computed by
``ablation_sweep`` on a worker and written by it under ``sweeps/<name>/parts/``. The feature
set is fixed first, once, for all prompts (the union of live features, as in notebook 000),
so every (prompt, feature) pair gets a line whichever part computes it. A rerun of the same
command skips complete parts.

``SweepWorker`` is a plain class: Ray wraps it as an actor here, and tests call it directly.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.ablation import StorePrompts, ablation_sweep, mean_activations, resolve_positions
from pipeline.metrics import KLFromClean, LogitDiff, NextTokenLoss, TargetLoss
from jobs.ray_session import call, connect, init_errors_on_call, worker_resources
from jobs.sweep_cli import METRICS
from store.errors import ConfigError, DataError, did_you_mean
from store.lease import hold_lease

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SweepConfig:
    """Everything `latentstore sweep` takes. Validated once, by ``validate``."""

    name: str
    store: str  # where results go; with ``rows``, also where the prompts come from
    rows: tuple[int, int] | None = None  # [start, stop) dataset rows of the store, as prompts
    prompts: str | None = None  # a jsonl file with `prompt` (and `answer`, `wrong_answer`) per line
    model: str | None = None  # None: the store's model
    sae: str | None = None  # an --sae text (see pipeline.saes); None: the store's SAE at ``hook``
    hook: str | None = None  # which of the store's SAEs; needed when it has several
    metric: str = "logit_diff"  # logit_diff (needs answers), loss, kl
    position: int | None = -1  # the ablated position; None: every position
    features: tuple[int, ...] | None = None  # None: every live feature
    ablation: str | float = "zero"  # "zero", "mean" (store prompts) or a scale factor
    use_error_term: bool = False
    method: str = "exact"  # or "attribution"
    verify_top: int | None = None
    prompts_per_part: int = 16
    features_per_part: int = 256
    batch_size: int = 32  # prompt copies per forward
    workers: int | None = None
    cpus_per_worker: float | None = None
    address: str | None = None
    overwrite: bool = False
    progress: bool = True

    def spec(self, model: str, sae: str, hook: str, n_prompts: int) -> dict:
        """The sweep's record in the store: what was ablated, where, how, measured by what."""
        prompts = ({"store_rows": list(self.rows)} if self.rows is not None else {"file": self.prompts})
        return {"model": model, "sae": sae, "hook": hook, "prompts": prompts, "n_prompts": n_prompts,
                "metric": self.metric, "position": "all" if self.position is None else self.position,
                "features": "live" if self.features is None else list(self.features),
                "ablation": self.ablation, "use_error_term": self.use_error_term, "method": self.method,
                "verify_top": self.verify_top, "prompts_per_part": self.prompts_per_part,
                "features_per_part": self.features_per_part}


@dataclass(frozen=True)
class SweepJob:
    """What every worker needs, resolved by the driver."""

    model: str
    sae: str
    hook: str
    config: SweepConfig
    n_threads: int | None = None


@dataclass(frozen=True)
class Part:
    part_id: int
    prompt_start: int
    prompt_stop: int
    features: tuple[int, ...]


# -- validation ----------------------------------------------------------------------------------


def validate(cfg: SweepConfig) -> SweepJob:
    """Check the settings without loading the model; report every problem together."""
    from store import FeatureStore
    from store.sweeps import check_name

    problems: list[str] = []
    try:
        check_name(cfg.name)
    except ConfigError as e:
        problems.extend(e.problems)
    if (cfg.rows is None) == (cfg.prompts is None):
        problems.append("give the prompts either as --rows START:STOP of --store, or as --prompts FILE.jsonl.")
    for flag, value in [("--prompts-per-part", cfg.prompts_per_part), ("--features-per-part", cfg.features_per_part),
                        ("--batch-size", cfg.batch_size), ("--workers", cfg.workers)]:
        if value is not None and value <= 0:
            problems.append(f"{flag} must be positive, got {value}.")
    if cfg.metric not in METRICS:
        problems.append(f"--metric {cfg.metric!r} is not one of {', '.join(METRICS)}.")
    if cfg.method not in ("exact", "attribution"):
        problems.append(f"--method {cfg.method!r}: use exact or attribution.")
    if cfg.verify_top is not None and cfg.method != "attribution":
        problems.append("--verify-top re-checks attribution's strongest features: use it with --method attribution.")
    if cfg.ablation == "mean" and cfg.rows is None:
        problems.append("--ablation mean takes each feature's mean from the store: give prompts as --rows of --store.")

    model, sae, hook = cfg.model, cfg.sae, cfg.hook
    if cfg.rows is not None:
        start, stop = cfg.rows
        if not 0 <= start < stop:
            problems.append(f"--rows {start}:{stop} is empty: write START:STOP with START < STOP.")
        fs = FeatureStore.open(cfg.store)
        if hook is None and len(fs.hooks) == 1:
            hook = fs.hooks[0]
        elif hook is None and sae is None:
            problems.append(f"store {fs.location} holds SAEs at several hooks: choose one with --hook "
                            f"({', '.join(fs.hooks)}).")
        if hook is not None and hook not in fs.hooks:
            problems.append(f"--hook {hook!r} is not in store {fs.location}; it holds: {did_you_mean(hook, fs.hooks)}")
        elif hook is not None:
            sae = sae or next(s["source"] for s in fs.run["saes"] if s["hook"] == hook)
        model = model or fs.run["model"]["name"]
        if cfg.metric == "logit_diff":
            problems.append("--metric logit_diff needs answers, which store rows do not have: use --metric loss "
                            "or kl, or give --prompts FILE.jsonl with answer and wrong_answer fields.")
    elif cfg.prompts is not None:
        if model is None or sae is None:
            problems.append("with --prompts, name the --model and the --sae to ablate.")
        problems.extend(_check_prompt_file(cfg))
    if problems:
        raise ConfigError(problems)
    if hook is None or cfg.sae is not None:  # the SAE's own hook (a small config read, no weights)
        from pipeline.saes import SAESource, read_sae_config

        sae_hook = read_sae_config(SAESource.parse(sae)).hook
        if hook is not None and hook != sae_hook:
            raise ConfigError(f"--hook {hook!r} is not where --sae {sae} reads: it was trained at {sae_hook!r}. "
                              f"Leave --hook out, or give an SAE trained at {hook!r}.")
        hook = sae_hook
    return SweepJob(model=model, sae=sae, hook=hook, config=cfg)


def _check_prompt_file(cfg: SweepConfig) -> list[str]:
    try:
        lines = read_prompt_file(cfg.prompts)
    except (OSError, DataError) as e:
        return [str(e)]
    needed = {"logit_diff": ("prompt", "answer", "wrong_answer"), "loss": ("prompt", "answer"), "kl": ("prompt",)}
    for i, line in enumerate(lines):
        missing = [k for k in needed.get(cfg.metric, ("prompt",)) if not isinstance(line.get(k), str)]
        if missing:
            return [f"--prompts {cfg.prompts}: line {i + 1} has no text field {', '.join(missing)}, "
                    f"which --metric {cfg.metric} needs."]
    return [] if lines else [f"--prompts {cfg.prompts} holds no prompts."]


def read_prompt_file(path: str) -> list[dict]:
    lines = []
    with open(path) as f:
        for i, text in enumerate(f):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"--prompts {path}: line {i + 1} is not JSON ({e}).") from e
            if not isinstance(line, dict):
                raise DataError(f"--prompts {path}: line {i + 1} is not a JSON object.")
            lines.append(line)
    return lines


# -- the worker ----------------------------------------------------------------------------------


class SweepWorker:
    """Loads the model, the SAE and the prompts once; computes and writes parts."""

    def __init__(self, job: SweepJob):
        from pipeline.models import load_model
        from pipeline.saes import SAESource, load_sae
        from store import FeatureStore
        from store.sweeps import SweepWriter

        self.job, cfg = job, job.config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and job.n_threads:
            torch.set_num_threads(job.n_threads)
        self.model = load_model(job.model, self.device)
        self.sae = load_sae(SAESource.parse(job.sae), device=str(self.device),
                            dtype=str(self.model.cfg.dtype).removeprefix("torch."))
        self.writer = SweepWriter(cfg.store, cfg.name)
        self.means = None
        if cfg.rows is not None:
            self.store = FeatureStore.open(cfg.store)
            self.rows = np.arange(*cfg.rows)
            self.texts = None
            if cfg.ablation == "mean":
                self.means = mean_activations(self.store, job.hook)
        else:
            self.store = None
            self.texts = read_prompt_file(cfg.prompts)
            self.tokens, self.mask = self._tokenize([line["prompt"] for line in self.texts])

    def n_prompts(self) -> int:
        return len(self.rows) if self.texts is None else len(self.texts)

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Left-padded, with BOS, as notebook 000 tokenizes."""
        if self.model.tokenizer is None:
            raise ConfigError(f"--model {self.job.model} has no tokenizer, so text prompts cannot be tokenized.")
        pieces = [self.model.to_tokens(p, prepend_bos=True)[0] for p in prompts]
        seq = max(len(p) for p in pieces)
        pad = self.model.tokenizer.pad_token_id or 0
        tokens = torch.full((len(pieces), seq), pad, dtype=torch.long)
        mask = torch.zeros((len(pieces), seq), dtype=torch.long)
        for i, p in enumerate(pieces):
            tokens[i, seq - len(p):], mask[i, seq - len(p):] = p, 1
        return tokens, None if bool(mask.all()) else mask

    def prompts(self, start: int, stop: int):
        """(tokens or StorePrompts, attention mask, metric) for prompts [start, stop)."""
        cfg = self.job.config
        if self.texts is None:
            prompts = StorePrompts.from_store(self.store, self.rows[start:stop])
            tokens, mask = prompts.tokens, prompts.attention_mask
        else:
            tokens, mask = self.tokens[start:stop], None if self.mask is None else self.mask[start:stop]
            prompts = tokens
        lines = None if self.texts is None else self.texts[start:stop]
        if cfg.metric == "logit_diff":
            metric = LogitDiff.from_strings(self.model, [l["answer"] for l in lines], [l["wrong_answer"] for l in lines])
        elif cfg.metric == "loss" and lines is not None:
            metric = TargetLoss.from_strings(self.model, [l["answer"] for l in lines])
        elif cfg.metric == "loss":
            metric = NextTokenLoss(tokens, mask)
        else:
            metric = KLFromClean.from_model(self.model, tokens.to(self.device), attention_mask=mask)
        return prompts, mask, metric

    def live_features(self) -> np.ndarray:
        """The union over all prompts of the features active at the ablated position."""
        cfg, step, found = self.job.config, self.job.config.prompts_per_part, []
        for start in range(0, self.n_prompts(), step):
            prompts, mask, _ = self.prompts(start, min(self.n_prompts(), start + step))
            if isinstance(prompts, StorePrompts):
                positions = resolve_positions(cfg.position, len(prompts.rows), prompts.tokens.shape[1], mask)
                found.append(prompts.live_features(self.job.hook, positions))
            else:
                found.append(self._live_from_run(prompts, mask))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    @torch.no_grad()
    def _live_from_run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
        from pipeline.ablation import latents, live_features

        acts = latents(self.model, self.sae, tokens.to(self.device), None if mask is None else mask.to(self.device))
        positions = resolve_positions(self.job.config.position, len(tokens), tokens.shape[1], mask)
        return live_features(acts, positions, mask)

    def run_part(self, part: Part) -> dict:
        """Compute and write one part; returns its completion marker. Safe to call again."""
        from store.sweeps import SweepPart

        existing = self.writer.completed_part(part.part_id)
        if existing is not None:  # a retried call whose first attempt finished
            return existing
        cfg = self.job.config
        prompts, mask, metric = self.prompts(part.prompt_start, part.prompt_stop)
        frame = ablation_sweep(
            self.model, self.sae, prompts, metric, features=list(part.features), position=cfg.position,
            use_error_term=cfg.use_error_term, ablation=cfg.ablation, method=cfg.method,
            verify_top=cfg.verify_top, means=self.means,
            attention_mask=None if isinstance(prompts, StorePrompts) else mask, batch_size=cfg.batch_size,
        )
        frame["prompt"] += part.prompt_start
        return self.writer.write_part(SweepPart.from_frame(part.part_id, frame))


# -- the driver ----------------------------------------------------------------------------------


def plan_parts(n_prompts: int, features: np.ndarray, prompts_per_part: int, features_per_part: int) -> list[Part]:
    parts = []
    for start in range(0, n_prompts, prompts_per_part):
        for f in range(0, max(1, len(features)), features_per_part):
            parts.append(Part(len(parts), start, min(n_prompts, start + prompts_per_part),
                              tuple(int(x) for x in features[f:f + features_per_part])))
    return parts


def run_sweep(cfg: SweepConfig) -> dict:
    """Run a sweep end to end (or finish one), holding the store's writer lease; returns its counts."""
    from store.sweeps import SweepWriter

    with hold_lease(cfg.store, f"latentstore sweep {cfg.name}") as lease:  # before anything is read or written
        job = validate(cfg)
        ray = connect(cfg.address, (cfg.workers or 1) * (cfg.cpus_per_worker or 1))
        actors = _start_workers(ray, job)
        try:
            n_prompts = call(ray, actors[0].n_prompts.remote(), "loading the model, the SAE and the prompts")
            spec = cfg.spec(job.model, job.sae, job.hook, n_prompts)
            writer = SweepWriter(cfg.store, cfg.name)
            same = writer.existing_spec() is not None and not cfg.overwrite
            if same:
                features = writer.features()
            elif cfg.features is not None:
                features = np.unique(np.asarray(cfg.features, dtype=np.int64))
            else:
                features = call(ray, actors[0].live_features.remote(), "finding the live features")
            parts = plan_parts(n_prompts, features, cfg.prompts_per_part, cfg.features_per_part)
            prompt_rows = np.arange(*cfg.rows) if cfg.rows is not None else None
            done = writer.begin(spec, features, prompt_rows, len(parts), cfg.overwrite)
            done = _schedule(ray, actors, [p for p in parts if p.part_id not in done], done, len(parts), cfg.progress)
            counts = {"n_prompts": n_prompts, "n_features": len(features), "n_parts": len(parts),
                      "n_lines": sum(m["n_lines"] for m in done.values())}
            lease.check()
            writer.finalize(counts)
            return counts
        finally:
            for actor in actors:
                ray.kill(actor)


def _start_workers(ray, job: SweepJob) -> list:
    cfg = job.config
    resources = worker_resources(ray, cfg.workers, cfg.cpus_per_worker)
    job = SweepJob(job.model, job.sae, job.hook, job.config, resources.n_threads)
    # Killed workers come back and their call is retried; part writes are idempotent.
    actor = ray.remote(max_restarts=-1, max_task_retries=-1, **resources.options)(init_errors_on_call(SweepWorker))
    return [actor.remote(job) for _ in range(resources.n_workers)]


def _schedule(ray, actors: list, pending: list[Part], done: dict[int, dict], n_parts: int,
              progress: bool) -> dict[int, dict]:
    from tqdm.auto import tqdm


    queue, idle, in_flight = deque(pending), list(actors), {}
    with tqdm(total=n_parts, initial=len(done), unit="part", desc="sweep", disable=not progress) as bar:
        while queue or in_flight:
            while idle and queue:
                actor, part = idle.pop(), queue.popleft()
                in_flight[actor.run_part.remote(part)] = (actor, part)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, part = in_flight.pop(ref)
            idle.append(actor)
            done[part.part_id] = call(ray, ref, f"computing sweep part {part.part_id} "
                                                 f"(prompts {part.prompt_start}-{part.prompt_stop - 1})")
            bar.update(1)
    return done


# -- the command line ----------------------------------------------------------------------------

