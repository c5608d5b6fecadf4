"""Every kind of damage `latentstore verify` reports comes with advice that repairs it: each test
damages a copy of the session's store, follows the report's `fix:` lines literally (deleting what
they name, then rerunning the commands they name), and checks that the store then verifies and
equals the undamaged one. And a store still being written is reported as in progress (exit
status 3, with the parts still to come), never as damaged, even while it is written."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main
from store import FeatureStore
from store import format as fmt
from store.errors import StoreCorruptError
from store.verify import verify_store
from tests.test_verify import HOOK, OTHER, flip_byte, pristine, store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.ray

PATH = re.compile(r"\b(?:zarr\.json|(?:shards|stats|index|vocab|sweeps)(?:/[\w.\-]+)*/?)")


def follow_advice(text: str, assets, store: Path) -> list[str]:
    """Do what the `fix:` lines of a verify report say: delete every path each names before its
    command, then run each command named once (the extraction first). Returns the commands run."""
    from jobs.extract import run_extract
    from jobs.index import run_index
    from tests.stores import config

    fixes = [line.removeprefix("fix: ") for line in text.splitlines() if line.startswith("fix: ")]
    assert fixes, text
    commands = []
    for fix in fixes:
        clause, _, rest = fix.partition(" and r") if fix.startswith("delete ") else ("", "", fix)
        for path in PATH.findall(clause):
            target = store / path.rstrip("/")
            assert target.exists(), f"the advice names {path}, which is not there: {fix}"
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        command = re.search(r"`latentstore (extract|index|sweep)", rest or fix).group(1)
        commands += [command] if command not in commands else []
    for command in sorted(commands, key=["extract", "index", "sweep"].index):
        if command == "extract":
            run_extract(config(assets, store))
        elif command == "index":
            run_index(str(store), workers=1, progress=False)
        else:
            raise AssertionError(f"no sweep in this store to rerun: {text}")
    return commands


def markers_written_at(store: Path) -> dict[str, str]:
    return {p.parent.parent.name: json.loads(p.read_text())["attributes"][fmt.ATTRS_KEY]["written_at"]
            for p in sorted((store / fmt.SHARDS_GROUP).glob(f"*/{fmt.MARKER_GROUP}/zarr.json"))}


def test_a_torn_root_is_named_everywhere_and_the_rerun_rebuilds_it_keeping_the_shards(assets, pristine, store,
                                                                                        capsys):
    from jobs.extract import validate
    from store.writer import StoreWriter, check_conflict
    from tests.stores import assert_same_store, config

    kept = markers_written_at(store)
    reference = FeatureStore.open(str(pristine))
    for meta in (store / "zarr.json", store / fmt.SHARDS_GROUP / "zarr.json"):
        meta.write_text(meta.read_text()[:len(meta.read_text()) // 2])  # cut short, as a torn upload leaves it

    refusal = r"(?s)zarr.json is damaged: it cannot be parsed.*rerun the same `latentstore extract` command"
    with pytest.raises(StoreCorruptError, match=refusal):
        FeatureStore.open(str(store))
    assert main(["top", str(store)]) == 2
    assert re.search(refusal, capsys.readouterr().err)
    # what an extract rerun checks first neither crashes nor refuses: plain, or replacing the store
    validate(config(assets, store))
    assert check_conflict(str(store), {}, overwrite=True) is None
    replaced = store.parent / "replaced.zarr"
    shutil.copytree(store, replaced)
    assert StoreWriter(str(replaced)).begin(reference.run, reference.attrs["plan"], overwrite=True) == {}
    assert not list((replaced / fmt.SHARDS_GROUP).glob("0*"))  # --overwrite: a new, empty store

    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    report = verify_store(str(store))
    assert report.damaged_parts == [f"{fmt.SHARDS_GROUP}/zarr.json", "zarr.json"], out  # nothing about the shards
    assert report.n_shards == len(kept)
    assert len(report.fixes()) == 1 and "delete" not in report.fixes()[0], out
    assert follow_advice(out, assets, store) == ["extract"]

    assert verify_store(str(store)).ok
    assert markers_written_at(store) == kept  # every shard kept, none redone
    assert_same_store(FeatureStore.open(str(store)), FeatureStore.open(str(pristine)))


def test_an_edited_value_dtype_is_refused_and_the_advice_repairs_it(assets, pristine, store, capsys):
    """A hand edit of run.value_dtype: readers decode by each array's recorded dtype, so they refuse
    the disagreement instead of returning bit patterns as values."""
    from tests.stores import assert_same_store

    kept = markers_written_at(store)
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    assert doc["attributes"][fmt.ATTRS_KEY]["run"]["value_dtype"] == "bfloat16"
    doc["attributes"][fmt.ATTRS_KEY]["run"]["value_dtype"] = "float16"
    meta.write_text(json.dumps(doc))

    fs = FeatureStore.open(str(store))
    for _ in range(2):
        with pytest.raises(StoreCorruptError, match=rf"{fmt.SAES_GROUP}/{HOOK} records its values as bfloat16, but "
                                                     r"the store's run record \(zarr.json, run.value_dtype\) says float16"):
            fs.csr(HOOK)
    with pytest.raises(StoreCorruptError, match="records its values as bfloat16"):
        fs.value_dtype  # what decodes by it (an index build, merging statistics) refuses it too
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    assert verify_store(str(store)).damaged_parts == ["zarr.json"], out
    assert "value_dtype float16, the shard's values were written as bfloat16" in out
    follow_advice(out, assets, store)
    assert verify_store(str(store)).ok
    assert markers_written_at(store) == kept
    assert_same_store(FeatureStore.open(str(store)), FeatureStore.open(str(pristine)))


def test_every_other_kind_of_damage_is_repaired_by_following_the_advice(assets, pristine, store, capsys):
    """Shard arrays, metadata and markers, a stray group, merged statistics, the vocabulary, the root's
    shard list and counts, and the index, all damaged at once: one pass of the advice repairs all."""
    from tests.stores import assert_same_store

    fs = FeatureStore.open(str(store))
    shards = [fmt.shard_path(s.shard_id) for s in fs.shards]
    flip_byte(store / shards[1] / fmt.SAES_GROUP / HOOK / fmt.VALUES / "c" / "0")
    meta = store / shards[2] / fmt.SAES_GROUP / OTHER / fmt.INDICES / "zarr.json"
    meta.write_text(meta.read_text()[:-30])
    shutil.rmtree(store / shards[3] / fmt.MARKER_GROUP)
    (store / shards[4] / fmt.POSITIONS / "c" / "0").unlink()
    shutil.copytree(store / shards[5], store / fmt.SHARDS_GROUP / "000099")  # a leftover, not in the shard list
    (store / fmt.SHARDS_GROUP / "scratch").mkdir()
    (store / fmt.SHARDS_GROUP / "scratch" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    flip_byte(store / fmt.STATS_GROUP / HOOK / "count" / "c" / "0")
    meta = store / fmt.STATS_GROUP / OTHER / "zarr.json"
    meta.write_text(meta.read_text()[:-30])
    meta = store / fmt.VOCAB_GROUP / "utf8" / "zarr.json"  # the vocabulary has no checksums: its metadata, then
    meta.write_text(meta.read_text()[:-30])
    flip_byte(store / fmt.INDEX_GROUP / HOOK / fmt.PARTS_GROUP / "0" / "token" / "c" / "0")
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][fmt.ATTRS_KEY]["counts"]["n_tokens"] += 1
    meta.write_text(json.dumps(doc))

    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    damaged = verify_store(str(store)).damaged_parts
    for part in (*shards[1:5], f"{fmt.SHARDS_GROUP}/000099", f"{fmt.SHARDS_GROUP}/scratch", fmt.STATS_GROUP,
                 fmt.VOCAB_GROUP, fmt.INDEX_GROUP, "zarr.json"):
        assert any(d.startswith(part) for d in damaged), (part, out)
    assert follow_advice(out, assets, store) == ["extract", "index"]
    report = verify_store(str(store))
    assert report.ok and not report.in_progress, report.format()
    assert_same_store(FeatureStore.open(str(store)), FeatureStore.open(str(pristine)))


def test_a_damaged_sweep_part_is_repaired_by_redoing_it(store):
    """What a rerun of `latentstore sweep` does, done at the store level: begin again with the same
    spec, write the parts without a completion marker, finalize."""
    from store.sweeps import SweepPart, SweepWriter, read_sweep

    def run_sweep() -> None:
        writer = SweepWriter(str(store), "s")
        done = writer.begin({"kind": "test"}, np.arange(3), None, n_parts=2, overwrite=False)
        for part_id in sorted({0, 1} - set(done)):
            writer.write_part(SweepPart(part_id, np.full(3, part_id), np.arange(3),
                                        np.arange(3, dtype=np.float32) + part_id, np.zeros(3, np.uint8)))
        writer.finalize({"n_lines": 6})

    run_sweep()
    part = "sweeps/s/parts/000000"
    shutil.copy(store / "sweeps/s/parts/000001/delta/c/0", store / part / "delta/c/0")
    text = verify_store(str(store)).format()
    fix = next(line for line in text.splitlines() if line.startswith("fix: "))
    assert fix.startswith(f"fix: delete {part} and rerun the same `latentstore sweep` command")
    shutil.rmtree(store / part)
    run_sweep()
    assert verify_store(str(store)).ok
    assert read_sweep(str(store), "s")["delta"].tolist() == [0, 1, 2, 1, 2, 3]


def test_a_reader_after_damage_raises_the_same_error_every_time(store):
    fs = FeatureStore.open(str(store))
    node = fmt.shard_path(fs.shards[1].shard_id)
    shutil.rmtree(store / node / fmt.MARKER_GROUP)
    messages = []
    for _ in range(3):
        with pytest.raises(StoreCorruptError, match=rf"{node}/complete is damaged") as raised:
            fs.csr(HOOK)
        messages.append(str(raised.value))
    assert len(set(messages)) == 1


# -- a store being written ---------------------------------------------------------------------


def as_if_being_written(store: Path) -> None:
    """The state a store is in part-way through its extraction and an index build: root `writing`,
    a shard's arrays half written and no marker, a shard not started, an index part half written."""
    edit = store / "zarr.json"
    doc = json.loads(edit.read_text())
    attrs = doc["attributes"][fmt.ATTRS_KEY]
    attrs["status"] = fmt.STATUS_WRITING
    for key in ("shards", "counts", "completed_at"):
        attrs.pop(key, None)
    edit.write_text(json.dumps(doc))
    shards = sorted((store / fmt.SHARDS_GROUP).glob("0*"))
    shutil.rmtree(shards[-1])
    shutil.rmtree(shards[-2] / fmt.MARKER_GROUP)
    (shards[-2] / fmt.TOKEN_IDS / "c" / "0").unlink()  # torn: the array's metadata, not its chunk
    index = store / fmt.INDEX_GROUP / HOOK
    doc = json.loads((index / "zarr.json").read_text())
    doc["attributes"][fmt.ATTRS_KEY]["complete"] = False
    (index / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(index / fmt.PARTS_GROUP / "0" / fmt.MARKER_GROUP)
    for chunk in (index / fmt.PARTS_GROUP / "0" / "token" / "c").iterdir():
        chunk.unlink()


def test_verify_reports_a_store_being_written_as_in_progress(pristine, store, capsys):
    from tests.stores import assert_prefix_of

    as_if_being_written(store)
    assert main(["verify", str(store)]) == 3
    out = capsys.readouterr().out
    assert "DAMAGED" not in out and "IN PROGRESS" in out
    shards = sorted(p.name for p in (store / fmt.SHARDS_GROUP).glob("0*"))
    for part in (f"{fmt.SHARDS_GROUP}/{shards[-1]} (no completion marker yet)", "1 more shard(s), not started",
                 f"{fmt.INDEX_GROUP}/{HOOK}/{fmt.PARTS_GROUP}/0 (no completion marker yet)"):
        assert part in out, out
    assert main(["verify", str(store), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["in_progress"] and not report["problems"]
    assert_prefix_of(FeatureStore.open(str(store)), FeatureStore.open(str(pristine)))

    # damage in a part already written is still damage (exit 2), with the parts to come listed too
    flip_byte(store / fmt.SHARDS_GROUP / shards[0] / fmt.TOKEN_IDS / "c" / "0")
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    assert "IN PROGRESS" in out and f"delete the damaged shard group(s) ({fmt.SHARDS_GROUP}/{shards[0]})" in out


def shard_data(reference: FeatureStore, shard) -> tuple:
    """A complete shard of ``reference`` as the worker hands it to ``StoreWriter.write_shard``."""
    import zarr

    from store.writer import ShardData, SparseActivations

    root = zarr.open_group(reference.location, mode="r")
    path, marker = fmt.shard_path(shard.shard_id), reference._marker(shard.shard_id)
    saes = {hook: SparseActivations(*(root[f"{path}/{fmt.SAES_GROUP}/{hook}/{name}"][:]
                                      for name in (fmt.INDPTR, fmt.INDICES, fmt.VALUES)))
            for hook in reference.hooks}
    arrays = {"token_ids": root[f"{path}/{fmt.TOKEN_IDS}"][:], "rows": root[f"{path}/{fmt.ROWS}"][:],
              "positions": root[f"{path}/{fmt.POSITIONS}"][:], "saes": saes}
    # what the marker records of the plan (rows, windows, cut, digest) comes back as it was
    recorded = {f.name: marker[f.name] for f in dataclasses.fields(ShardData) if f.name in marker}
    return ShardData(**{**recorded, **arrays})


def test_readers_and_verify_during_a_write_see_a_consistent_store_or_in_progress(pristine, tmp_path):
    """Fault injection by timing: shards, then the merged statistics and the root, then the index,
    are written by a thread while readers open the store, read it and verify it, over and over.
    Every read is a prefix of the finished store; verify says OK or in progress, never damaged."""
    from store.writer import shard_entry
    from store import index as index_mod, stats as stats_mod
    from store.writer import StoreWriter
    from tests.stores import assert_prefix_of, assert_same_store

    reference = FeatureStore.open(str(pristine))
    run, d_sae = reference.run, {hook: reference.d_sae(hook) for hook in reference.hooks}
    live = tmp_path / "live.zarr"
    writer = StoreWriter(str(live))
    writer.begin(run, reference.attrs["plan"], overwrite=False)
    writer.write_vocab(reference.vocab)  # as an extraction does, before its shards: the run has a tokenizer
    failure = []

    def write() -> None:
        try:
            markers = []
            for shard in reference.shards:
                markers.append(writer.write_shard(shard_data(reference, shard), run["value_dtype"], d_sae,
                                                  run["top_k"]))
                time.sleep(0.05)
            counts = {"n_tokens": reference.n_tokens, "n_shards": len(markers),
                      "nnz": {hook: reference.nnz(hook) for hook in reference.hooks}}
            for hook in reference.hooks:
                merged = stats_mod.merge_shards(writer.location, markers, hook, d_sae[hook], run["value_dtype"])
                stats_mod.write_merged(writer.location, hook, merged, counts["n_tokens"])
            writer.finalize([shard_entry(m) for m in markers], counts)
            entries = [shard_entry(m) for m in markers]
            for hook in reference.hooks:
                parts, _ = index_mod.begin(writer.location, hook, reference.stats(hook).count, entries,
                                           run["value_dtype"], index_mod.plan_parts(reference.stats(hook).count, 3))
                for part in parts:
                    index_mod.build_part(writer.location, hook, part, entries, "<u4")
                    time.sleep(0.05)
                index_mod.finalize(writer.location, hook)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    seen = set()
    while thread.is_alive() or not seen:
        fs = FeatureStore.open(str(live))
        if 0 < fs.n_tokens < reference.n_tokens:
            assert not fs.complete
            assert_prefix_of(fs, reference)
        report = verify_store(str(live))
        assert report.ok, report.format()
        seen.add((fs.n_tokens, fs.complete, report.in_progress))
    thread.join()
    assert not failure, failure
    assert any(busy for _, _, busy in seen), seen  # it was caught part-way at least once
    report = verify_store(str(live))
    assert report.ok and not report.in_progress, report.format()
    assert_same_store(FeatureStore.open(str(live)), reference)


def test_a_run_that_finishes_while_verify_lists_the_files_is_in_progress_not_damaged(store, monkeypatch):
    """The last statistics and the root's "complete" written between verify's listing of the files
    and its reading of the root: what the listing missed is still to come, because the root is read
    first (read after, it called complete a store whose statistics looked missing)."""
    from fsspec.implementations.local import LocalFileSystem

    root = store / "zarr.json"
    finished = root.read_bytes()
    writing = json.loads(finished)
    writing["attributes"]["latentstore"]["status"] = fmt.STATUS_WRITING
    root.write_text(json.dumps(writing))
    hist = store / fmt.STATS_GROUP / HOOK / "hist"
    shutil.move(hist, store / "hist.later")
    find = LocalFileSystem.find

    def find_as_the_run_finishes(self, path, *args, **kwargs):
        found = find(self, path, *args, **kwargs)
        shutil.move(store / "hist.later", hist)  # the run writes its last statistics, then says it is complete
        root.write_bytes(finished)
        return found

    monkeypatch.setattr(LocalFileSystem, "find", find_as_the_run_finishes)
    report = verify_store(str(store))
    assert report.ok, report.format()
    assert any(part.startswith(f"{fmt.STATS_GROUP}/{HOOK}/hist") for part in report.to_come), report.to_come
