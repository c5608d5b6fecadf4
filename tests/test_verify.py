"""`latentstore verify` and reads of damaged stores: each damaged part is named exactly, and
queries that touch it raise StoreCorruptError instead of returning wrong numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from store import FeatureStore
from store import format as fmt
from store import index as index_mod
from store import stats as stats_mod
from store.errors import FormatVersionError, StoreCorruptError, StoreNotFoundError
from store.verify import verify_store

pytestmark = pytest.mark.ray

HOOK = "blocks.0.hook_resid_post"
OTHER = "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def pristine(reference_store) -> Path:
    """The session's complete store (statistics, index, several shards); tests damage copies."""
    return Path(reference_store.location)


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(pristine, copy)
    return copy


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * at))
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_an_intact_store_verifies(store, capsys):
    report = verify_store(str(store))
    assert report.ok, report.format()
    assert report.status == "complete" and report.n_shards >= 3
    assert report.n_checksums >= report.n_shards * 9  # 3 token arrays + 3 arrays per SAE, per shard
    assert main(["verify", str(store)]) == 0
    assert "OK: every part is as it was written" in capsys.readouterr().out


def test_corrupt_chunk_is_named_and_reads_refuse_it(store, capsys):
    reference = FeatureStore.open(str(store))
    good = {h: reference.csr(h) for h in reference.hooks}
    shard = reference.shards[1]
    part = f"{fmt.shard_path(shard.shard_id)}/{fmt.SAES_GROUP}/{HOOK}/{fmt.INDICES}"
    flip_byte(store / part / "c" / "0")

    report = verify_store(str(store))
    assert report.damaged_parts == [part], report.format()
    assert main(["verify", str(store)]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert f"1 damaged part(s) in {store}: {part}" in captured.err
    assert re.search(r"DAMAGED: \d+ problem\(s\) in 1 part\(s\)", out) and part in out
    assert f"delete the damaged shard group(s) ({fmt.shard_path(shard.shard_id)})" in out

    fs = FeatureStore.open(str(store))
    with pytest.raises(StoreCorruptError, match=rf"(?s){part}.*latentstore verify"):
        fs.csr(HOOK)
    with pytest.raises(StoreCorruptError):
        fs.csr(HOOK, shard.token_start, shard.token_start + 1)  # a one-token read touches it too
    # reads that do not touch the damaged part still work, and give the same numbers
    first = reference.shards[0]
    assert (fs.csr(HOOK, first.token_start, first.token_stop) != good[HOOK][first.token_start:first.token_stop]).nnz == 0
    assert (fs.csr(OTHER) != good[OTHER]).nnz == 0


def test_bytes_that_still_decode_are_caught_by_the_checksum(store):
    """Damage that a codec cannot notice: a chunk of another shard swapped in (same dtype and codecs)."""
    fs = FeatureStore.open(str(store))
    a, b = (f"{fmt.shard_path(s.shard_id)}/{fmt.TOKEN_IDS}" for s in fs.shards[:2])
    shutil.copy(store / b / "c" / "0", store / a / "c" / "0")
    meta_a, meta_b = (json.loads((store / p / "zarr.json").read_text()) for p in (a, b))
    meta_a["shape"], meta_a["chunk_grid"] = meta_b["shape"], meta_b["chunk_grid"]
    (store / a / "zarr.json").write_text(json.dumps(meta_a))
    report = verify_store(str(store))
    assert report.damaged_parts == [a], report.format()
    assert "checksum mismatch" in report.problems[0].message or "expected" in report.problems[0].message
    with pytest.raises(StoreCorruptError, match=rf"{a}.*checksum"):
        FeatureStore.open(str(store)).token_ids()


def test_missing_chunk_is_not_read_as_zeros(store):
    fs = FeatureStore.open(str(store))
    part = f"{fmt.shard_path(fs.shards[2].shard_id)}/{fmt.POSITIONS}"
    (store / part / "c" / "0").unlink()
    report = verify_store(str(store))
    assert report.damaged_parts == [part] and "chunk c/0 is missing" in report.problems[0].message
    with pytest.raises(StoreCorruptError, match=part):
        FeatureStore.open(str(store)).provenance()


def test_corrupt_metadata_file_is_named_and_reads_refuse_it(store, capsys):
    fs = FeatureStore.open(str(store))
    shard = fs.shards[0]
    node = f"{fmt.shard_path(shard.shard_id)}/{fmt.SAES_GROUP}/{OTHER}/{fmt.VALUES}"
    meta = store / node / "zarr.json"
    meta.write_text(meta.read_text()[:-40])  # cut short, as a torn upload would leave it

    report = verify_store(str(store))
    assert report.damaged_parts == [f"{node}/zarr.json"], report.format()
    assert "metadata cannot be parsed" in report.problems[0].message

    fs = FeatureStore.open(str(store))
    with pytest.raises(StoreCorruptError, match=rf"{node}.*latentstore verify"):
        fs.csr(OTHER)
    fs.csr(HOOK)  # the other SAE is intact


def test_unknown_codec_is_named(store):
    fs = FeatureStore.open(str(store))
    node = f"{fmt.shard_path(fs.shards[0].shard_id)}/{fmt.ROWS}"
    meta = store / node / "zarr.json"
    meta.write_text(meta.read_text().replace('"blosc"', '"blosc-from-the-future"'))
    report = verify_store(str(store))
    assert report.damaged_parts == [f"{node}/zarr.json"], report.format()
    assert "blosc-from-the-future" in report.problems[0].message
    with pytest.raises(StoreCorruptError, match=rf"(?s){node}.*blosc-from-the-future"):
        fs.provenance()


def test_root_lists_that_disagree_with_markers_are_named(store):
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][fmt.ATTRS_KEY]["counts"]["n_tokens"] += 1
    meta.write_text(json.dumps(doc))
    report = verify_store(str(store))
    assert report.damaged_parts == ["zarr.json"] and "counts.n_tokens" in report.problems[0].message


