"""The extraction job on a real local Ray cluster: worker counts, resuming, --max-tokens, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.extract import run_extract, validate
from pipeline.dataset import DatasetSpec
from store import FeatureStore
from store.errors import ConfigError, StoreConflictError
from store.writer import StoreWriter
from tests.conftest import make_sae
from tests.stores import assert_same_store, config

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("workers", [2, 3])
def test_more_workers_equal_one(assets, reference_store, tmp_path, workers):
    """The plan depends on the data alone: the same shards, the same store, for 1, 2 or 3 workers."""
    cfg = config(assets, tmp_path / "many.zarr", workers=workers)
    run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert_same_store(fs, reference_store)
    assert fs.attrs["shards"] == reference_store.attrs["shards"]


def test_warm_actors_build_the_index_when_they_hold_every_cpu(assets, reference_store, tmp_path, monkeypatch):
    """At its end, the extraction's actors build the index (no fresh Ray workers to start) when they
    hold every CPU of the cluster (6 in the tests': 2 workers of 3 cores), a call per core each;
    otherwise (2 workers of 1 core) tasks take the CPUs. Both index every entry as the store holds it."""
    import jobs.index

    run_index, given = jobs.index.run_index, []

    def recording(location, **kwargs):
        given.append(kwargs.get("builders"))
        return run_index(location, **kwargs)

    monkeypatch.setattr(jobs.index, "run_index", recording)
    for path, cpus in (("warm.zarr", None), ("tasks.zarr", 1)):
        run_extract(config(assets, tmp_path / path, workers=2, cpus_per_worker=cpus))
    (callables, calls), tasks = given
    assert (len(callables), calls, tasks) == (2, 3, None)
    for path in ("warm.zarr", "tasks.zarr"):
        fs = FeatureStore.open(str(tmp_path / path))
        for name in fs.saes:
            columns, index = reference_store.csr(name).tocsc(), fs.index(name)
            assert index is not None
            for feature in range(fs.d_sae(name)):
                tokens, values = index.entries(feature)
                column = columns[:, feature]
                order = np.lexsort((column.indices, -column.data))  # highest first, earlier token on ties
                np.testing.assert_array_equal(tokens, column.indices[order])
                np.testing.assert_array_equal(values, column.data[order])


def test_warm_actor_killed_mid_index_part_then_the_index_is_whole(assets, reference_store, tmp_path, monkeypatch):
    """The extraction's actor SIGKILLed while it builds an index part, its arrays written and no marker:
    Ray starts the actor again, the part is built again in the new process, and the index equals the
    reference store's (built by the same plan)."""
    import jobs.extract
    from tests import fault_injection
    from tests.test_index_sweep_faults import Background, assert_same_index, index_contents, wait_for_stalls
    from tests.test_index_sweep_faults import plan as plan_faults

    path, target = tmp_path / "killed.zarr", f"{reference_store.saes[0]}/0"
    faults = plan_faults(fault_injection.fault_dir(str(path), "index"), before=[target], after=[])
    monkeypatch.setattr(jobs.extract, "ExtractWorker", fault_injection.extract_worker_class())
    job = Background(run_extract, config(assets, path))
    [pid] = wait_for_stalls(faults, [target], 120, running=job.running).values()
    os.kill(pid, signal.SIGKILL)
    job.join(180)
    assert_same_index(index_contents(path), index_contents(Path(reference_store.location)))
    attempts = [c["pid"] for c in fault_injection.calls(faults) if c["target"] == target]
    assert len(attempts) == 2 and attempts[0] == pid != attempts[1]


def test_max_tokens_is_exact_and_a_prefix(assets, reference_store, tmp_path):
    cut = 1001  # inside a row, in the third shard
    row = reference_store.provenance(cut - 1, cut + 1)["row"].to_numpy()
    assert row[0] == row[1]
    cfg = config(assets, tmp_path / "cut.zarr", workers=2, max_tokens=cut)
    counts = run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert counts["n_tokens"] == fs.n_tokens == cut and len(fs.shards) == 3
    np.testing.assert_array_equal(fs.token_ids(), reference_store.token_ids(0, cut))
    assert fs.provenance().equals(reference_store.provenance(0, cut))
    for hook in fs.hooks:
        assert (fs.csr(hook) != reference_store.csr(hook, 0, cut)).nnz == 0
    # shards past the cut are gone from the store, not just unlisted
    assert StoreWriter(cfg.store.path).shard_ids() == {s.shard_id for s in fs.shards}


def test_rerun_after_partial_run_resumes_to_identical_store(assets, reference_store, tmp_path, ray_cluster):
    cfg = config(assets, tmp_path / "resume.zarr")
    shutil.copytree(reference_store.location, cfg.store.path)  # a finished run of this config
    writer = StoreWriter(cfg.store.path)
    # Make the store look like a crash: two shards gone, one half-written (no marker), root not final.
    writer.delete_shard(1)
    writer.delete_shard(4)
    marker_dir = Path(cfg.store.path) / "shards" / "000006" / "complete"
    for f in marker_dir.iterdir():
        f.unlink()
    marker_dir.rmdir()
    writer._set_root(status="writing")
    partial = FeatureStore.open(cfg.store.path)
    assert not partial.complete and {s.shard_id for s in partial.shards}.isdisjoint({1, 4, 6})
    run_extract(cfg)
    assert_same_store(FeatureStore.open(cfg.store.path), reference_store)


def test_killed_driver_then_rerun_gives_identical_store(assets, reference_store, tmp_path, ray_cluster):
    """The driver dies part-way (SIGKILL); the same command, run again, finishes the same store.
    Both runs use the reference's batch size: another batch shape changes float32 rounding, and so
    can flip a bfloat16 value (stack.md)."""
    store = tmp_path / "killed.zarr"
    address = ray_cluster.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--model", str(assets["model_dir"]),
            *[a for d in assets["sae_dirs"].values() for a in ("--sae", str(d))],
            "--dataset", str(assets["jsonl"]), "--store", str(store), "--context-size", "16",
            "--batch-size", str(config(assets, store).resources.batch_size), "--shard-tokens", "384", "--top-k", "7", "--workers", "1", "--address", address,
            "--no-progress"]
    proc = subprocess.Popen(argv, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (store / "shards" / "000001" / "complete").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = FeatureStore.open(str(store))
    assert not interrupted.complete and 0 < len(interrupted.shards) < 8
    run_extract(config(assets, store))
    assert_same_store(FeatureStore.open(str(store)), reference_store)


def test_pretokenized_rows_are_used_exactly(assets, tmp_path):
    import datasets

    rows = [[3, 4, 5, 6, 7, 8, 9], [2], [10, 11, 12, 13, 14, 15, 16, 2, 3, 4]]
    path = tmp_path / "tokens.parquet"
    datasets.Dataset.from_dict({"ids": rows}).to_parquet(str(path))
    cfg = config(assets, tmp_path / "tok.zarr", dataset=DatasetSpec(str(path), tokens_column="ids"),
                 context_size=4)
    run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    np.testing.assert_array_equal(fs.token_ids(), np.concatenate(rows))  # no BOS added anywhere
    prov = fs.provenance()
    np.testing.assert_array_equal(prov["row"], np.repeat([0, 1, 2], [7, 1, 10]))
    np.testing.assert_array_equal(prov["pos"], np.concatenate([np.arange(7), [0], np.arange(10)]))
    assert fs.run["prepend_bos"] is False


@pytest.mark.parametrize("fmt", ["json", "csv", "txt", "folder"])
def test_local_dataset_formats_give_the_same_rows_and_tokens(assets, tmp_path, fmt):
    """Each local format reads as the same rows, which the workers tokenize the same way (the jsonl
    that every other test extracts is the reference)."""
    import datasets

    from pipeline.dataset import open_dataset, tokenize_rows

    texts = [t for t in assets["texts"][:6] if t]
    ds = datasets.Dataset.from_dict({"text": texts})
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        ds.save_to_disk(str(path))
    spec = DatasetSpec(str(path))
    rows = open_dataset(spec)[0:len(texts) + 1][spec.column]  # one past the end: no extra row appears
    assert rows == texts
    tok = assets["tokenizer"]
    tokens = tokenize_rows(rows, range(len(rows)), tok, pretokenized=False, d_vocab=len(tok))
    assert [t.tolist() for t in tokens] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# -- bad input: refused before any model runs, and no store left looking complete -------------


def _saved_sae(tmp_path, name, **kwargs):
    path = tmp_path / name
    make_sae("standard", **kwargs).save_model(path)
    return str(path)


def _blank_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "   "}\n{"text": " \\n\\t "}\n')  # text, but no token in it
    return DatasetSpec(str(path))


