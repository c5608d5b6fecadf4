"""`latentstore extract`: validate, hand shards to Ray workers, report, finalize.

The store holds the dataset's rows in order, window by window, up to
``max_tokens`` tokens exactly. Validation counts every row's tokens (up to
``max_tokens``) and plans shards of about ``shard_tokens`` tokens each, whole
windows, with the cut inside the last one; the plan depends on the data and the
settings alone. So the result does not depend on the number of workers or on
interruptions: a rerun skips complete shards and does the rest.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from pipeline.dataset import (DEFAULT_SHARD_TOKENS, DatasetSpec, Shard, check_dataset, describe_dataset,
                              open_dataset, plan_shards, row_lengths, rows_digest, tokenize_rows)
from pipeline.models import hook_names, hook_width, is_local_model, load_model_config, load_tokenizer
from pipeline.saes import SAESource, output_hook_problems, read_sae_config
from jobs.ray_session import call, connect, init_errors_on_call, worker_resources
from pipeline.worker import SHARDS_IN_FLIGHT, ExtractJob, ExtractWorker
from store.errors import ConfigError, DataError, StoreWriteError, did_you_mean
from store.format import VALUE_DTYPES
from store.stats import DEFAULT_TOP_K
from store.location import check_writable, normalize
from store.lease import hold_lease
from store.writer import DATA_KEYS, StoreWriter, check_conflict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `latentstore extract` takes. Validated once, by ``validate``."""

    model: str
    saes: tuple[str, ...]
    dataset: DatasetSpec
    store: str
    context_size: int = 128
    max_tokens: int | None = None  # None: the whole dataset
    batch_size: int = 32  # windows per forward pass
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # about this many tokens per shard, whole windows (one store part)
    prepend_bos: bool | None = None  # None: follow the SAEs' prepend_bos
    value_dtype: str = "bfloat16"
    top_k: int = DEFAULT_TOP_K  # top activations kept per feature in the statistics
    index: bool = True  # build the feature-major index at the end
    model_dtype: str | None = None  # None: the model's own dtype
    workers: int | None = None  # None: one per GPU in the cluster now, or 1 on a CPU-only cluster
    use_gpu: bool | None = None  # None: GPU workers if the cluster has GPUs now (say True to scale from zero)
    cpus_per_worker: float | None = None  # CPU workers only; None: share the machine's cores
    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, else start one locally
    overwrite: bool = False
    progress: bool = True