def test_shard_without_marker_in_a_complete_store_is_damage(store):
    fs = FeatureStore.open(str(store))
    node = fmt.shard_path(fs.shards[1].shard_id)
    shutil.rmtree(store / node / fmt.MARKER_GROUP)
    report = verify_store(str(store))
    assert node in report.damaged_parts and "no completion marker" in report.format()


def test_verify_of_a_missing_store_says_so(tmp_path, capsys):
    with pytest.raises(StoreNotFoundError):
        verify_store(str(tmp_path / "nothing.zarr"))
    assert main(["verify", str(tmp_path / "nothing.zarr")]) == 2
    assert "No latentstore store at" in capsys.readouterr().err


# -- statistics and index: checked on read as shard arrays are (format 1.2) ----------------------


def rewrite_entry(array_path: Path, at: int, value) -> None:
    """Damage that decodes cleanly (a chunk rewritten with one entry changed): only a checksum can tell."""
    import zarr

    array = zarr.open_array(str(array_path), mode="r+")
    old = array[at]
    array[at] = value if value != old else value + 1


def test_damaged_merged_statistics_are_named_and_queries_refuse_them(store, capsys):
    flipped, rewritten = f"{fmt.STATS_GROUP}/{HOOK}/count", f"{fmt.STATS_GROUP}/{OTHER}/hist"
    flip_byte(store / flipped / "c" / "0")
    rewrite_entry(store / rewritten, (3, 40), 7)

    report = verify_store(str(store))
    assert report.damaged_parts == sorted([flipped, rewritten]), report.format()
    assert main(["verify", str(store)]) == 2
    captured = capsys.readouterr()
    assert f"2 damaged part(s) in {store}: {', '.join(sorted([flipped, rewritten]))}" in captured.err
    assert "fix: delete stats/ and rerun the same `latentstore extract` command: it keeps the shards and rewrites " \
           "the merged statistics from them." in captured.out

    fs = FeatureStore.open(str(store))
    with pytest.raises(StoreCorruptError, match=rf"(?s){flipped} is damaged.*latentstore verify.*rewrites the merged"):
        fs.feature_stats(HOOK)
    with pytest.raises(StoreCorruptError, match=rf"{rewritten} is damaged: its checksum is crc32:\w+, but crc32:\w+ "
                                                 "was recorded"):
        fs.histogram(OTHER, 3, bins="stored")


