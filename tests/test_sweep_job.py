"""`latentstore sweep` on Ray: parts written into the store, read back equal to ablation_sweep,
resumable; the worker alone; the CLI for sweep and steer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest


from conftest import WORDS
from jobs.cli import main
from jobs.extract import ExtractConfig, run_extract
from jobs.sweep import SweepConfig, SweepWorker, run_sweep, validate
from pipeline.ablation import StorePrompts, ablation_sweep
from pipeline.dataset import DatasetSpec
from pipeline.metrics import KLFromClean, LogitDiff
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore
from store.errors import ConfigError, StoreIncompleteError
from store.format import MARKER_GROUP
from store.location import open_root
from store.sweeps import read_sweep

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store(assets, ray_cluster, tmp_path_factory):
    """A float32 store over 14 short rows, so that each row is one prompt."""
    root = tmp_path_factory.mktemp("sweep")
    rng = random.Random(1)
    data = root / "short.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))}) + "\n"
                            for _ in range(14)))
    cfg = ExtractConfig.build(model=str(assets["model_dir"]), saes=(str(assets["sae_dirs"][HOOK]),),
                              dataset=DatasetSpec(str(data)), store=str(root / "s.zarr"), context_size=16,
                              shard_tokens=384, value_dtype="float32", workers=1, progress=False)
    run_extract(cfg)
    return cfg.store.path


@pytest.fixture(scope="module")
def loaded(assets):
    model = load_model(str(assets["model_dir"]))
    return model, load_sae(SAESource.parse(str(assets["sae_dirs"][HOOK])))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))),
              "answer": rng.choice(WORDS), "wrong_answer": rng.choice(WORDS)} for _ in range(9)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, lines


def test_store_rows_sweep_equals_ablation_sweep_and_resumes(store, loaded, tmp_path):
    model, sae = loaded
    cfg = SweepConfig.build(name="rows-last", store=store, rows=(2, 12), metric="kl", prompts_per_part=5,
                            features_per_part=30, workers=2, cpus_per_worker=1, progress=False)
    counts = run_sweep(cfg)
    stored = read_sweep(store, "rows-last")
    assert stored.attrs["sweep"]["metric"] == "kl" and stored.attrs["sweep"]["position"] == -1
    assert counts["n_parts"] > 3 and counts["n_lines"] == len(stored) == 10 * counts["n_features"]

    prompts = StorePrompts.from_store(FeatureStore.open(store), range(2, 12))
    metric = KLFromClean.from_model(model, prompts.tokens, attention_mask=prompts.attention_mask)
    expected = ablation_sweep(model, sae, prompts, metric)
    assert list(stored["row"]) == list(expected["row"])
    np.testing.assert_array_equal(stored["feature"], expected["feature"])
    scale = np.abs(expected["delta"]).max()
    assert scale > 1e-3
    np.testing.assert_allclose(stored["delta"], expected["delta"], rtol=1e-4, atol=1e-4 * scale)

    # Lose one part as a crash would (its marker never written): the sweep is incomplete, and
    # rerunning the command redoes that part only.
    parts = open_root(store, mode="a")["sweeps/rows-last/parts"]
    del parts["000002"][MARKER_GROUP]
    root = open_root(store, mode="a")["sweeps/rows-last"]
    root.attrs.update({"latentstore": {**root.attrs["latentstore"], "status": "writing"}})
    with pytest.raises(StoreIncompleteError, match="Run the same `latentstore sweep` command"):
        read_sweep(store, "rows-last")
    before = {name: parts[name]["complete"].attrs["latentstore"]["written_at"]
              for name in parts.group_keys() if name != "000002"}
    run_sweep(cfg.changed(workers=1))  # the spec is the same: it resumes
    parts = open_root(store, mode="r")["sweeps/rows-last/parts"]
    assert {name: parts[name]["complete"].attrs["latentstore"]["written_at"] for name in before} == before
    again = read_sweep(store, "rows-last")
    np.testing.assert_array_equal(again["delta"], stored["delta"])


def test_worker_alone_on_a_prompt_file(assets, prompt_file, loaded, tmp_path):
    path, lines = prompt_file
    model, sae = loaded
    cfg = SweepConfig.build(name="file", store=str(tmp_path / "out.zarr"), prompts=str(path),
                            model=str(assets["model_dir"]), sae=str(assets["sae_dirs"][HOOK]), position=None)
    worker = SweepWorker(validate(cfg))
    live = worker.live_features()
    tokens, mask = worker.tokens, worker.mask
    metric = LogitDiff.from_strings(model, [l["answer"] for l in lines], [l["wrong_answer"] for l in lines])
    expected = ablation_sweep(model, sae, tokens, metric, position=None, attention_mask=mask)
    np.testing.assert_array_equal(live, np.unique(expected["feature"]))


def test_cli_sweep_from_prompt_file_and_steer(assets, prompt_file, ray_cluster, tmp_path, capsys):
    path, _ = prompt_file
    out = str(tmp_path / "out.zarr")
    args = ["sweep", "--name", "file-attr", "--store", out, "--prompts", str(path), "--model", str(assets["model_dir"]),
            "--sae", str(assets["sae_dirs"][HOOK]), "--method", "attribution", "--verify-top", "2",
            "--prompts-per-part", "5", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    frame = read_sweep(out, "file-attr")
    assert set(frame["method"]) == {"exact", "attribution"}
    assert frame.loc[frame["method"] == "exact", "feature"].nunique() <= 4  # the top 2 of each prompt block
    assert "attribution" in frame
    capsys.readouterr()

    assert main(["steer", "--model", str(assets["model_dir"]), "--sae", str(assets["sae_dirs"][HOOK]),
                 "--feature", "3", "--magnitude", "20", "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().startswith("the cat")


def test_errors_name_the_problem(store, assets, tmp_path):
    with pytest.raises(ConfigError, match="needs answers"):
        validate(SweepConfig.build(name="x", store=store, rows=(0, 3)))
    with pytest.raises(ConfigError, match=r"SweepConfig.sae_name='blocks.5.hook_resid_post': store .* has no SAE "
                                          r"named 'blocks.5.hook_resid_post' \(nor one at a hook of that name\); "
                                          rf"its SAEs: {HOOK}"):
        validate(SweepConfig.build(name="x", store=store, rows=(0, 3), metric="kl",
                                   sae_name="blocks.5.hook_resid_post"))
    with pytest.raises(ConfigError, match="sweep name"):
        validate(SweepConfig.build(name="a/b", store=store, rows=(0, 3), metric="kl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the cat", "answer": "cat dog", "wrong_answer": "red"}) + "\n")
    cfg = SweepConfig.build(name="bad", store=str(tmp_path / "o.zarr"), prompts=str(bad),
                            model=str(assets["model_dir"]), sae=str(assets["sae_dirs"][HOOK]))
    worker = SweepWorker(validate(cfg))
    with pytest.raises(ConfigError, match="'cat dog' is 2 tokens"):
        worker.prompts(0, 1)
    with pytest.raises(ConfigError, match="'cat dog' is 2 tokens"):
        worker.check_prompts()  # as a part would meet it, without a forward
    with pytest.raises(ConfigError, match=r"features=\(3, 4096, -1\): -1, 4096 are not features of the SAE "
                                          rf"'{HOOK}', whose ids are 0\.\.95\."):
        validate(SweepConfig.build(name="x", store=store, rows=(0, 3), metric="kl", features=(3, 4096, -1)))
    for scale in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=r"ablation\.kind=.*: use zero, mean or a finite scale factor"):
            validate(SweepConfig.build(name="x", store=store, rows=(0, 3), metric="kl", ablation=float(scale)))


def test_a_bad_prompt_is_refused_before_the_sweep_is_begun(store, ray_cluster):
    """A position outside the prompts fails the run as it loads, before the sweep's record is
    written: a part would have met it only after, leaving a sweep begun that no rerun of the same
    command could finish, and that the corrected command was refused as "a different sweep"."""
    from dataclasses import replace

    from store.errors import StoreNotFoundError

    bad = SweepConfig.build(name="late", store=store, rows=(0, 14), metric="kl", position=40, features=(1, 2),
                            workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"position 40 is outside prompt 0, which has \d+ tokens") as err:
        run_sweep(bad)
    assert "(while loading the model, the SAE and the prompts)" in err.value.__notes__
    with pytest.raises(StoreNotFoundError, match="has no sweep 'late'"):
        read_sweep(store, "late")
    good = replace(bad, ablation=replace(bad.ablation, position=-1))
    assert run_sweep(good)["n_lines"] == 14 * 2


def test_a_worker_that_cannot_load_its_sae_reports_the_real_error(assets, prompt_file, ray_cluster, tmp_path):
    """A truncated SAE weights file fails in the sweep workers' constructor: the user gets its
    ConfigError, with what was under way, and not Ray's ActorDiedError."""
    import shutil

    sae = tmp_path / "truncated-sae"
    shutil.copytree(assets["sae_dirs"][HOOK], sae)
    weights = sae / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = SweepConfig.build(name="bad-sae", store=str(tmp_path / "out.zarr"), prompts=str(prompt_file[0]),
                            model=str(assets["model_dir"]), sae=str(sae), workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"sae_weights\.safetensors is not a readable safetensors file") as err:
        run_sweep(cfg)
    assert "(while loading the model, the SAE and the prompts)" in err.value.__notes__


