"""A store root whose metadata is valid JSON of the wrong shape (a hand edit, a bad tool): readers
refuse it with StoreCorruptError naming zarr.json and the repair, and `latentstore verify` reports it
(exit status 2, with its `fix:` line) instead of crashing. And a store URL whose listing never ends
(http with a query string) is refused by verify in one line."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from jobs.cli import main
from store import FeatureStore
from store.checked import REBUILD_ROOT
from store.elements import read_root_attrs
from store.errors import StoreAccessError, StoreCorruptError
from store.verify import ROOT_UNREADABLE, verify_store
from tests.test_store_format import write_synthetic_complete

D_SAE = 16


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A small complete store that verifies (one SAE named h, two shards, merged statistics), written
    through the store's API: no model needed. Tests damage copies."""
    path = tmp_path_factory.mktemp("root") / "pristine.zarr"
    write_synthetic_complete(path, [sp.random(6, D_SAE, density=0.3, format="csr", random_state=i, dtype=np.float32)
                                    for i in range(2)])
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    copy = tmp_path / "s.zarr"
    shutil.copytree(pristine, copy)
    return copy


def edit_attrs(store: Path, edit) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"]["latentstore"])
    meta.write_text(json.dumps(doc))


def damaged(store: Path, what: str) -> str:
    """The message of StoreCorruptError for a root whose metadata is damaged as ``what`` says."""
    return (f"{store}: zarr.json is damaged: {what}. Reads that touch it are refused rather than return wrong "
            f"numbers. Run `latentstore verify {store}` to list every damaged part; to repair, {REBUILD_ROOT}.")


# (edit of the root's latentstore attributes, what the message says of it)
WRONG_SHAPES = {
    "run null": (lambda a: a.update(run=None), "latentstore.run is null, expected an object"),
    "saes an object": (lambda a: a["run"].update(saes={"a": 1}), 'latentstore.run.saes is {"a": 1}, expected a list'),
    "saes empty": (lambda a: a["run"].update(saes=[]), "latentstore.run.saes is [], expected at least 1 item(s)"),
    "shards a string": (lambda a: a.update(shards="x"), 'latentstore.shards is "x", expected a list'),
    "n_tokens a string": (lambda a: a["counts"].update(n_tokens="abc"),
                          'latentstore.counts.n_tokens is "abc", expected a whole number >= 0'),
    "d_sae negative": (lambda a: a["run"]["saes"][0].update(d_sae=-5),
                       "latentstore.run.saes[0].d_sae is -5, expected a whole number >= 1"),
    "unknown value dtype": (lambda a: a["run"].update(value_dtype="int8"),
                            'latentstore.run.value_dtype is "int8", expected one of "bfloat16", "float16", "float32"'),
    "model name a number": (lambda a: a["run"]["model"].update(name=5),
                            "latentstore.run.model.name is 5, expected a string"),
    "a shard counts no SAE": (lambda a: a["shards"][1]["nnz"].clear(),
                              "latentstore.shards[1].nnz has no entry for h"),
    "status unknown": (lambda a: a.update(status=1), 'latentstore.status is 1, expected one of "writing", "complete"'),
    "dataset missing": (lambda a: a["run"].pop("dataset"), "latentstore.run.dataset is missing"),
}