@pytest.mark.parametrize("deleted", ["shard group's metadata", "stats", "vocab", "vocab/offsets's metadata"])
def test_a_deleted_group_or_array_of_a_complete_store_is_damage(store, deleted):
    """Deleted outright, not corrupted: a shard group's zarr.json, the merged statistics, the
    vocabulary (the run had a tokenizer) or one of its arrays. verify names each part missing (it
    called such stores OK), and reading the vocabulary refuses rather than show token ids."""
    fs = FeatureStore.open(str(store))
    shard = fmt.shard_path(fs.shards[1].shard_id)
    target, damaged = {
        "shard group's metadata": (f"{shard}/zarr.json", [shard]),
        "stats": (fmt.STATS_GROUP, [f"{fmt.STATS_GROUP}/{sae}/{name}" for sae in fs.saes for name in stats_mod.MERGED]),
        "vocab": (fmt.VOCAB_GROUP, [f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_OFFSETS}", f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_UTF8}"]),
        "vocab/offsets's metadata": (f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_OFFSETS}/zarr.json",
                                     [f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_OFFSETS}"]),
    }[deleted]
    assert fs.run["tokenizer"] and fs.vocab is not None
    path = store / target
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    report = verify_store(str(store))
    assert report.damaged_parts == sorted(damaged), report.format()
    if deleted.startswith("vocab"):
        with pytest.raises(StoreCorruptError, match=rf"{fmt.VOCAB_GROUP}[/\w]* is damaged: the (group|array) is missing"):
            FeatureStore.open(str(store)).vocab


def test_a_rerun_keeps_the_vocabulary_as_written(store):
    """The same vocabulary again (a rerun of the extraction) leaves its arrays untouched, so that a
    reader of the complete store never finds them missing; another one (or a damaged one) is rewritten."""
    from store.writer import StoreWriter

    vocab = FeatureStore.open(str(store)).vocab
    metadata = store / fmt.VOCAB_GROUP / fmt.VOCAB_OFFSETS / "zarr.json"
    metadata.write_text(metadata.read_text() + " ")  # marked: a rewrite would replace the file
    StoreWriter(str(store)).write_vocab(vocab)
    assert metadata.read_text().endswith(" ")
    StoreWriter(str(store)).write_vocab(["x", *vocab[1:]])
    assert not metadata.read_text().endswith(" ")
    assert FeatureStore.open(str(store)).vocab[:2] == ["x", vocab[1]]


def busy_feature(fs: FeatureStore, hook: str) -> int:
    """The feature with the most entries among those in the first checksummed block of the index."""
    indptr = fs.index(hook).indptr
    counts = fs.stats(hook).count * (indptr[1:] <= index_mod.CHUNK)
    return int(counts.argmax())


def test_damaged_index_parts_are_named_and_queries_refuse_them(store, capsys):
    from jobs.index import run_index

    fs = FeatureStore.open(str(store))
    assert fs.index(HOOK) is not None and fs.index(OTHER) is not None
    good = {hook: fs.feature_activations(hook, busy_feature(fs, hook)) for hook in (HOOK, OTHER)}
    flipped = f"{fmt.INDEX_GROUP}/{HOOK}/{fmt.PARTS_GROUP}/0/token"
    rewritten = f"{fmt.INDEX_GROUP}/{OTHER}/{fmt.PARTS_GROUP}/0/{fmt.VALUES}"
    flip_byte(store / flipped / "c" / "0")
    rewrite_entry(store / rewritten, 5, 1234)

    report = verify_store(str(store))
    assert report.damaged_parts == sorted([flipped, rewritten]), report.format()
    assert main(["verify", str(store)]) == 2
    assert f"fix: delete index/ and run `latentstore index {store}` to rebuild it." in capsys.readouterr().out

    fs = FeatureStore.open(str(store))
    with pytest.raises(StoreCorruptError, match=rf"(?s){flipped} is damaged.*delete index/ and run `latentstore index"):
        fs.feature_activations(HOOK, busy_feature(fs, HOOK))
    with pytest.raises(StoreCorruptError, match=rf"{rewritten} is damaged: the checksum of its entries 0 to \d+ is"):
        fs.feature_activations(OTHER, busy_feature(fs, OTHER))

    shutil.rmtree(store / fmt.INDEX_GROUP)  # the repair the message gives
    run_index(str(store), workers=1, progress=False)
    assert verify_store(str(store)).ok
    fs = FeatureStore.open(str(store))
    for hook, frame in good.items():
        assert fs.feature_activations(hook, busy_feature(fs, hook)).equals(frame)