BAD_INPUTS = {
    "rows whose text makes no token": (
        lambda a, t: {"dataset": _blank_rows(t)},
        ConfigError, r"its rows make no tokens with this model's tokenizer \(column 'text'\): there is nothing to "
                     r"extract\.",
    ),
    "hook the model lacks": (
        lambda a, t: {"saes": (_saved_sae(t, "s7", hook="blocks.7.hook_resid_post"),)},
        ConfigError, r"hook 'blocks\.7\.hook_resid_post' is not a hook of model .*Hooks there include: blocks\.",
    ),
    "SAE width differs from the hook": (
        lambda a, t: {"saes": (_saved_sae(t, "s16", hook="blocks.0.hook_resid_post", d_in=16),)},
        ConfigError, r"d_in=16, but .* has width 32 at blocks\.0\.hook_resid_post",
    ),
    "two SAEs at one hook, neither named": (
        lambda a, t: {"saes": (str(a["sae_dirs"]["blocks.0.hook_resid_post"]),
                               _saved_sae(t, "dup", hook="blocks.0.hook_resid_post"))},
        ConfigError, r"both read blocks\.0\.hook_resid_post, and an SAE without a name is named by its hook\. Name "
                     r"each of them, NAME=SOURCE: e\.g\. --sae a=.* --sae b=.*dup",
    ),
    "two SAEs of one name": (
        lambda a, t: {"saes": ("x=" + str(a["sae_dirs"]["blocks.0.hook_resid_post"]),
                               "x=" + str(a["sae_dirs"]["blocks.1.hook_mlp_out"]))},
        ConfigError, r"ExtractConfig\.saes\[0\]='x=.*' and ExtractConfig\.saes\[1\]='x=.*' are both named 'x': give "
                     r"each SAE its own name",
    ),
    "a name that cannot be a store key": (
        lambda a, t: {"saes": ("res/16k=" + str(a["sae_dirs"]["blocks.0.hook_resid_post"]),)},
        ConfigError, r"'res/16k' cannot name an SAE",
    ),
    "a name with a space": (
        lambda a, t: {"saes": ("my sae=" + str(a["sae_dirs"]["blocks.0.hook_resid_post"]),)},
        ConfigError, r"'my sae' cannot name an SAE: a name is 1 to 200 letters, digits, '_', '\.' or '-'.*"
                     r"e\.g\. res_16k",
    ),
    "a name zarr reserves": (
        lambda a, t: {"saes": ("__x=" + str(a["sae_dirs"]["blocks.0.hook_resid_post"]),)},
        ConfigError, r"'__x' cannot name an SAE",
    ),
    "context longer than n_ctx": (
        lambda a, t: {"context_size": 65}, ConfigError, r"ExtractConfig\.dataset\.context_size=65 is longer than the model's context \(n_ctx=64\)",
    ),
    "missing text column": (
        lambda a, t: {"dataset": DatasetSpec(str(a["jsonl"]), text_column="body")},
        ConfigError, r"has no column 'body'; its columns are: text, label\. Pass ExtractConfig\.dataset\.text_column",
    ),
    "empty dataset": (
        lambda a, t: {"dataset": DatasetSpec(_empty_dataset(t))}, ConfigError, r"is empty: there is nothing to extract",
    ),
    "token ids outside the vocabulary": (
        lambda a, t: {"dataset": DatasetSpec(_token_dataset(t, [[1, 2], [500]]), tokens_column="ids")},
        ConfigError, r"dataset row 1: token id 500 is outside the model's vocabulary \[0, 17\)",
    ),
    "store path inside a file": (
        lambda a, t: {"store": str(_file(t) / "s.zarr")}, ConfigError, r"is a file\. Choose another path",
    ),
    "store path is a non-store folder": (
        lambda a, t: {"store": str(_folder_with_files(t))}, StoreConflictError, r"exists and is not a latentstore store",
    ),
    "several problems at once": (
        lambda a, t: {"context_size": 65, "batch_size": 0}, ConfigError,
        r"2 problems:\n  - ExtractConfig\.resources\.batch_size must be positive, got 0\.\n"
        r"  - ExtractConfig\.dataset\.context_size=65",
    ),
}