def test_the_pristine_store_opens_and_verifies(store):
    """What the damage below is measured against."""
    assert FeatureStore.open(str(store)).saes == ["h"]
    assert verify_store(str(store)).ok


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_readers_refuse_a_root_of_the_wrong_shape_naming_zarr_json_and_the_repair(store, case, capsys):
    edit, what = WRONG_SHAPES[case]
    edit_attrs(store, edit)
    message = damaged(store, f"its attributes are not as the format says: {what}")
    with pytest.raises(StoreCorruptError) as raised:
        FeatureStore.open(str(store))
    assert str(raised.value) == message
    for command in ("info", "top"):
        assert main([command, str(store)]) == 2
        assert capsys.readouterr().err == f"latentstore {command}: error: {message}\n"


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_verify_reports_a_root_of_the_wrong_shape_with_its_fix(store, case, capsys):
    edit, what = WRONG_SHAPES[case]
    edit_attrs(store, edit)
    assert main(["verify", str(store)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[1:] == ["DAMAGED: 1 problem(s) in 1 part(s):",
                         f"  zarr.json: its attributes are not as the format says: {what}; {ROOT_UNREADABLE}",
                         f"fix: {REBUILD_ROOT}."]
    assert captured.err == (f"latentstore verify: error: 1 damaged part(s) in {store}: zarr.json (the report above "
                            "says how to repair them).\n")


@pytest.mark.ray
def test_following_the_fix_rebuilds_the_root_and_keeps_every_shard(assets, reference_store, tmp_path, capsys):
    from tests.stores import assert_same_store
    from tests.test_verify_repair import follow_advice, markers_written_at

    store = tmp_path / "copy.zarr"
    shutil.copytree(reference_store.location, store)
    kept = markers_written_at(store)
    edit_attrs(store, lambda a: a.update(run=None))
    assert main(["verify", str(store)]) == 2
    assert follow_advice(capsys.readouterr().out, assets, store) == ["extract"]
    assert verify_store(str(store)).ok
    assert markers_written_at(store) == kept
    assert_same_store(FeatureStore.open(str(store)), reference_store)


def test_a_root_with_many_problems_names_the_first_three(store):
    edit_attrs(store, lambda a: a.update(shards=[{}]))
    with pytest.raises(StoreCorruptError, match=r"its attributes are not as the format says: "
                                                r"latentstore\.shards\[0\]\.shard_id is missing; "
                                                r"latentstore\.shards\[0\]\.row_start is missing; "
                                                r"latentstore\.shards\[0\]\.row_stop is missing \(and 2 more\)\. "):
        FeatureStore.open(str(store))


# zarr.json documents that are not a zarr group's metadata: (the text, what readers say, what verify says)
NOT_A_NODE = {
    "a list": ("[1, 2, 3]", r"it cannot be parsed \(TypeError: .*\)",
               "metadata cannot be parsed (ValueError: not a zarr v3 node (no node_type array or group))"),
    "nested too deep": ("[" * 100_000 + "]" * 100_000, r"it cannot be parsed \(RecursionError: .*\)",
                        "metadata cannot be parsed (RecursionError: "),
    "attributes a list": ('{"zarr_format": 3, "node_type": "group", "attributes": [1]}',
                          r"it cannot be parsed \(TypeError: .*\)",
                          "metadata cannot be parsed (ValueError: its attributes, or their 'latentstore' entry, "
                          "are not an object)"),
    "latentstore attributes a list": ('{"zarr_format": 3, "node_type": "group", "attributes": {"latentstore": [1]}}',
                                      r"its attributes are not as the format says: latentstore is \[1\], "
                                      r"expected an object",
                                      "metadata cannot be parsed (ValueError: its attributes, or their 'latentstore' "
                                      "entry, are not an object)"),
}


@pytest.mark.parametrize("case", sorted(NOT_A_NODE))
def test_a_root_metadata_file_of_another_shape_is_damage_not_a_crash(store, case, capsys):
    text, read_error, verify_problem = NOT_A_NODE[case]
    (store / "zarr.json").write_text(text)
    expected = damaged(store, "MESSAGE")
    head, tail = expected.split("MESSAGE")
    with pytest.raises(StoreCorruptError) as raised:
        FeatureStore.open(str(store))
    message = str(raised.value)
    assert message.startswith(head) and message.endswith(tail), message
    assert re.fullmatch(read_error, message[len(head):-len(tail)]), message
    with pytest.raises(StoreCorruptError):
        read_root_attrs(str(store))  # what `latentstore extract` takes for a root to rebuild

    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out.splitlines()
    problem = next(line for line in out if line.startswith("  zarr.json: "))
    assert problem.startswith(f"  zarr.json: {verify_problem}") and problem.endswith(f"; {ROOT_UNREADABLE}"), problem
    assert out[-1] == f"fix: {REBUILD_ROOT}."


def test_a_store_of_format_1_4_still_opens(tmp_path):
    """The shape is what every version writes: an older store's root passes it."""
    with tarfile.open(Path(__file__).parent / "data" / "format-1.4.zarr.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    fs = FeatureStore.open(str(tmp_path / "format-1.4.zarr"))
    assert fs.attrs["encoding-version"] == "1.4" and fs.complete and fs.n_tokens == 13


# -- a location whose listing never ends -------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(store):
    """The store's folder, served over plain http on 127.0.0.1; yields the store's URL."""
    handler = functools.partial(QuietHandler, directory=str(store.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{store.name}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_verify_refuses_a_url_with_a_query_string_in_one_line(served, capsys):
    assert verify_store(served).ok  # the server serves the store
    url = f"{served}?x=1"
    expected = (f"verify cannot list the store at {served}?x=*** (its listing never ends: each folder lists the same "
                "entries again below it). A query string (?...) in an http(s) URL does this, as every path in the "
                "store is appended to the query: give the store's URL without one.")
    with pytest.raises(StoreAccessError) as raised:
        verify_store(url)
    assert str(raised.value) == expected
    assert main(["verify", url]) == 2
    assert capsys.readouterr().err == f"latentstore verify: error: {expected}\n"