def edit_attrs(node: Path, edit) -> None:
    meta = node / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"][fmt.ATTRS_KEY])
    meta.write_text(json.dumps(doc))


def test_a_format_1_1_store_reads_as_before(store):
    """Format 1.1 recorded no checksums for merged statistics and index pointers, and one per index
    part array instead of one per block. Such a store reads with the same answers, and a damaged
    index part is still refused (checked against its whole-array checksum)."""
    fs = FeatureStore.open(str(store))
    feature = busy_feature(fs, HOOK)
    expected = fs.feature_stats(HOOK), fs.feature_activations(HOOK, feature)

    def as_1_1(attrs, drop=("checksums",)):
        attrs["encoding-version"] = "1.1"
        for key in drop:
            attrs.pop(key)

    edit_attrs(store, lambda a: a.update({"encoding-version": "1.1"}))
    for hook in (HOOK, OTHER):
        edit_attrs(store / fmt.STATS_GROUP / hook, as_1_1)
        edit_attrs(store / fmt.INDEX_GROUP / hook, as_1_1)
        edit_attrs(store / fmt.INDEX_GROUP / hook / fmt.PARTS_GROUP / "0" / fmt.MARKER_GROUP,
                   lambda a: as_1_1(a, drop=("chunk_checksums", "checksum_block")))
    assert verify_store(str(store)).ok
    fs = FeatureStore.open(str(store))
    assert fs.info()["format_version"] == "1.1" and fs.index(HOOK) is not None
    assert fs.feature_stats(HOOK).equals(expected[0])
    assert fs.feature_activations(HOOK, feature).equals(expected[1])

    part = f"{fmt.INDEX_GROUP}/{HOOK}/{fmt.PARTS_GROUP}/0/{fmt.VALUES}"
    rewrite_entry(store / part, 0, 999)
    with pytest.raises(StoreCorruptError, match=rf"{part} is damaged: its checksum is"):
        FeatureStore.open(str(store)).feature_activations(HOOK, feature)


def test_damaged_sweep_parts_are_named_and_reading_the_sweep_refuses_them(store):
    import numpy as np

    from store.sweeps import SweepPart, SweepWriter, read_sweep

    writer = SweepWriter(str(store), "s")
    writer.begin({"kind": "test"}, np.arange(3), None, n_parts=2, overwrite=False)
    for part_id in (0, 1):
        writer.write_part(SweepPart(part_id, np.full(3, part_id), np.arange(3), np.arange(3, dtype=np.float32) + part_id,
                                    np.zeros(3, np.uint8)))
    writer.finalize({"n_lines": 6})
    assert read_sweep(str(store), "s")["delta"].tolist() == [0, 1, 2, 1, 2, 3]
    # a chunk that holds only the fill value may be absent (part 0's prompts, every exact sweep's
    # methods), as zarr leaves them out unless told otherwise: the checksums vouch for them, so
    # they are no damage
    (store / "sweeps/s/parts/000000/method/c/0").unlink()
    assert verify_store(str(store)).ok
    assert read_sweep(str(store), "s")["method"].tolist() == ["exact"] * 6
    # damage a codec cannot notice: part 1's deltas where part 0's were
    part = "sweeps/s/parts/000000"
    shutil.copy(store / "sweeps/s/parts/000001/delta/c/0", store / part / "delta/c/0")
    with pytest.raises(StoreCorruptError, match=rf"(?s){part}/delta is damaged.*delete {part} and rerun the same "
                                                r"`latentstore sweep` command"):
        read_sweep(str(store), "s")
    report = verify_store(str(store))
    assert report.damaged_parts == [f"{part}/delta"]
    assert f"fix: delete {part} and rerun the same `latentstore sweep` command" in report.format()