def _empty_dataset(tmp_path):
    import datasets

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(path))
    return str(path)


def _token_dataset(tmp_path, rows):
    import datasets

    path = tmp_path / "ids"
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(str(path))
    return str(path)


def _file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


def _folder_with_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    return tmp_path / "mine"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_work(assets, tmp_path, case):
    changes, error, message = BAD_INPUTS[case]
    made = changes(assets, tmp_path)
    cfg = config(assets, made.pop("store", tmp_path / "store.zarr"), **made)
    with pytest.raises(error, match=message):
        validate(cfg)
    assert not (tmp_path / "store.zarr").exists()
    if case == "store path is a non-store folder":
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_conflicting_store_is_refused_unless_overwrite(assets, reference_store, tmp_path):
    shutil.copytree(reference_store.location, tmp_path / "c.zarr")
    cfg = config(assets, tmp_path / "c.zarr")
    other = cfg.changed(context_size=8, max_tokens=50)
    with pytest.raises(StoreConflictError, match=r"(?s)context_size: store has 16, this run has 8.*--overwrite"):
        run_extract(other)
    assert_same_store(FeatureStore.open(cfg.store.path), reference_store)  # untouched
    run_extract(other.changed(overwrite=True))
    fs = FeatureStore.open(cfg.store.path)
    assert fs.complete and fs.run["context_size"] == 8 and fs.n_tokens == 50


