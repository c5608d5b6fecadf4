"""The commands' configs: nested specs with one default each, problems reported together, each naming
the setting as its reader knows it (the config's field from Python, the flag on the command line);
one driver loop for every command; no import loop in ``jobs``."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from jobs.cli import build_parser, main
from jobs.extract import ExtractConfig, validate
from jobs.settings import EXTRACT_FLAGS, SWEEP_FLAGS, SettingsError, default_of
from jobs.sweep import SweepConfig, SweepJob
from jobs.sweep import validate as validate_sweep
from pipeline.dataset import DatasetSpec
from pipeline.specs import ModelSpec, Resources, StoreSpec
from store.errors import ConfigError
from tests.stores import config

ROOT = Path(__file__).parent.parent


# -- building a config -------------------------------------------------------------------------


def test_a_notebook_builds_an_extract_config_in_one_call():
    cfg = ExtractConfig.build(model="gpt2-small", saes=["gpt2-small-res-jb/blocks.8.hook_resid_pre"],
                              dataset="NeelNanda/pile-10k", store="gpt2.zarr", max_tokens=1000, workers=4)
    assert cfg.model == ModelSpec("gpt2-small")
    assert cfg.dataset == DatasetSpec("NeelNanda/pile-10k", max_tokens=1000)
    assert cfg.store == StoreSpec("gpt2.zarr")
    assert cfg.resources == Resources(workers=4)
    assert (cfg.dataset.context_size, cfg.store.top_k, cfg.resources.batch_size) == (128, 100, 32)
    # the same config, written out
    assert cfg == ExtractConfig(model=ModelSpec("gpt2-small"), saes=["gpt2-small-res-jb/blocks.8.hook_resid_pre"],
                                dataset=DatasetSpec("NeelNanda/pile-10k", max_tokens=1000),
                                store=StoreSpec("gpt2.zarr"), resources=Resources(workers=4))


def test_changed_sets_one_setting_and_keeps_the_rest():
    cfg = ExtractConfig.build(model="m", saes=("s",), dataset="d.jsonl", store="a.zarr", context_size=16, top_k=7)
    other = cfg.changed(store="b.zarr", context_size=8, model_dtype="float16")
    assert other.store == StoreSpec("b.zarr", top_k=7)  # a path alone changes the path only
    assert other.dataset == DatasetSpec("d.jsonl", context_size=8)
    assert other.model == ModelSpec("m", dtype="float16")
    assert cfg.dataset.context_size == 16  # frozen: the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dataset.context_size = 3


def test_an_unknown_setting_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^ExtractConfig\.build has no setting 'contxt_size'; its settings are: "
                                          r"context_size, "):
        ExtractConfig.build(model="m", saes=("s",), dataset="d", store="s.zarr", contxt_size=64)
    with pytest.raises(ConfigError, match=r"SweepConfig\.changed has no setting 'metrc'; its settings are: metric"):
        SweepConfig.build(name="n", store="s.zarr", rows=(0, 4)).changed(metrc="kl")


def test_build_without_a_setting_that_has_no_default_names_it():
    with pytest.raises(ConfigError) as refused:
        ExtractConfig.build(store="s.zarr")
    assert str(refused.value) == (
        "ExtractConfig.build needs model, saes, dataset, which have no default: write ExtractConfig.build(model=..., "
        "saes=..., dataset=..., ...). The command line's embedded default is model=str(pipeline.default.MODEL_DIR), "
        "saes=[str(p) for p in pipeline.default.default_sae_dirs()], dataset=str(pipeline.default.TRAIN_CORPUS).")
    with pytest.raises(ConfigError, match=r"^SweepConfig\.build needs name, store, which have no default: write "
                                          r"SweepConfig\.build\(name=\.\.\., store=\.\.\., \.\.\.\)\.$"):
        SweepConfig.build(rows=(0, 4))


def test_sweep_rows_and_features_from_python_must_be_whole_numbers(tmp_path):
    for settings, problem in [
        (dict(rows="1:2"), "SweepConfig.prompts.rows='1:2' must be two whole numbers, START and STOP: write "
                           "rows=(0, 64)."),
        (dict(rows=(0, 2.5)), "SweepConfig.prompts.rows=(0, 2.5) must be two whole numbers, START and STOP: write "
                              "rows=(0, 64)."),
        (dict(rows=(0, 4), features="1,2,3"), "SweepConfig.ablation.features='1,2,3' must be feature ids, whole "
                                              "numbers: write features=(12, 408), or leave it out for every live "
                                              "feature."),
        (dict(rows=(0, 4), features=()), "SweepConfig.ablation.features=() must be feature ids, whole numbers: "
                                         "write features=(12, 408), or leave it out for every live feature."),
    ]:
        with pytest.raises(SettingsError) as refused:
            validate_sweep(SweepConfig.build(name="s", store=str(tmp_path / "none.zarr"), metric="kl", **settings))
        assert refused.value.problems == [problem], settings


def test_a_config_comes_back_from_its_dict_and_refuses_unknown_keys():
    cfg = SweepConfig.build(name="n", store="s.zarr", rows=(0, 4), features=(3, 1), workers=2)
    assert SweepConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    extract = ExtractConfig.build(model="m", saes=("a", "b"), dataset="d", store="s.zarr", context_size=16)
    assert ExtractConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(extract)))) == extract
    data = {**dataclasses.asdict(extract), "dataset": {"name": "d", "context_sise": 16}, "extra": 1}
    with pytest.raises(ConfigError) as refused:
        ExtractConfig.from_dict(data)
    assert refused.value.problems[0].startswith("ExtractConfig has no field 'extra'; its fields are: ")
    assert refused.value.problems[1].startswith("ExtractConfig.dataset has no field 'context_sise'; its fields are: "
                                                "context_size, ")


def test_sweep_settings_go_to_their_specs():
    cfg = SweepConfig.build(name="n", store="s.zarr", rows=(0, 4), metric="kl", ablation=0.5, prompts_per_part=5,
                            workers=2)
    assert (cfg.prompts.rows, cfg.prompts.file) == ((0, 4), None)
    assert (cfg.ablation.kind, cfg.ablation.metric, cfg.ablation.position) == (0.5, "kl", -1)
    assert (cfg.store.path, cfg.store.prompts_per_part, cfg.store.features_per_part) == ("s.zarr", 5, 256)
    assert cfg.resources == Resources(workers=2)
    assert SweepJob(model="m", sae="s", sae_name="n", hook="h", config=cfg).record(4) == {
        "model": "m", "sae": "s", "sae_name": "n", "hook": "h", "prompts": {"store_rows": [0, 4]}, "n_prompts": 4,
        "metric": "kl",
        "position": -1, "features": "live", "ablation": 0.5, "use_error_term": False, "method": "exact",
        "verify_top": None, "prompts_per_part": 5, "features_per_part": 256}


def test_the_command_lines_defaults_are_the_specs():
    """Each default is declared once, in its spec: the parsers show and use the same values."""
    parser = build_parser()
    extract = parser.parse_args(["extract"])
    for name in ("context_size", "batch_size", "shard_tokens", "top_k", "value_dtype", "split", "text_column"):
        assert getattr(extract, name) == default_of(ExtractConfig, name), name
    assert (default_of(ExtractConfig, "context_size"), default_of(ExtractConfig, "top_k")) == (128, 100)
    from jobs.sweep_cli import sweep_config

    sweep = sweep_config(parser.parse_args(["sweep", "--name", "n", "--store", "s.zarr", "--rows", "0:4"]))
    assert sweep == SweepConfig.build(name="n", store="s.zarr", rows=(0, 4))
    assert (sweep.ablation.metric, sweep.store.prompts_per_part, sweep.resources.batch_size) == ("logit_diff", 16, 32)


def _options(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def test_every_setting_has_its_flag_and_every_flag_its_setting():
    parser = build_parser()
    for command, flags, config_type in (("extract", EXTRACT_FLAGS, ExtractConfig), ("sweep", SWEEP_FLAGS, SweepConfig)):
        options = _options(parser, command)
        named = {f.name for f in flags.values() if f.name} | {s for f in flags.values() for s in f.switches.values()}
        assert named - options == set(), command
        assert options - named - {"-h", "--help", "--hook"} == set(), command  # --hook: --sae-name's old spelling
        assert set(config_type.settings().values()) - set(flags) <= set(config_type.SPECS), command


# -- problems, named for their reader ------------------------------------------------------------


def test_python_callers_get_field_names(assets, tmp_path):
    with pytest.raises(SettingsError) as refused:
        validate(config(assets, tmp_path / "s.zarr", context_size=0))
    assert refused.value.problems == ["ExtractConfig.dataset.context_size must be positive, got 0."]
    assert str(refused.value) == "ExtractConfig.dataset.context_size must be positive, got 0."
    assert not (tmp_path / "s.zarr").exists()


def test_command_line_users_get_flags(assets, tmp_path, capsys):
    argv = ["extract", "--model", str(assets["model_dir"]), "--sae", str(assets["sae_dirs"]["blocks.0.hook_resid_post"]),
            "--dataset", str(assets["jsonl"]), "--store", str(tmp_path / "s.zarr"), "--context-size", "0",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "latentstore extract: error: --context-size must be positive, got 0.\n"


def test_several_problems_are_reported_together(assets, tmp_path, capsys):
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    changes = dict(batch_size=0, top_k=-1, value_dtype="int8", context_size=1, tokens_column="ids", prepend_bos=True,
                   dataset=str(sheet))
    with pytest.raises(SettingsError) as refused:
        validate(config(assets, tmp_path / "s.zarr", **changes))
    problems = refused.value.problems
    assert problems[:4] == [
        "ExtractConfig.resources.batch_size must be positive, got 0.",
        "ExtractConfig.store.top_k must be positive, got -1.",
        "ExtractConfig.store.value_dtype='int8' is not one of bfloat16, float16, float32.",
        "ExtractConfig.dataset.prepend_bos=True cannot be used with ExtractConfig.dataset.tokens_column: "
        "pre-tokenized rows are used as given.",
    ]
    assert len(problems) == 5 and problems[4] == f"ExtractConfig.dataset.name {sheet}: unknown file type. " \
        "Use a .jsonl, .json, .parquet, .csv or .txt file (optionally compressed, e.g. .jsonl.gz), or a folder " \
        "written by Dataset.save_to_disk."
    assert str(refused.value).startswith("5 problems:\n  - ExtractConfig.resources.batch_size must be positive")

    cli = refused.value.for_command_line()
    assert cli.problems[:4] == [
        "--batch-size must be positive, got 0.",
        "--top-k must be positive, got -1.",
        "--value-dtype 'int8' is not one of bfloat16, float16, float32.",
        "--prepend-bos cannot be used with --tokens-column: pre-tokenized rows are used as given.",
    ]
    assert cli.problems[4].startswith(f"--dataset {sheet}: unknown file type. Use a .jsonl")

    argv = ["extract", "--model", str(assets["model_dir"]), "--sae", str(assets["sae_dirs"]["blocks.0.hook_resid_post"]),
            "--dataset", str(sheet), "--store", str(tmp_path / "s.zarr"), "--batch-size", "0",
            "--top-k", "-1", "--tokens-column", "ids", "--prepend-bos", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore extract: error: 5 problems:\n  - --batch-size must be positive, got 0.\n"
                          "  - --top-k must be positive, got -1.\n"
                          "  - --context-size 128 is longer than the model's context (n_ctx=64). Use --context-size 64 "
                          "or less.\n  - --prepend-bos cannot be used with --tokens-column: pre-tokenized rows are used "
                          f"as given.\n  - --dataset {sheet}: unknown file type.")
    assert "ExtractConfig" not in err


def test_a_value_and_its_switch_are_shown_as_each_reader_writes_them(assets, tmp_path):
    with pytest.raises(SettingsError) as refused:
        validate(config(assets, tmp_path / "s.zarr", context_size=1))
    assert refused.value.problems == [
        "ExtractConfig.dataset.context_size=1 leaves no room for text: every window starts with the BOS token. "
        "Use ExtractConfig.dataset.context_size=2 or more, or ExtractConfig.dataset.prepend_bos=False."]
    assert refused.value.for_command_line().problems == [
        "--context-size 1 leaves no room for text: every window starts with the BOS token. "
        "Use --context-size 2 or more, or --no-prepend-bos."]


def test_a_spec_given_as_a_plain_value_is_named_with_the_fix(assets, tmp_path):
    cfg = ExtractConfig(model=str(assets["model_dir"]), saes="one-sae", dataset=DatasetSpec(str(assets["jsonl"])),
                        store=StoreSpec(str(tmp_path / "s.zarr")))
    with pytest.raises(SettingsError) as refused:
        validate(cfg)
    assert refused.value.problems == [
        f"ExtractConfig.model must be a ModelSpec, got str {str(assets['model_dir'])!r}. Write "
        f"ModelSpec({str(assets['model_dir'])!r}), or build the config with "
        f"ExtractConfig.build(model={str(assets['model_dir'])!r}, ...).",
        "ExtractConfig.saes must be a sequence of SAE sources, one per SAE; got the string 'one-sae'. "
        "Write saes=('one-sae',)."]


def test_sweep_problems_name_fields_from_python_and_flags_on_the_command_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    cfg = SweepConfig.build(name="s", store=str(tmp_path / "o.zarr"), prompts=str(prompts), batch_size=0,
                            metric="logit_diff", method="fast")
    with pytest.raises(SettingsError) as refused:
        validate_sweep(cfg)
    assert refused.value.problems == [
        "SweepConfig.resources.batch_size must be positive, got 0.",
        "SweepConfig.ablation.method='fast': use exact or attribution.",
        "with SweepConfig.prompts.file, name the SweepConfig.model and the SweepConfig.sae to ablate.",
        f"SweepConfig.prompts.file={str(prompts)!r}: line 1 has no text field answer, wrong_answer, which "
        "SweepConfig.ablation.metric='logit_diff' needs.",
    ]
    assert main(["sweep", "--name", "s", "--store", str(tmp_path / "o.zarr"), "--prompts", str(prompts),
                 "--batch-size", "0", "--metric", "kl"]) == 2
    assert capsys.readouterr().err == (
        "latentstore sweep: error: 2 problems:\n  - --batch-size must be positive, got 0.\n"
        "  - with --prompts, name the --model and the --sae to ablate.\n")


# -- one driver loop ---------------------------------------------------------------------------


class FakeRay:
    """What ``jobs.pool.run`` needs of Ray: calls finish in the order they were made."""

    class exceptions:
        class RayTaskError(Exception):
            pass

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        worker, item = ref
        self.log.append(("done", worker, item))
        return item * 10


def test_the_pool_gives_each_worker_its_share_and_yields_every_result():
    from jobs import pool

    ray = FakeRay()

    def submit(worker, item):
        in_flight = sum(1 for e in ray.log if e[1] == worker and e[0] == "start") - \
            sum(1 for e in ray.log if e[1] == worker and e[0] == "done")
        assert in_flight < 2  # never more than calls_per_worker at once
        ray.log.append(("start", worker, item))
        return worker, item

    policy = pool.Policy(label="t", submit=submit, describe=str, calls_per_worker=2)
    results = list(pool.run(ray, ["a", "b"], range(7), policy, progress=False))
    assert sorted(results) == [(i, i * 10) for i in range(7)]
    assert [e[2] for e in ray.log if e[0] == "start"][:4] == [0, 1, 2, 3]  # both workers filled first
    assert {e[1] for e in ray.log} == {"a", "b"}


# -- no import loop in jobs ----------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The jobs modules a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "jobs":
                found |= {f"jobs.{a.name}" for a in node.names}
            elif node.module.startswith("jobs."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jobs.")}
    return found


def test_no_module_of_jobs_imports_one_that_imports_it_back():
    graph = {f"jobs.{p.stem}": _imports(p) for p in (ROOT / "jobs").glob("*.py")}
    loops = []

    def visit(module, path):
        for nxt in sorted(graph.get(module, ())):
            if nxt == path[0]:
                loops.append(path + [nxt])
            elif nxt not in path:
                visit(nxt, path + [nxt])

    for module in graph:
        visit(module, [module])
    assert loops == []
    for layer in ("pipeline", "store"):  # and nothing below jobs imports it
        assert not [p for p in (ROOT / layer).rglob("*.py") if _imports(p)], layer