def test_names_from_the_store_reach_the_terminal_escaped(store, capsys):
    """A part's name is the store's text: a stray group named with an escape sequence is reported, but
    the terminal gets the sequence escaped, not obeyed."""
    stray = store / fmt.SHARDS_GROUP / "x\x1b[31m\x07"
    stray.mkdir()
    (stray / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    assert "x\\x1b[31m\\x07" in out
    assert not any(ord(c) < 0x20 and c != "\n" for c in out)


INDEX_PART_MARKER_EDITS = {
    "checksums that are a list": (lambda a: a.update({"checksums": ["x"]}),
                                  'latentstore.checksums is ["x"], expected an object'),
    "no block checksums in a 2.x part": (lambda a: a.pop("chunk_checksums"),
                                         "latentstore.chunk_checksums has no entry for token; latentstore."
                                         "chunk_checksums has no entry for values"),
    "a block checksum that is a number": (lambda a: a["chunk_checksums"].update({fmt.VALUES: [7]}),
                                          'latentstore.chunk_checksums["values"][0] is 7, expected a "crc32:XXXXXXXX" '
                                          "string"),
}


@pytest.mark.parametrize("case", sorted(INDEX_PART_MARKER_EDITS))
def test_an_index_part_marker_not_as_the_format_says_is_named_by_reads_and_verify(store, case):
    """A hand edit of an index part's checksums: reads of its entries are refused naming the marker (they
    had raised AttributeError, or read unchecked), and verify names it."""
    edit, problem = INDEX_PART_MARKER_EDITS[case]
    marker = f"{fmt.INDEX_GROUP}/{HOOK}/{fmt.PARTS_GROUP}/0/{fmt.MARKER_GROUP}"
    feature = busy_feature(FeatureStore.open(str(store)), HOOK)
    edit_attrs(store / marker, edit)
    said = f"{marker} is damaged: its attributes are not as the format says: {problem}."
    with pytest.raises(StoreCorruptError, match=re.escape(said)):
        FeatureStore.open(str(store)).feature_activations(HOOK, feature)
    report = verify_store(str(store))
    assert not report.ok and (marker, f"its attributes are not as the format says: {problem}") in \
        [(p.part, p.message) for p in report.problems]


def one_part_sweep(store: Path) -> None:
    """Sweep ``s`` of one part of three lines into ``store``."""
    import numpy as np

    from store.sweeps import SweepPart, SweepWriter

    writer = SweepWriter(str(store), "s")
    writer.begin({"kind": "test"}, np.arange(3), None, n_parts=1, overwrite=False)
    writer.write_part(SweepPart(0, np.zeros(3), np.arange(3), np.arange(3, dtype=np.float32), np.zeros(3, np.uint8)))
    writer.finalize({"n_lines": 3})


SWEEP_PART_MARKER_EDITS = {
    "checksums that are a list": (lambda a: a.update({"checksums": ["delta"]}),
                                  'latentstore.checksums is ["delta"], expected an object'),
    "no checksums": (lambda a: a.pop("checksums"), "latentstore.checksums is missing"),
    "a checksum that is a number": (lambda a: a["checksums"].update({"delta": 7}),
                                    'latentstore.checksums["delta"] is 7, expected a "crc32:XXXXXXXX" string'),
    "no checksum for a column": (lambda a: a["checksums"].pop("feature"),
                                 "latentstore.checksums has no entry for feature"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_PART_MARKER_EDITS))
def test_a_sweep_part_marker_not_as_the_format_says_is_named_by_reads_and_verify(store, case):
    """A hand edit of a sweep part's checksums: reading the sweep is refused naming the marker (it had
    raised KeyError or TypeError, or left a column out), and verify names it."""
    from store.sweeps import read_sweep

    one_part_sweep(store)
    edit, problem = SWEEP_PART_MARKER_EDITS[case]
    marker = f"sweeps/s/{fmt.PARTS_GROUP}/000000/{fmt.MARKER_GROUP}"
    edit_attrs(store / marker, edit)
    said = f"{marker} is damaged: its attributes are not as the format says: {problem}."
    with pytest.raises(StoreCorruptError, match=re.escape(said) + ".*delete sweeps/s/parts/000000 and rerun"):
        read_sweep(str(store), "s")
    report = verify_store(str(store))
    assert not report.ok and (marker, f"its attributes are not as the format says: {problem}") in \
        [(p.part, p.message) for p in report.problems]


def test_a_rerun_redoes_a_sweep_part_whose_marker_is_not_as_the_format_says(store, caplog):
    """The sweep's resume takes such a part for one to do again, and says so."""
    import logging

    from store.sweeps import SweepWriter

    one_part_sweep(store)
    marker = f"sweeps/s/{fmt.PARTS_GROUP}/000000/{fmt.MARKER_GROUP}"
    edit_attrs(store / marker, lambda a: a["checksums"].pop("delta"))
    writer = SweepWriter(str(store), "s")
    with caplog.at_level(logging.WARNING, logger="store.sweeps"):
        assert writer.completed_parts() == {}
    assert f"{marker} is damaged: its attributes are not as the format says: latentstore.checksums has no entry " \
           "for delta. The part will be redone." in caplog.text
    assert writer.completed_part(0) is None


NOT_A_VERSION = {
    "a shard's marker": (f"{fmt.SHARDS_GROUP}/000000/{fmt.MARKER_GROUP}", StoreCorruptError,
                         "its completion marker is missing or unreadable"),
    "an index part's marker": (f"{fmt.INDEX_GROUP}/{HOOK}/{fmt.PARTS_GROUP}/0/{fmt.MARKER_GROUP}", StoreCorruptError,
                               "this part's completion marker is missing or unreadable"),
    "the index": (f"{fmt.INDEX_GROUP}/{HOOK}", FormatVersionError,
                  "its encoding-version 'x.y' is not a format version such as"),
}


@pytest.mark.parametrize("case", sorted(NOT_A_VERSION))
def test_an_encoding_version_that_is_no_version_is_named_not_a_traceback(store, case):
    """A hand-edited ``encoding-version`` that is no MAJOR.MINOR: reads refuse it with a message (they
    had raised ValueError from int()); verify names it as not as the format says (for the index group
    it had raised TypeError)."""
    node, error, said = NOT_A_VERSION[case]
    feature = busy_feature(FeatureStore.open(str(store)), HOOK)
    edit_attrs(store / node, lambda a: a.update({"encoding-version": "x.y"}))
    with pytest.raises(error, match=re.escape(said)):
        FeatureStore.open(str(store)).feature_activations(HOOK, feature)
    assert (node, 'its attributes are not as the format says: latentstore.encoding-version is "x.y", expected '
                  'a "MAJOR.MINOR" string') in [(p.part, p.message) for p in verify_store(str(store)).problems]


INDEX_ATTRS_EDITS = {
    "no value dtype": (lambda a: a.pop("value_dtype"), "latentstore.value_dtype is missing"),
    "a part of two numbers": (lambda a: a["parts"][0].pop(), "latentstore.parts[0] is [0, 0], expected at least 3 "
                                                             "item(s)"),
    "no checksum of the pointers": (lambda a: a["checksums"].pop(fmt.INDPTR),
                                    "latentstore.checksums has no entry for indptr"),
}


@pytest.mark.parametrize("case", sorted(INDEX_ATTRS_EDITS))
def test_index_attributes_not_as_the_format_says_are_named_by_reads_and_verify(store, case):
    """A hand edit of an SAE index group's attributes: reads through the index are refused naming the
    group and how to rebuild it (they had raised KeyError or TypeError, or read the pointers unchecked),
    verify names it, and the index build takes such an index for one to build anew."""
    from store import index as index_mod

    edit, problem = INDEX_ATTRS_EDITS[case]
    node = f"{fmt.INDEX_GROUP}/{HOOK}"
    fs = FeatureStore.open(str(store))
    feature, shards = busy_feature(fs, HOOK), fs.attrs["shards"]
    edit_attrs(store / node, edit)
    said = f"{node} is damaged: its attributes are not as the format says: {problem}."
    with pytest.raises(StoreCorruptError, match=re.escape(said) + r".*delete index/ and run `latentstore index"):
        FeatureStore.open(str(store)).feature_activations(HOOK, feature)
    assert (node, f"its attributes are not as the format says: {problem}") in \
        [(p.part, p.message) for p in verify_store(str(store)).problems]
    parts = [index_mod.Part(0, 0, fs.d_sae(HOOK))]
    assert index_mod.begin(str(store), HOOK, fs.stats(HOOK).count, shards, fs.value_dtype, parts) == (parts, set())
