"""`latentstore sweep`: an ablation sweep sharded over Ray workers, resumable, kept in a store.

The prompts are split into blocks of ``prompts_per_part`` and the sweep's features into
blocks of ``features_per_part``; each (prompt block, feature block) is one part, computed by
``ablation_sweep`` on a worker (``pipeline.sweep_worker.SweepWorker``) and written by it under
``sweeps/<name>/parts/``. The feature set is fixed first, once, for all prompts (the union of
live features, as in notebook 000), so every (prompt, feature) pair gets a line whichever part
computes it. A rerun of the same command skips complete parts.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from jobs import pool
from jobs.ray_session import call, connect, worker_resources
from jobs.settings import (SWEEP_FLAGS, Problem, Setting, SettingsError, as_settings_error, cores_problems,
                           credential_problems, positive, problems_of, wrong_types)
from pipeline.ablation import is_ablation
from pipeline.metric_names import METRICS, PROMPT_FIELDS
from pipeline.specs import AblationSpec, PromptSpec, Resources, SweepConfig, SweepStoreSpec  # noqa: F401 (the API)
from pipeline.sweep_worker import Part, SweepJob, SweepWorker, read_prompt_file
from store.arguments import is_whole
from store.elements import read_root_attrs
from store.errors import ConfigError, DataError
from store.format import check_writes
from store.location import normalize
from store.lease import hold_lease

log = logging.getLogger(__name__)


# -- validation ----------------------------------------------------------------------------------


def validate(cfg: SweepConfig) -> SweepJob:
    """Check the settings without loading the model; report every problem together."""
    from store import FeatureStore
    from store.sweeps import check_name

    problems = wrong_types(cfg, SweepConfig.SPECS) + _not_whole_numbers(cfg)
    if problems:
        raise SettingsError("SweepConfig", problems, SWEEP_FLAGS)
    # first: the sources go into the sweep's record as given, and nothing may read or show them before
    problems = credential_problems([("model", cfg.model), ("sae", cfg.sae), ("prompts.file", cfg.prompts.file)])
    if problems:
        raise SettingsError("SweepConfig", problems, SWEEP_FLAGS)
    a, prompts = cfg.ablation, cfg.prompts
    try:
        check_name(cfg.name)
    except ConfigError as e:
        problems += problems_of(e, SWEEP_FLAGS)
    if (prompts.rows is None) == (prompts.file is None):
        problems.append(Problem.of("give the prompts either as ", Setting("prompts.rows"), " START:STOP of ",
                                   Setting("store.path"), ", or as ", Setting("prompts.file"), " FILE.jsonl."))
    problems += positive({"store.prompts_per_part": cfg.store.prompts_per_part,
                          "store.features_per_part": cfg.store.features_per_part,
                          "resources.batch_size": cfg.resources.batch_size, "resources.workers": cfg.resources.workers})
    problems += cores_problems(cfg.resources.cpus_per_worker)
    if a.metric not in METRICS:
        problems.append(Problem.of(Setting("ablation.metric", a.metric, quoted=True),
                                   f" is not one of {', '.join(METRICS)}."))
    if a.method not in ("exact", "attribution"):
        problems.append(Problem.of(Setting("ablation.method", a.method, quoted=True), ": use exact or attribution."))
    if a.verify_top is not None and a.method != "attribution":
        problems.append(Problem.of(Setting("ablation.verify_top"), " re-checks attribution's strongest features: "
                                   "use it with ", Setting("ablation.method", "attribution"), "."))
    if not is_ablation(a.kind):
        problems.append(Problem.of(Setting("ablation.kind", a.kind, quoted=isinstance(a.kind, str)),
                                   ": use zero, mean or a finite scale factor such as 0.5."))
    if a.kind == "mean" and prompts.rows is None:
        problems.append(Problem.of(Setting("ablation.kind", "mean"), " takes each feature's mean from the store: "
                                   "give prompts as ", Setting("prompts.rows"), " of ", Setting("store.path"), "."))

    model, fs = cfg.model, None
    if prompts.rows is not None:
        start, stop = prompts.rows
        if not 0 <= start < stop:
            problems.append(Problem.of(Setting("prompts.rows", (start, stop)),
                                       " is empty: write START:STOP with START < STOP."))
        fs = FeatureStore.open(cfg.store.path)
        model = model or fs.run["model"]["name"]
        if a.metric == "logit_diff":
            problems.append(Problem.of(
                Setting("ablation.metric", "logit_diff"), " needs answers, which store rows do not have: use ",
                Setting("ablation.metric", "loss"), " or kl, or give ", Setting("prompts.file"),
                " FILE.jsonl with answer and wrong_answer fields."))
    elif prompts.file is not None:
        if model is None or cfg.sae is None:
            problems.append(Problem.of("with ", Setting("prompts.file"), ", name the ", Setting("model"), " and the ",
                                       Setting("sae"), " to ablate."))
        problems += _check_prompt_file(cfg)
    attrs = fs.attrs if fs is not None else read_root_attrs(normalize(cfg.store.path))
    if attrs is not None:  # a store of an older major is read-only: refused before any model loads
        check_writes(attrs, cfg.store.path)
    if problems:
        raise SettingsError("SweepConfig", problems, SWEEP_FLAGS)
    source, described = None, None
    if cfg.sae is not None:  # its name and hook (a small config read, no weights)
        from pipeline.saes import SAESource, read_sae_config

        try:
            source = SAESource.parse(cfg.sae)
            described = read_sae_config(source)
        except ConfigError as e:
            raise SettingsError("SweepConfig", problems_of(e, SWEEP_FLAGS), SWEEP_FLAGS) from e
    if fs is None:
        if cfg.sae_name not in (None, described.name, described.hook):
            raise SettingsError("SweepConfig", [Problem.of(
                Setting("sae_name", cfg.sae_name, quoted=True), " is not ", Setting("sae", cfg.sae),
                f", which is named {described.name!r} and reads {described.hook!r}. With ", Setting("prompts.file"),
                " the SAE swept is that of ", Setting("sae"), " (NAME=SOURCE names it): leave ", Setting("sae_name"),
                " out.")], SWEEP_FLAGS)
        job = SweepJob(model=model, sae=str(source), sae_name=described.name, hook=described.hook, config=cfg)
        d_sae = described.d_sae
    else:
        record = _store_sae(fs, cfg, source, described)
        job = SweepJob(model=model, sae=record["source"] if source is None else str(source), sae_name=record["name"],
                       hook=record["hook"], config=cfg)
        d_sae = record["d_sae"]
    outside = sorted({f for f in a.features or () if not 0 <= f < d_sae})
    if outside:
        raise SettingsError("SweepConfig", [Problem.of(
            Setting("ablation.features", a.features), f": {', '.join(map(str, outside[:10]))} "
            f"{'is not a feature' if len(outside) == 1 else 'are not features'} of the SAE {job.sae_name!r}, whose ids are "
            f"0..{d_sae - 1}.")], SWEEP_FLAGS)
    return job


def _not_whole_numbers(cfg: SweepConfig) -> list[Problem]:
    """Rows and feature ids given from Python as something else ("0:8", "1,2,3"), which the checks
    after this one would fail on."""
    rows, features = cfg.prompts.rows, cfg.ablation.features
    problems = []
    if rows is not None and not (isinstance(rows, (tuple, list)) and len(rows) == 2 and all(map(is_whole, rows))):
        problems.append(Problem.of(Setting("prompts.rows", rows, quoted=isinstance(rows, str)),
                                   " must be two whole numbers, START and STOP: write rows=(0, 64)."))
    if features is not None and not (isinstance(features, (tuple, list, range)) and len(features)
                                     and all(map(is_whole, features))):
        problems.append(Problem.of(Setting("ablation.features", features, quoted=isinstance(features, str)),
                                   " must be feature ids, whole numbers: write features=(12, 408), or leave it out "
                                   "for every live feature."))
    return problems


def _store_sae(fs, cfg: SweepConfig, source, described) -> dict:
    """The run-record entry of the store's SAE that the sweep reads live features and means from:
    the one ``sae_name`` names, else the one ``sae`` names (NAME=SOURCE), else the store's only SAE,
    else the one at the hook of ``sae``. An ``sae`` given must be of its hook and width."""
    if cfg.sae_name is not None and source is not None and source.name not in (None, cfg.sae_name):
        raise SettingsError("SweepConfig", [Problem.of(
            Setting("sae_name", cfg.sae_name, quoted=True), " and ", Setting("sae", cfg.sae),
            " name two SAEs: name the store's SAE once.")], SWEEP_FLAGS)
    key = (cfg.sae_name or (source and source.name) or (fs.saes[0] if len(fs.saes) == 1 else None)
           or (described and described.hook))
    if key is None:
        raise SettingsError("SweepConfig", [Problem.of(
            f"store {fs.location} holds several SAEs: choose one with ", Setting("sae_name"),
            f" ({', '.join(fs.saes)}).")], SWEEP_FLAGS)
    try:
        record = fs.sae_record(key)
    except ConfigError as e:  # an unknown name, or a hook that several SAEs read: the message lists them
        given = Setting("sae_name", key, quoted=True) if cfg.sae_name is not None else Setting("sae", cfg.sae)
        fix = [] if cfg.sae_name is not None else [" Choose the store's SAE with ", Setting("sae_name"), "."]
        raise SettingsError("SweepConfig", [Problem.of(given, f": {e}", *fix)], SWEEP_FLAGS) from None
    if described is not None and (described.hook, described.d_sae) != (record["hook"], record["d_sae"]):
        raise SettingsError("SweepConfig", [Problem.of(
            Setting("sae", cfg.sae), f" reads {described.hook!r} with {described.d_sae} features, but the store's "
            f"SAE {record['name']!r}, whose live features and means the sweep reads, reads {record['hook']!r} with "
            f"{record['d_sae']}. Leave ", Setting("sae"), " out to sweep the store's SAE, or give one trained "
            "like it.")], SWEEP_FLAGS)
    return record


def _check_prompt_file(cfg: SweepConfig) -> list[Problem]:
    path, metric = cfg.prompts.file, cfg.ablation.metric
    try:
        lines = read_prompt_file(path)
    except DataError as e:
        return [Problem.from_text(str(e), SWEEP_FLAGS)]
    for number, line in lines:
        missing = [k for k in PROMPT_FIELDS.get(metric, ("prompt",)) if not isinstance(line.get(k), str)]
        if missing:
            return [Problem.of(Setting("prompts.file", path), f": line {number} has no text field {', '.join(missing)}, "
                               "which ", Setting("ablation.metric", metric), " needs.")]
    return [] if lines else [Problem.of(Setting("prompts.file", path), " holds no prompts.")]


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

    with hold_lease(cfg.store.path, f"latentstore sweep {cfg.name}") as lease:  # before anything is read or written
        job = validate(cfg)
        ray = connect(cfg.resources.address, cfg.resources.cpus_wanted)
        try:
            resources = worker_resources(ray, cfg.resources.workers, cfg.resources.cpus_per_worker,
                                         cfg.resources.use_gpu)
        except ConfigError as e:
            raise as_settings_error("SweepConfig", e, SWEEP_FLAGS) from None
        job = replace(job, device=None if resources.use_gpu else "cpu", n_threads=resources.n_threads)
        policy = pool.Policy(
            label="sweep", submit=lambda actor, part: actor.run_part.remote(part),
            describe=lambda part: f"computing sweep part {part.part_id} "
                                  f"(prompts {part.prompt_start}-{part.prompt_stop - 1})")
        with pool.actors(ray, SweepWorker, job, resources, policy) as actors:
            # every prompt is checked before the sweep's record is written: a bad one must not leave a
            # sweep begun that no rerun of the same command can finish
            n_prompts = call(ray, actors[0].check_prompts.remote(), "loading the model, the SAE and the prompts")
            record = job.record(n_prompts)
            writer = SweepWriter(cfg.store.path, cfg.name)
            same = writer.existing_spec() is not None and not cfg.store.overwrite
            if same:
                features = writer.features()
            elif cfg.ablation.features is not None:
                features = np.unique(np.asarray(cfg.ablation.features, dtype=np.int64))
            else:
                features = call(ray, actors[0].live_features.remote(), "finding the live features")
            parts = plan_parts(n_prompts, features, cfg.store.prompts_per_part, cfg.store.features_per_part)
            prompt_rows = np.arange(*cfg.prompts.rows) if cfg.prompts.rows is not None else None
            done = writer.begin(record, features, prompt_rows, len(parts), cfg.store.overwrite)
            todo = [p for p in parts if p.part_id not in done]
            for part, marker in pool.run(ray, actors, todo, policy, progress=cfg.resources.progress,
                                         total=len(parts), initial=len(done), n_done=len(done)):
                done[part.part_id] = marker
            counts = {"n_prompts": n_prompts, "n_features": len(features), "n_parts": len(parts),
                      "n_lines": sum(m["n_lines"] for m in done.values())}
            lease.check()
            writer.finalize(counts)
            return counts
