"""A shard's completion marker of the wrong shape (a hand edit, a bad tool), in a store being written:
readers refuse it with StoreCorruptError naming the marker and the repair, `latentstore verify` names the
marker alone (not the root it would disagree with), and the writer's rerun leaves the shard to be redone
instead of failing when it finishes the store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from jobs.cli import main
from store import FeatureStore
from store.errors import StoreCorruptError
from store.writer import StoreWriter
from tests.test_store_format import write_synthetic_complete

MARKER = Path("shards/000000/complete/zarr.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A complete store of SAE h over two shards, written through the store's API."""
    path = tmp_path_factory.mktemp("marker") / "pristine.zarr"
    write_synthetic_complete(path, [sp.random(6, 16, density=0.3, format="csr", random_state=i, dtype=np.float32)
                                    for i in range(2)])
    return path


def edit_latentstore(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    doc["attributes"]["latentstore"] = edit(doc["attributes"]["latentstore"])
    path.write_text(json.dumps(doc))


def without(attrs: dict, *keys: str) -> dict:
    return {k: v for k, v in attrs.items() if k not in keys}


@pytest.fixture
def writing(pristine, tmp_path) -> Path:
    """A copy of the store as it is while being written: no shard list, counts or merged statistics yet."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(pristine, copy)
    edit_latentstore(copy / "zarr.json", lambda a: {**without(a, "shards", "counts"), "status": "writing"})
    return copy


CASES = {
    "a count that is text": (lambda m: {**m, "n_tokens": "x"},
                             'latentstore.n_tokens is "x", expected a whole number >= 0'),
    "no nonzero counts": (lambda m: without(m, "nnz"), "latentstore.nnz is missing"),
    "no count for the run's SAE": (lambda m: {**m, "nnz": {"g": 3}}, "latentstore.nnz has no entry for h"),
    "two problems": (lambda m: without({**m, "row_start": -1}, "shard_id"),
                     "latentstore.shard_id is missing; latentstore.row_start is -1, expected a whole number >= 0"),
    "checksums that are a list": (lambda m: {**m, "checksums": ["x"]},
                                  'latentstore.checksums is ["x"], expected an object'),
    "a checksum that is a number": (lambda m: {**m, "checksums": {**m["checksums"], "pos": 5}},
                                    'latentstore.checksums["pos"] is 5, expected a "crc32:XXXXXXXX" string'),
    "no checksums": (lambda m: without(m, "checksums"), "latentstore.checksums has no entry for token_ids, row, pos "
                     "(format 1.2 and later record one per array)"),
    "no checksum of the values": (lambda m: {**m, "checksums": without(m["checksums"], "saes/h/values")},
                                  "latentstore.checksums has no entry for saes/h/values (format 1.2 and later "
                                  "record one per array)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_readers_and_verify_name_the_marker(writing, case, capsys):
    edit, what = CASES[case]
    edit_latentstore(writing / MARKER, edit)
    expected = (f"{writing}: shards/000000/complete is damaged: its attributes are not as the format says: {what}. "
                f"Reads that touch it are refused rather than return wrong numbers. Run `latentstore verify "
                f"{writing}` to list every damaged part; to repair, delete shards/000000 and rerun the same "
                "`latentstore extract` command (it rewrites missing shards).")
    with pytest.raises(StoreCorruptError) as raised:
        FeatureStore.open(str(writing))
    assert str(raised.value) == expected
    assert main(["info", str(writing)]) == 2
    assert capsys.readouterr().err == f"latentstore info: error: {expected}\n"

    if case != "no count for the run's SAE":  # verify names that one by the shard's SAE group (below)
        assert main(["verify", str(writing)]) == 2
        out = capsys.readouterr().out.splitlines()
        damaged = out[out.index("DAMAGED: 1 problem(s) in 1 part(s):") + 1:]
        assert damaged == [f"  shards/000000/complete: its attributes are not as the format says: {what}",
                           "fix: delete the damaged shard group(s) (shards/000000) and rerun the same `latentstore "
                           "extract` command: it redoes only missing shards."]


def test_verify_names_an_sae_the_marker_does_not_count(writing, capsys):
    edit_latentstore(writing / MARKER, CASES["no count for the run's SAE"][0])
    assert main(["verify", str(writing)]) == 2
    assert "  shards/000000/saes/h: the run records an SAE named h, the shard's marker has none" in \
        capsys.readouterr().out.splitlines()


def test_a_marker_that_is_no_object_leaves_its_shard_incomplete(writing):
    edit_latentstore(writing / MARKER, lambda m: [m])
    fs = FeatureStore.open(str(writing))
    assert [s.shard_id for s in fs.shards] == [1] and fs.n_tokens == 6


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_writer_leaves_a_damaged_shard_to_be_redone(writing, case, caplog):
    edit_latentstore(writing / MARKER, CASES[case][0])
    assert StoreWriter(str(writing)).completed_shards().keys() == {1}
    assert f"shards/000000/complete is damaged: its attributes are not as the format says: {CASES[case][1]}. " \
           "The shard will be redone." in caplog.text


def test_in_a_complete_store_verify_blames_the_marker_not_the_root(pristine, tmp_path, capsys):
    copy = tmp_path / "c.zarr"
    shutil.copytree(pristine, copy)
    edit_latentstore(copy / MARKER, CASES["a count that is text"][0])
    assert main(["verify", str(copy)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[out.index("DAMAGED: 1 problem(s) in 1 part(s):") + 1:] == [
        '  shards/000000/complete: its attributes are not as the format says: latentstore.n_tokens is "x", expected '
        "a whole number >= 0",
        "fix: delete the damaged shard group(s) (shards/000000) and rerun the same `latentstore extract` command: it "
        "redoes only missing shards."]


@pytest.mark.parametrize("case", ["checksums that are a list", "no checksums"])
def test_in_a_complete_store_reads_refuse_a_marker_without_its_checksums(pristine, tmp_path, case):
    """A hand edit that drops the checksums must not let a lost chunk read back as zeros."""
    copy = tmp_path / "c.zarr"
    shutil.copytree(pristine, copy)
    edit_latentstore(copy / MARKER, CASES[case][0])
    (copy / "shards/000000/saes/h/values/c/0").unlink()  # what the checksums would have caught
    fs = FeatureStore.open(str(copy))
    for read in (lambda: fs.csr("h"), lambda: fs.token_ids(0, 3), lambda: fs.provenance(0, 3)):
        with pytest.raises(StoreCorruptError, match=re.escape(f"shards/000000/complete is damaged: its attributes are "
                                                              f"not as the format says: {CASES[case][1]}.")):
            read()
