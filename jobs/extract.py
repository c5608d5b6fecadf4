"""`latentstore extract`: validate, hand shards to Ray workers, report, finalize.

The store holds the dataset's rows in order, window by window, up to
``max_tokens`` tokens exactly. Validation counts every row's tokens (up to
``max_tokens``) and plans shards of about ``shard_tokens`` tokens each, whole
windows, with the cut inside the last one; the plan depends on the data and the
settings alone. So the result does not depend on the number of workers or on
interruptions: a rerun skips complete shards and does the rest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace

from jobs import pool
from jobs.ray_session import call, connect, worker_resources
from jobs.settings import (EXTRACT_FLAGS, Problem, Setting, SettingsError, as_settings_error, cores_problems,
                           credential_problems, positive, problems_of, wrong_types)
from pipeline.dataset import (DatasetSpec, Shard, check_dataset, describe_dataset, open_dataset, plan_shards,
                              row_lengths, rows_digest, tokenize_rows)
from pipeline.models import hook_names, hook_width, is_local_model, load_model_config, load_tokenizer
from pipeline.saes import SAESource, output_hook_problems, read_sae_config
from pipeline.specs import ExtractConfig, ModelSpec, Resources, StoreSpec  # noqa: F401 (the API)
from pipeline.worker import SHARDS_IN_FLIGHT, ExtractJob, ExtractWorker
from store.errors import ConfigError, DataError, StoreWriteError, did_you_mean
from store.format import VALUE_DTYPES
from store.location import check_writable, normalize
from store.lease import hold_lease
from store.writer import DATA_KEYS, StoreWriter, check_conflict

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What validation found out, for the run."""

    config: ExtractConfig
    model_cfg: object
    saes: list = field(default_factory=list)  # SAEDescription per SAE source, in order
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
        name = cfg.model.name
        model = {"name": normalize(name) if is_local_model(name) else name,
                 "config": _jsonable(self.model_cfg.to_dict()), "dtype": cfg.model.dtype}
        if described:
            model["weights_hash"] = described["model_weights_hash"]
            model["loader"] = described["model_loader"]
        saes = []
        for sae in self.saes:
            entry = {"name": sae.name, "hook": sae.hook, "source": sae.source, "architecture": sae.architecture,
                     "d_in": sae.d_in, "d_sae": sae.d_sae, "config": _jsonable(sae.config)}
            if sae.hook_out is not None:  # a transcoder: where its decoder writes (format 1.4)
                entry["hook_out"] = sae.hook_out
            if described:
                entry["weights_hash"] = hashes[sae.name]
                entry["hook_point"] = described["hook_points"][sae.name]
            saes.append(entry)
        run = {
            "model": model,
            "saes": saes,
            "dataset": self.dataset,
            "context_size": cfg.dataset.context_size,
            "prepend_bos": self.prepend_bos,
            "max_tokens": cfg.dataset.max_tokens,
            "shard_tokens": cfg.store.shard_tokens,
            "value_dtype": cfg.store.value_dtype,
            "top_k": cfg.store.top_k,
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
    """Check everything that can be checked without running the model; report all problems together,
    each naming its setting (``ExtractConfig.dataset.context_size``; the command line shows the flag)."""
    problems = wrong_types(cfg, ExtractConfig.SPECS)
    if isinstance(cfg.saes, str):
        problems.append(Problem.of(Setting("saes"), f" must be a sequence of SAE sources, one per SAE; got the string "
                                   f"{cfg.saes!r}. Write saes=({cfg.saes!r},)."))
    if problems:  # nothing else can be read
        raise SettingsError("ExtractConfig", problems, EXTRACT_FLAGS)
    if problems := _credential_problems(cfg):  # first: nothing may read, log or print those URLs before this
        raise SettingsError("ExtractConfig", problems, EXTRACT_FLAGS)
    data, store, resources = cfg.dataset, cfg.store, cfg.resources
    problems += positive({"dataset.context_size": data.context_size, "resources.batch_size": resources.batch_size,
                          "store.shard_tokens": store.shard_tokens, "dataset.max_tokens": data.max_tokens,
                          "resources.workers": resources.workers, "store.top_k": store.top_k})
    problems += cores_problems(resources.cpus_per_worker)
    if store.value_dtype not in VALUE_DTYPES:
        problems.append(Problem.of(Setting("store.value_dtype", store.value_dtype, quoted=True),
                                   f" is not one of {', '.join(VALUE_DTYPES)}."))
    if not cfg.saes:
        problems.append(Problem.of("no ", Setting("saes"), " given: name at least one SAE."))
    try:
        check_writable(store.path)
    except (StoreWriteError, ConfigError) as e:
        problems.append(Problem.from_text(str(e), EXTRACT_FLAGS))

    try:
        model_cfg = load_model_config(cfg.model.name)
    except ConfigError as e:  # the checks that need the model's config are left out
        problems += problems_of(e, EXTRACT_FLAGS)
        model_cfg = None
    context_ok = isinstance(data.context_size, int) and data.context_size > 0
    if model_cfg is not None and context_ok and data.context_size > model_cfg.n_ctx:
        problems.append(Problem.of(
            Setting("dataset.context_size", data.context_size),
            f" is longer than the model's context (n_ctx={model_cfg.n_ctx}). Use ",
            Setting("dataset.context_size", model_cfg.n_ctx), " or less."))
    plan = Plan(cfg, model_cfg)
    problems += _sae_problems(cfg, plan, model_cfg)

    plan.prepend_bos = _bos_policy(cfg, plan.saes, problems)
    if plan.prepend_bos and data.context_size == 1:
        problems.append(Problem.of(
            Setting("dataset.context_size", 1), " leaves no room for text: every window starts with the BOS token. "
            "Use ", Setting("dataset.context_size", 2), " or more, or ", Setting("dataset.prepend_bos", False), "."))
    ds = None
    try:
        ds = open_dataset(data)
    except ConfigError as e:
        problems += problems_of(e, EXTRACT_FLAGS)
    else:
        dataset_problems = check_dataset(ds, data)
        problems += [Problem.from_text(p, EXTRACT_FLAGS) for p in dataset_problems]
        plan.dataset = describe_dataset(ds, data)
        if data.tokens_column and not dataset_problems and model_cfg is not None:
            problems += [Problem.from_text(p, EXTRACT_FLAGS)
                         for p in _check_token_sample(ds, data.tokens_column, model_cfg.d_vocab)]
    if problems:
        raise SettingsError("ExtractConfig", problems, EXTRACT_FLAGS)
    plan.shards = _plan_shards(cfg, ds, plan.prepend_bos, model_cfg.d_vocab)
    if not plan.shards:  # rows of text that all tokenize to nothing
        raise SettingsError("ExtractConfig", [Problem.of(
            Setting("dataset.name", data.name), ": its rows make no tokens with this model's tokenizer "
            f"(column {data.column!r}): there is nothing to extract.")], EXTRACT_FLAGS)
    check_conflict(store.path, plan.run_metadata(), store.overwrite, only_shared=True, ignore=DATA_KEYS)
    return plan


def _credential_problems(cfg: ExtractConfig) -> list[Problem]:
    """The model, dataset and SAE sources go into the store's metadata as given (the store's own URL
    is refused by ``normalize``, the cluster's address by ``ray_session.connect``)."""
    return credential_problems([("model.name", cfg.model.name), ("dataset.name", cfg.dataset.name),
                                *((f"saes[{i}]", text) for i, text in enumerate(cfg.saes))])


def _sae_problems(cfg: ExtractConfig, plan: Plan, model_cfg) -> list[Problem]:
    """Each SAE's config is readable, and fits the model (its hooks, their widths); each SAE's name is its own."""
    problems: list[Problem] = []
    model = cfg.model.name
    valid_hooks = set(hook_names(model_cfg)) if model_cfg is not None else set()
    seen: dict[str, tuple[int, SAESource]] = {}  # name -> the first SAE of that name
    for i, text in enumerate(cfg.saes):
        this = Setting(f"saes[{i}]", text)
        try:
            source = SAESource.parse(text)
            sae = read_sae_config(source)
        except ConfigError as e:
            problems += [_about(this, p) for p in e.problems]
            continue
        plan.saes.append(sae)
        if model_cfg is not None:  # without it, only the SAEs' names can be checked
            if sae.hook not in valid_hooks:
                problems.append(Problem.of(this, f": its hook {sae.hook!r} is not a hook of model {model}. "
                                           f"Hooks there include: {did_you_mean(sae.hook, sorted(valid_hooks))}"))
            elif (width := hook_width(model_cfg, sae.hook)) is not None and width != sae.d_in:
                problems.append(Problem.of(this, f": d_in={sae.d_in}, but {model} has width {width} at {sae.hook}. "
                                           "Is the SAE for another model?"))
            problems += [_about(this, p) for p in output_hook_problems(text, sae, valid_hooks, model_cfg, model)]
        if sae.name not in seen:
            seen[sae.name] = (i, source)
            continue
        j, first = seen[sae.name]
        other = Setting(f"saes[{j}]", cfg.saes[j])
        if source.name is None and first.name is None:
            problems.append(Problem.of(
                other, " and ", this, f" both read {sae.hook}, and an SAE without a name is named by its hook. "
                f"Name each of them, NAME=SOURCE: e.g. --sae a={cfg.saes[j]} --sae b={text}"))
        else:
            problems.append(Problem.of(other, " and ", this, f" are both named {sae.name!r}: give each SAE its own "
                                       "name (NAME=SOURCE)."))
    return problems


def _about(sae: Setting, text: str) -> Problem:
    """A problem that another module wrote about one SAE as ``--sae SOURCE...``, naming that SAE's setting."""
    lead = f"--sae {sae.value}"
    if text.startswith(lead):
        return Problem.of(sae, *Problem.from_text(text[len(lead):], EXTRACT_FLAGS).parts)
    return Problem.from_text(text, EXTRACT_FLAGS)


def _bos_policy(cfg: ExtractConfig, saes: list, problems: list[Problem]) -> bool:
    data = cfg.dataset
    if data.tokens_column:
        if data.prepend_bos:
            problems.append(Problem.of(Setting("dataset.prepend_bos", True), " cannot be used with ",
                                       Setting("dataset.tokens_column"), ": pre-tokenized rows are used as given."))
        return False
    if data.prepend_bos is not None:
        return data.prepend_bos
    wanted = {sae.prepend_bos for sae in saes if sae.prepend_bos is not None}
    if len(wanted) > 1:
        problems.append(Problem.of(
            "the SAEs disagree on prepend_bos (some were trained with BOS, some without). Pass ",
            Setting("dataset.prepend_bos", True), " or ", Setting("dataset.prepend_bos", False), " to choose."))
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


# -- running ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_workers(ray, plan: Plan, policy: pool.Policy):
    """The extraction's actors on this cluster (a context that kills them on the way out), and the
    number of index parts each builds at once when, together, they hold every CPU of the cluster (0
    where they do not: the index's own tasks then take the CPUs, once the actors are gone)."""
    cfg, res = plan.config, plan.config.resources
    try:
        resources = worker_resources(ray, res.workers, res.cpus_per_worker, res.use_gpu)
    except ConfigError as e:
        raise as_settings_error("ExtractConfig", e, EXTRACT_FLAGS) from None
    config = replace(cfg, store=replace(cfg.store, path=normalize(cfg.store.path)))
    job = ExtractJob(config, prepend_bos=plan.prepend_bos, device=None if resources.use_gpu else "cpu",
                     n_threads=resources.n_threads)
    holds_all = resources.n_workers * resources.cores >= ray.cluster_resources().get("CPU", 1)
    index_calls = resources.cores if holds_all else 0
    with pool.actors(ray, ExtractWorker, job, resources, policy,
                     max_calls=max(policy.calls_per_worker, index_calls)) as actors:
        yield actors, index_calls


def shard_policy(plan: Plan) -> pool.Policy:
    """Shards to actors, SHARDS_IN_FLIGHT at once each, so that one shard's host side overlaps the
    next one's forward; progress in tokens."""
    return pool.Policy(
        label="extract", unit="tok", unit_scale=True, count="shards", calls_per_worker=SHARDS_IN_FLIGHT,
        submit=lambda actor, shard: actor.run_shard.remote(shard),
        describe=lambda shard: f"writing shard {shard.shard_id} (dataset rows {shard.row_start}-{shard.row_stop - 1})",
        amount=lambda shard, marker: marker["n_tokens"], location=normalize(plan.config.store.path))


def run_extract(cfg: ExtractConfig) -> dict:
    """Run an extraction end to end; returns the store's final counts. The store's writer lease is
    taken first, before anything is read or written, and held to the end (the index included)."""
    with hold_lease(cfg.store.path, "latentstore extract") as lease:
        plan = validate(cfg)
        ray = connect(cfg.resources.address, cfg.resources.cpus_wanted)
        policy = shard_policy(plan)
        with start_workers(ray, plan, policy) as (actors, index_calls):
            described = call(ray, actors[0].describe.remote(), "loading the model and SAEs")
            writer = StoreWriter(cfg.store.path)
            plan_meta = {"n_shards": len(plan.shards), "n_rows": plan.dataset["n_rows"]}
            vocab = described.pop("vocab")
            lease.check()
            done = writer.begin(plan.run_metadata(described), plan_meta, cfg.store.overwrite,
                                keep_shard=_rows_unchanged(plan))
            if vocab is not None:
                writer.write_vocab(vocab)
            done = _schedule(ray, actors, plan, policy, done)
            lease.check()
            counts = writer.complete(done, {sae.name: sae.d_sae for sae in plan.saes}, cfg.store.value_dtype)
            # the warm actors build the index (fresh tasks would first start and import: 0.8 s of 4.4 s here)
            if cfg.store.index and index_calls:
                _index(writer.location, cfg, builders=([a.build_index_part for a in actors], index_calls))
        if cfg.store.index and not index_calls:
            _index(writer.location, cfg)  # one task per CPU of the cluster
        return counts


def _index(location: str, cfg: ExtractConfig, builders: tuple[list, int] | None = None) -> None:
    from jobs.index import run_index

    run_index(location, progress=cfg.resources.progress, builders=builders)  # under this run's lease


def _plan_shards(cfg: ExtractConfig, ds, bos: bool, d_vocab: int) -> list[Shard]:
    """Count every row's tokens (as far as max_tokens needs) and cut the windows into shards."""
    from tqdm.auto import tqdm

    data = cfg.dataset
    tokenizer = None if data.tokens_column else load_tokenizer(cfg.model.name)
    with tqdm(total=len(ds), unit="row", unit_scale=True, desc="plan (counting tokens)",
              disable=not cfg.resources.progress, dynamic_ncols=True) as bar:
        def counted():
            for block in row_lengths(ds, data, tokenizer, d_vocab):
                bar.update(len(block))
                yield block

        return plan_shards(counted(), data.context_size, bos, cfg.store.shard_tokens, data.max_tokens)


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


def _schedule(ray, actors: list, plan: Plan, policy: pool.Policy, done: dict[int, dict]) -> dict[int, dict]:
    """Run every planned shard not done yet; a complete shard of another plan (a crashed run's
    leftovers past a cut) is written again. Returns the markers of the planned shards."""
    done = {i: m for i, m in done.items() if i < len(plan.shards) and plan.shards[i].is_written_by(m)}
    pending = [s for s in plan.shards if s.shard_id not in done]
    for shard, marker in pool.run(ray, actors, pending, policy, progress=plan.config.resources.progress,
                                  total=plan.n_tokens, initial=sum(m["n_tokens"] for m in done.values()),
                                  n_done=len(done)):
        done[shard.shard_id] = marker
    return done