@dataclass
class Plan:
    """What validation found out, for the run."""

    config: ExtractConfig
    model_cfg: object
    saes: list = field(default_factory=list)  # SAEDescription per --sae, in order
    dataset: dict = field(default_factory=dict)
    shards: list[Shard] = field(default_factory=list)
    prepend_bos: bool = True

    @property
    def n_tokens(self) -> int:
        return sum(shard.n_tokens for shard in self.shards)

    def run_metadata(self, described: dict | None = None) -> dict:
        """The store's record of this run; two runs with equal records make equal stores."""
        cfg = self.config
        described = described or {}
        hashes = described.get("sae_weights_hashes", {})
        model = {"name": normalize(cfg.model) if is_local_model(cfg.model) else cfg.model,
                 "config": _jsonable(self.model_cfg.to_dict()), "dtype": cfg.model_dtype}
        if described:
            model["weights_hash"] = described["model_weights_hash"]
            model["loader"] = described["model_loader"]
        saes = []
        for sae in self.saes:
            entry = {"hook": sae.hook, "source": sae.source, "architecture": sae.architecture,
                     "d_in": sae.d_in, "d_sae": sae.d_sae, "config": _jsonable(sae.config)}
            if sae.hook_out is not None:  # a transcoder: where its decoder writes (format 1.4)
                entry["hook_out"] = sae.hook_out
            if described:
                entry["weights_hash"] = hashes[sae.hook]
                entry["hook_point"] = described["hook_points"][sae.hook]
            saes.append(entry)
        run = {
            "model": model,
            "saes": saes,
            "dataset": self.dataset,
            "context_size": cfg.context_size,
            "prepend_bos": self.prepend_bos,
            "max_tokens": cfg.max_tokens,
            "shard_tokens": cfg.shard_tokens,
            "value_dtype": cfg.value_dtype,
            "top_k": cfg.top_k,
        }
        if described:
            run["tokenizer"] = described["tokenizer"]
        return run


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def validate(cfg: ExtractConfig) -> Plan:
    """Check everything that can be checked without running the model; report all problems together."""
    problems: list[str] = []
    for name, value in [("--context-size", cfg.context_size), ("--batch-size", cfg.batch_size),
                        ("--shard-tokens", cfg.shard_tokens), ("--max-tokens", cfg.max_tokens),
                        ("--workers", cfg.workers), ("--top-k", cfg.top_k)]:
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive, got {value}.")
    if cfg.value_dtype not in VALUE_DTYPES:
        problems.append(f"--value-dtype {cfg.value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}.")
    if not cfg.saes:
        problems.append("no --sae given: name at least one SAE.")
    try:
        check_writable(cfg.store)
    except StoreWriteError as e:
        problems.append(str(e))

    model_cfg = load_model_config(cfg.model)  # nothing else can be checked without it
    valid_hooks = set(hook_names(model_cfg))
    if cfg.context_size > model_cfg.n_ctx:
        problems.append(
            f"--context-size {cfg.context_size} is longer than the model's context (n_ctx={model_cfg.n_ctx}). "
            f"Use --context-size {model_cfg.n_ctx} or less."
        )
    plan = Plan(cfg, model_cfg)
    seen: dict[str, str] = {}
    for text in cfg.saes:
        try:
            sae = read_sae_config(SAESource.parse(text))
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        plan.saes.append(sae)
        if sae.hook not in valid_hooks:
            problems.append(
                f"--sae {text}: its hook {sae.hook!r} is not a hook of model {cfg.model}. "
                f"Hooks there include: {did_you_mean(sae.hook, sorted(valid_hooks))}"
            )
        elif (width := hook_width(model_cfg, sae.hook)) is not None and width != sae.d_in:
            problems.append(
                f"--sae {text}: d_in={sae.d_in}, but {cfg.model} has width {width} at {sae.hook}. "
                "Is the SAE for another model?"
            )
        problems.extend(output_hook_problems(text, sae, valid_hooks, model_cfg, cfg.model))
        if sae.hook in seen:
            problems.append(
                f"--sae {seen[sae.hook]} and --sae {text} are both at {sae.hook}: one SAE per hook. "
                "Extract them into separate stores."
            )
        seen[sae.hook] = text

    plan.prepend_bos = _bos_policy(cfg, plan.saes, problems)
    if plan.prepend_bos and cfg.context_size == 1:
        problems.append("--context-size 1 leaves no room for text: every window starts with the BOS token. "
                        "Use --context-size 2 or more, or --no-prepend-bos.")
    try:
        ds = open_dataset(cfg.dataset)
    except ConfigError as e:
        problems.extend(e.problems)
    else:
        dataset_problems = check_dataset(ds, cfg.dataset)
        problems.extend(dataset_problems)
        plan.dataset = describe_dataset(ds, cfg.dataset)
        if cfg.dataset.tokens_column and not dataset_problems:
            problems.extend(_check_token_sample(ds, cfg.dataset.tokens_column, model_cfg.d_vocab))
    if problems:
        raise ConfigError(problems)
    plan.shards = _plan_shards(cfg, ds, plan.prepend_bos, model_cfg.d_vocab)
    if not plan.shards:  # rows of text that all tokenize to nothing
        raise ConfigError(f"--dataset {cfg.dataset.name}: its rows make no tokens with this model's tokenizer "
                          f"(column {cfg.dataset.column!r}): there is nothing to extract.")
    check_conflict(cfg.store, plan.run_metadata(), cfg.overwrite, only_shared=True, ignore=DATA_KEYS)
    return plan


def _bos_policy(cfg: ExtractConfig, saes: list, problems: list[str]) -> bool:
    if cfg.dataset.tokens_column:
        if cfg.prepend_bos:
            problems.append("--prepend-bos cannot be used with --tokens-column: pre-tokenized rows are used as given.")
        return False
    if cfg.prepend_bos is not None:
        return cfg.prepend_bos
    wanted = {sae.prepend_bos for sae in saes if sae.prepend_bos is not None}
    if len(wanted) > 1:
        problems.append(
            "the SAEs disagree on prepend_bos (some were trained with BOS, some without). "
            "Pass --prepend-bos or --no-prepend-bos to choose."
        )
    return wanted.pop() if len(wanted) == 1 else True


def _check_token_sample(ds, column: str, d_vocab: int, n: int = 100) -> list[str]:
    """A cheap look at the first rows, so that bad ids are reported with every other problem (the
    plan, made once there are none, checks every row)."""
    rows = ds[:n][column]
    try:
        tokenize_rows(rows, range(len(rows)), None, True, d_vocab)
    except DataError as e:
        return [str(e)]
    return []


# -- running -----------------------------------------------------------------------------------




def start_workers(ray, plan: Plan) -> list:
    cfg = plan.config
    resources = worker_resources(ray, cfg.workers, cfg.cpus_per_worker, cfg.use_gpu)
    job = ExtractJob(
        model=cfg.model,
        saes=cfg.saes,
        dataset=cfg.dataset,
        store=normalize(cfg.store),
        context_size=cfg.context_size,
        batch_size=cfg.batch_size,
        prepend_bos=plan.prepend_bos,
        value_dtype=cfg.value_dtype,
        model_dtype=cfg.model_dtype,
        top_k=cfg.top_k,
        device=None if resources.use_gpu else "cpu",
        n_threads=resources.n_threads,
    )
    # Killed workers come back and their call is retried; writes are idempotent (stack.md). Each takes
    # SHARDS_IN_FLIGHT calls at once, so one shard's host side overlaps the next one's forward.
    actor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=SHARDS_IN_FLIGHT,
                       **resources.options)(init_errors_on_call(ExtractWorker))
    return [actor.remote(job) for _ in range(resources.n_workers)]