def _damaged_root(tmp_path, metadata: str) -> Path:
    """A folder whose only file is a root zarr.json holding ``metadata``."""
    path = tmp_path / "damaged.zarr"
    path.mkdir()
    (path / "zarr.json").write_text(metadata)
    return path


GROUP = '{"zarr_format": 3, "node_type": "group", "attributes": %s}'


def test_a_store_of_ours_with_a_damaged_root_and_no_shard_is_started_afresh(assets, reference_store, tmp_path):
    """A run killed while it stamped the root (its attributes cut short) holds nothing to keep: the
    rerun starts the store again rather than refuse it for ever."""
    path = _damaged_root(tmp_path, GROUP % '{"latentstore": {"encoding-type": "latentstore.store"}}')
    run_extract(config(assets, path))
    assert_same_store(FeatureStore.open(str(path)), reference_store)


@pytest.mark.parametrize("metadata", [GROUP % '{"latentstore": [1]}', '{"zarr_format": 3, "node_type": "gro'],
                         ids=["attributes of another shape", "torn"])
def test_a_damaged_root_that_latentstore_did_not_write_is_left_alone(assets, tmp_path, metadata):
    path = _damaged_root(tmp_path, metadata)
    before = (path / "zarr.json").read_text()
    expected = (f"--store {path}: its root's metadata (zarr.json) is damaged and it holds no complete shard, so "
                "there is nothing to rebuild the store from, nor any sign that latentstore wrote it: latentstore "
                "will not write over it (not even with --overwrite). If it is a store of yours, delete it and "
                "rerun; else choose a new path.")
    for overwrite in (False, True):
        with pytest.raises(StoreConflictError) as raised:
            validate(config(assets, path, overwrite=overwrite))
        assert str(raised.value) == expected
    assert [p.name for p in path.iterdir()] == ["zarr.json"] and (path / "zarr.json").read_text() == before


def test_a_rerun_redoes_a_shard_whose_marker_is_damaged(assets, reference_store, tmp_path):
    shutil.copytree(reference_store.location, tmp_path / "m.zarr")
    marker = tmp_path / "m.zarr" / "shards" / "000000" / "complete" / "zarr.json"
    doc = json.loads(marker.read_text())
    del doc["attributes"]["latentstore"]["nnz"]
    marker.write_text(json.dumps(doc))
    run_extract(config(assets, tmp_path / "m.zarr"))
    assert "nnz" in json.loads(marker.read_text())["attributes"]["latentstore"]
    assert_same_store(FeatureStore.open(str(tmp_path / "m.zarr")), reference_store)