def test_a_part_given_again_after_it_was_finished_is_kept(assets, prompt_file, tmp_path):
    """A worker that dies after a part's completion marker but before returning it gets the part
    again (Ray retries the call): it returns the marker and leaves the part as it is, since
    readers may be reading it (tests/test_index_sweep_faults.py kills workers on Ray)."""
    from jobs.sweep import plan_parts
    from store.sweeps import SweepWriter

    cfg = SweepConfig.build(name="again", store=str(tmp_path / "out.zarr"), prompts=str(prompt_file[0]),
                            model=str(assets["model_dir"]), sae=str(assets["sae_dirs"][HOOK]), features=(1, 2, 3))
    job = validate(cfg)
    worker = SweepWorker(job)
    features = np.array(cfg.ablation.features)
    parts = plan_parts(worker.n_prompts(), features, cfg.store.prompts_per_part, cfg.store.features_per_part)
    SweepWriter(cfg.store.path, cfg.name).begin(job.record(worker.n_prompts()), features, None, len(parts),
                                                overwrite=False)
    first = worker.run_part(parts[0])
    marker = tmp_path / "out.zarr" / "sweeps" / "again" / "parts" / "000000" / MARKER_GROUP / "zarr.json"
    written = marker.stat().st_mtime_ns
    assert worker.run_part(parts[0]) == first
    assert marker.stat().st_mtime_ns == written
    assert len(read_sweep(cfg.store.path, "again", allow_incomplete=True)) == 9 * 3