def run_extract(cfg: ExtractConfig) -> dict:
    """Run an extraction end to end; returns the store's final counts. The store's writer lease is
    taken first, before anything is read or written, and held to the end (the index included)."""
    with hold_lease(cfg.store, "latentstore extract") as lease:
        plan = validate(cfg)
        ray = connect(cfg.address, (cfg.workers or 1) * (cfg.cpus_per_worker or 1))
        actors = start_workers(ray, plan)
        try:
            described = call(ray, actors[0].describe.remote(), "loading the model and SAEs")
            writer = StoreWriter(cfg.store)
            plan_meta = {"n_shards": len(plan.shards), "n_rows": plan.dataset["n_rows"]}
            vocab = described.pop("vocab")
            lease.check()
            done = writer.begin(plan.run_metadata(described), plan_meta, cfg.overwrite,
                                keep_shard=_rows_unchanged(plan))
            if vocab is not None:
                writer.write_vocab(vocab)
            done = _schedule(ray, actors, plan, done)
        finally:
            for actor in actors:
                ray.kill(actor)
        lease.check()
        counts = writer.complete(done, {sae.hook: sae.d_sae for sae in plan.saes}, cfg.value_dtype)
        if cfg.index:
            from jobs.index import run_index

            run_index(writer.location, progress=cfg.progress)  # one task per CPU, under this lease
        return counts


def _plan_shards(cfg: ExtractConfig, ds, bos: bool, d_vocab: int) -> list[Shard]:
    """Count every row's tokens (as far as --max-tokens needs) and cut the windows into shards."""
    from tqdm.auto import tqdm

    tokenizer = None if cfg.dataset.tokens_column else load_tokenizer(cfg.model)
    with tqdm(total=len(ds), unit="row", unit_scale=True, desc="plan (counting tokens)",
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        def counted():
            for block in row_lengths(ds, cfg.dataset, tokenizer, d_vocab):
                bar.update(len(block))
                yield block

        return plan_shards(counted(), cfg.context_size, bos, cfg.shard_tokens, cfg.max_tokens)


def _rows_unchanged(plan: Plan):
    """For a rerun over edited data (a bad row fixed): whether a complete shard still holds exactly
    what this run would write, i.e. the same windows of the same rows, and their content is unchanged."""
    opened = []

    def keep(marker: dict) -> bool:
        shard_id = marker["shard_id"]
        if shard_id >= len(plan.shards) or not plan.shards[shard_id].is_written_by(marker) \
                or "rows_digest" not in marker:
            return False
        shard = plan.shards[shard_id]
        if not opened:
            opened.append(open_dataset(plan.config.dataset))
        rows = opened[0][shard.row_start : shard.row_stop][plan.config.dataset.column]
        return rows_digest(rows) == marker["rows_digest"]

    return keep


def _schedule(ray, actors: list, plan: Plan, done: dict[int, dict]) -> dict[int, dict]:
    """Run every planned shard not done yet; a complete shard of another plan (a crashed run's
    leftovers past a cut) is written again. Returns the markers of the planned shards."""
    from tqdm.auto import tqdm

    done = {i: m for i, m in done.items() if i < len(plan.shards) and plan.shards[i].is_written_by(m)}
    pending = deque(s for s in plan.shards if s.shard_id not in done)
    idle, in_flight = list(actors) * SHARDS_IN_FLIGHT, {}  # an actor once per shard it may take
    bar = tqdm(total=plan.n_tokens, initial=sum(m["n_tokens"] for m in done.values()), unit="tok",
               unit_scale=True, desc="extract", disable=not plan.config.progress, dynamic_ncols=True)
    bar.set_postfix_str(f"shards {len(done)}/{len(plan.shards)}")
    try:
        while pending or in_flight:
            while idle and pending:
                actor, shard = idle.pop(), pending.popleft()
                in_flight[actor.run_shard.remote(shard)] = (actor, shard)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, shard = in_flight.pop(ref)
            idle.append(actor)
            marker = call(ray, ref, f"writing shard {shard.shard_id} (dataset rows {shard.row_start}-{shard.row_stop - 1})",
                          location=normalize(plan.config.store))
            done[shard.shard_id] = marker
            bar.update(marker["n_tokens"])
            bar.set_postfix_str(f"shards {len(done)}/{len(plan.shards)}")
    finally:
        bar.close()
    return done
