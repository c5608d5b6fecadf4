"""Check every part of a store against what was recorded when it was written.

``verify_store(location)`` reads the whole store once and returns a ``VerifyReport``
listing each damaged part by its path inside the store:

- every metadata file (``zarr.json``) parses, and every array's codecs are known;
- the root's attributes have the shape the format gives them (``store.schema.root_attrs_problem``);
- every chunk of every array decodes, and none that holds data is missing;
- every array listed in a completion marker has the crc32 recorded there at write time, and
  so do the merged statistics and the index's pointers, whose crc32s their group records;
- shapes agree: ``token_ids``/``row``/``pos`` have ``n_tokens`` entries, ``indptr`` has
  ``n_tokens + 1`` and ends at the marker's ``nnz``, ``indices``/``values`` have ``nnz``;
- pointer arrays start at 0 and never decrease; feature indices lie in ``[0, d_sae)`` and
  ascend within a token; rows lie in the shard's row range;
- a complete store's shard list and counts agree with the shards' markers, and its
  feature-major index covers every feature exactly once, with token indices in range.

A store that is still being written (or whose run stopped part-way) is not damaged for the
parts still to come: shards without a completion marker, index and sweep parts without one, and
what an extraction writes when it finishes (the shard list, counts and merged statistics). They
are listed as still to come, and their torn arrays are not read; ``report.in_progress`` says so.
A part rewritten while verify read it (its marker or metadata changed meanwhile) is still to
come too, not damage. Every damaged part comes with its repair (``store.checked.repair``), and
following it leaves a store that verifies.
Needs numpy, zarr and fsspec only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zarr

from store import format as fmt
from store import stats as stats_mod
from store.checked import checksum, repair
from store.errors import StoreAccessError, StoreNotFoundError
from store.location import is_url, mask_url, normalize, open_zarr_store, reaching
from store.schema import index_attrs_problem, index_part_marker_problem, root_attrs_problem, \
    shard_marker_problem, sweep_part_marker_problem
from store.sweeps import EVERY_PART

METADATA = "zarr.json"
INDEX_GROUP = getattr(fmt, "INDEX_GROUP", "index")  # the feature-major index (format 1.1)
PARTS_GROUP = getattr(fmt, "PARTS_GROUP", "parts")


# What a root whose metadata cannot be used costs the check.
ROOT_UNREADABLE = ("the store's run record, shard list and counts are unreadable (the shards are checked against "
                   "their own markers)")

# The root's run record disagrees with every shard: it was edited, and a rerun would take the edit for
# another run; without it, the rerun rebuilds the root for the run it is.
DELETE_ROOT = ("delete the file zarr.json at the top of the store (the root's metadata) and rerun the same "
               "`latentstore extract` command: it rebuilds the root for that run and keeps every complete shard "
               "that it would write the same")


@dataclass(frozen=True)
class Problem:
    part: str  # path inside the store: an array, a group, or a metadata file
    message: str
    fix: str | None = None  # how to repair it, where the part's path does not say (store.checked.repair)

    def __str__(self) -> str:
        return f"{self.part}: {self.message}"


@dataclass
class VerifyReport:
    location: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    to_come: list[str] = field(default_factory=list)  # parts of a store still being written, not yet there
    n_arrays: int = 0
    n_checksums: int = 0
    n_bytes: int = 0  # decoded bytes read
    n_shards: int = 0
    status: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def in_progress(self) -> bool:
        """Whether the store, one of its indexes or one of its sweeps is still being written (or its
        run stopped part-way): parts are still to come."""
        return bool(self.to_come)

    @property
    def damaged_parts(self) -> list[str]:
        return sorted({p.part for p in self.problems})

    def add(self, part: str, message: str, fix: str | None = None) -> None:
        self.problems.append(Problem(part, message, fix))

    def fixes(self) -> list[str]:
        """How to repair every damaged part, one line per repair: first what the extraction redoes
        (damaged shard groups together), then the index, then sweeps. Following all of them, in
        this order, leaves a store that verifies."""
        shards = sorted({p.part.split("/")[1] for p in self.problems if p.fix is None and _shard_part(p.part)})
        out = []
        if shards:
            out.append("delete the damaged shard group(s) (" + ", ".join(f"{fmt.SHARDS_GROUP}/{s}" for s in shards)
                       + ") and rerun the same `latentstore extract` command: it redoes only missing shards")
        for p in self.problems:
            if p.fix is None and _shard_part(p.part):
                continue
            fix = p.fix or repair(self.location, p.part)
            if fix not in out:
                out.append(fix)
        order = ("`latentstore extract`", "`latentstore index`", "`latentstore sweep`")
        return sorted(out, key=lambda f: next((i for i, c in enumerate(order) if c in f), len(order)))

    def format(self) -> str:
        head = (f"store {self.location} ({self.status or 'unknown status'}): {self.n_shards} complete shards, "
                f"{self.n_arrays} arrays ({self.n_bytes / 1e6:.1f} MB decoded), "
                f"{self.n_checksums} checksums compared")
        lines = [head]
        lines += [f"note: {n}" for n in self.notes]
        if self.in_progress:
            lines.append(f"IN PROGRESS: {len(self.to_come)} part(s) still to come (being written now, or left by a "
                         "run that stopped part-way: rerunning the same command finishes it):")
            lines += [f"  {part}" for part in self.to_come]
        if self.ok:
            lines.append("OK so far: every part written so far is as it was written." if self.in_progress
                         else "OK: every part is as it was written.")
            return "\n".join(lines)
        lines.append(f"DAMAGED: {len(self.problems)} problem(s) in {len(self.damaged_parts)} part(s):")
        lines += [f"  {p}" for p in self.problems]
        lines += [f"fix: {fix}." for fix in self.fixes()]
        return "\n".join(lines)


def _shard_part(part: str) -> bool:
    """A part inside one shard's group (not the shards group's own metadata)."""
    names = part.split("/")
    return names[0] == fmt.SHARDS_GROUP and len(names) > 1 and names[1] != METADATA


class _Walker:
    """Reads the store's files once: metadata first, then arrays on demand."""

    def __init__(self, location: str, report: VerifyReport):
        import fsspec

        self.location = location
        self.report = report
        if is_url(location):
            self.fs, self.base = fsspec.core.url_to_fs(location)
        else:
            self.fs, self.base = fsspec.filesystem("file"), location
        self.base = self.base.rstrip("/")
        self.raw: dict[str, bytes] = {}  # metadata file -> its bytes when read: what changed meanwhile was rewritten
        # the root's metadata is read before the listing: a store it calls complete was complete when the
        # files were listed (read after, it could call complete a store whose last arrays the listing missed)
        with reaching(location):  # a store that cannot be reached must not pass for one that is not there
            try:
                self.raw[METADATA] = self.fs.cat_file(f"{self.base}/{METADATA}")
            except (FileNotFoundError, NotADirectoryError):  # no root yet, or not a store: verify_store says which
                pass
            try:
                found = self.fs.find(self.base)
            except RecursionError:
                raise StoreAccessError(
                    f"verify cannot list the store at {mask_url(location)} (its listing never ends: each folder "
                    "lists the same entries again below it). A query string (?...) in an http(s) URL does this, "
                    "as every path in the store is appended to the query: give the store's URL without one."
                ) from None
            # zarr's local store writes each file as <name>.<uuid>.partial, then renames it: not part of the store
            self.files = {self._rel(p) for p in found if not p.endswith(".partial")}
        self.metadata: dict[str, dict] = {}  # node path ("" for the root) -> parsed zarr.json
        self.pending: set[str] = set()  # groups still to come (no completion marker yet): their arrays are not read
        self.zstore = open_zarr_store(location, read_only=True)
        self.read_arrays: set[str] = set()

    def _rel(self, path: str) -> str:
        return path[len(self.base):].lstrip("/") if path.startswith(self.base) else path

    def parse_metadata(self) -> None:
        for key in sorted(self.files):
            if key.rsplit("/", 1)[-1] != METADATA:
                continue
            node = key[: -len(METADATA)].rstrip("/")
            try:
                if key not in self.raw:
                    self.raw[key] = self.fs.cat_file(f"{self.base}/{key}")
            except OSError:  # deleted since the listing: a writer is replacing the node
                self.files.discard(key)
                continue
            try:
                doc = json.loads(self.raw[key])
                if not isinstance(doc, dict) or doc.get("node_type") not in ("array", "group"):
                    raise ValueError("not a zarr v3 node (no node_type array or group)")
                attributes = doc.get("attributes", {})
                if not isinstance(attributes, dict) or not isinstance(attributes.get(fmt.ATTRS_KEY, {}), dict):
                    raise ValueError(f"its attributes, or their {fmt.ATTRS_KEY!r} entry, are not an object")
            except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser recurses
                what = ROOT_UNREADABLE if key == METADATA else "the node and everything in it is unreadable"
                self.report.add(key, f"metadata cannot be parsed ({type(e).__name__}: {e}); {what}")
                continue
            self.metadata[node] = doc

    def attrs(self, node: str) -> dict | None:
        """A node's latentstore attributes, or None if it has none or its metadata is damaged."""
        doc = self.metadata.get(node)
        return None if doc is None else doc.get("attributes", {}).get(fmt.ATTRS_KEY)

    def children(self, node: str) -> list[str]:
        prefix = f"{node}/" if node else ""
        out = set()
        for key in self.files:
            if key.startswith(prefix):
                name = key[len(prefix):].split("/", 1)[0]
                if name and name != METADATA:
                    out.add(name)
        return sorted(out)

    def changed(self, key: str) -> bool:
        """Whether a metadata file differs now from what was read (or is gone): rewritten meanwhile."""
        try:
            now = self.fs.cat_file(f"{self.base}/{key}")
        except OSError:  # gone (FileNotFoundError), or a folder on its path gone too
            now = None
        return now != self.raw.get(key)

    def is_pending(self, node: str) -> bool:
        return any(node == p or node.startswith(p + "/") for p in self.pending)

    def is_array(self, node: str) -> bool:
        return self.metadata.get(node, {}).get("node_type") == "array"

    def damaged(self, node: str) -> bool:
        """Whether the node's own metadata file exists but could not be parsed."""
        key = f"{node}/{METADATA}" if node else METADATA
        return key in self.files and node not in self.metadata

    def read(self, path: str, recorded: str | None = None) -> np.ndarray | None:
        """The whole array, decoded and checked against its recorded checksum when there is one;
        None (with the problem recorded) if it cannot be read. zarr leaves unwritten a chunk that
        holds only the fill value, so a missing chunk reads as the fill value: it is damage unless
        the recorded checksum vouches for exactly that."""
        self.read_arrays.add(path)
        if path not in self.metadata:
            if not self.damaged(path):
                self.report.add(path, "array is missing")
            return None
        try:
            array = zarr.open_array(self.zstore, path=path, mode="r")
        except Exception as e:  # unknown codec, invalid metadata fields: zarr raises several types
            self.report.add(f"{path}/{METADATA}", f"array metadata is not readable ({type(e).__name__}: {e})")
            return None
        out, missing = np.empty(array.shape, dtype=array.dtype), []
        grid = [range(-(-s // c)) if s else range(0) for s, c in zip(array.shape, array.chunks)]
        for coords in itertools.product(*grid):
            key = array.metadata.encode_chunk_key(coords)
            box = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, array.chunks, array.shape))
            if f"{path}/{key}" not in self.files and array.shape and all(b.stop > b.start for b in box):
                out[box] = array.fill_value
                missing.append(key)
                continue
            try:
                out[box] = array[box]
            except Exception as e:  # codecs raise RuntimeError, ValueError, ...: all mean the bytes are bad
                self.report.add(path, f"chunk {key} cannot be decoded ({type(e).__name__}: {e})")
                return None
        found = None if recorded is None else checksum(out)
        if missing and (recorded is None or found != recorded):
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            self.report.add(path, f"chunk {missing[0]}{more} is missing (reads would silently return the fill value)")
            return None
        self.report.n_arrays += 1
        self.report.n_bytes += out.nbytes
        if recorded is not None:
            self.report.n_checksums += 1
            if found != recorded:
                self.report.add(path, f"checksum mismatch: recorded {recorded} at write time, found {found} "
                                      "(the data changed after it was written)")
        return out


def verify_store(location: str) -> VerifyReport:
    """Check every part of the store at ``location``; see the module docstring for what is checked."""
    location = normalize(location)
    report = VerifyReport(location)
    walker = _Walker(location, report)
    if not walker.files:
        raise StoreNotFoundError(f"No latentstore store at {location}. Check the path.")
    walker.parse_metadata()
    root = walker.attrs("")
    shape = None if root is None else root_attrs_problem(root, f"store {location}")
    if shape is not None:
        report.add(METADATA, f"{shape}; {ROOT_UNREADABLE}")
        root = None  # what follows takes the root's shape for granted: each shard is checked on its own
    elif root is not None:
        report.status = root["status"]
    elif walker.damaged("") or walker.damaged(fmt.SHARDS_GROUP):
        pass  # named by parse_metadata; the shards are checked against their own markers alone
    elif any(walker.attrs(f"{fmt.SHARDS_GROUP}/{name}/{fmt.MARKER_GROUP}")
             for name in walker.children(fmt.SHARDS_GROUP)):
        report.add(METADATA, "the root's metadata is missing, but the store holds complete shards")
    else:
        raise StoreNotFoundError(f"{location} is not a latentstore store (its root has no latentstore attributes).")
    markers = _verify_shards(walker, root)
    if root is not None and root.get("status") == fmt.STATUS_COMPLETE:
        _verify_root_lists(walker, root, markers)
        _verify_index(walker, root, markers)
        _verify_present(walker, root)
    _verify_merged_stats(walker)
    _note_pending_parts(walker, INDEX_GROUP, lambda attrs: bool(attrs.get("complete")))
    _note_pending_parts(walker, "sweeps", lambda attrs: attrs.get("status") == fmt.STATUS_COMPLETE)
    _verify_marked_groups(walker, "sweeps", lambda marker: sweep_part_marker_problem(marker, EVERY_PART))
    _verify_marked_groups(walker, INDEX_GROUP, index_part_marker_problem)
    for node in sorted(walker.metadata):  # whatever else holds arrays (statistics, vocabulary) must decode
        if walker.is_array(node) and node not in walker.read_arrays and not walker.is_pending(node):
            walker.read(node)
    _settle(walker, root)
    return report


def _settle(walker: _Walker, root: dict | None) -> None:
    """Problems in parts that a run rewrites, while it runs, are parts still to come: those whose
    marker or metadata changed while verify read them, and, in a store being written, the merged
    statistics and the vocabulary (the extraction writes them anew before it finishes)."""
    report = walker.report
    if not report.problems:
        return
    writing = root is not None and root.get("status") != fmt.STATUS_COMPLETE or walker.changed(METADATA)
    kept, moved = [], []
    for problem in report.problems:
        unit = _unit(problem.part)
        if unit is not None and walker.changed(unit) or \
                writing and problem.part.split("/")[0] in (fmt.STATS_GROUP, fmt.VOCAB_GROUP):
            moved.append(problem.part)
        else:
            kept.append(problem)
    report.problems = kept
    report.to_come += [f"{part} (rewritten by the run in progress)" for part in sorted(set(moved))]


def _unit(part: str) -> str | None:
    """The metadata file that vouches for a part: its shard's, index part's or sweep part's marker,
    or its index's or statistics' group. None for the root's own metadata."""
    names = part.split("/")
    if names[0] == fmt.SHARDS_GROUP and len(names) > 1 and names[1] != METADATA:
        return f"{fmt.SHARDS_GROUP}/{names[1]}/{fmt.MARKER_GROUP}/{METADATA}"
    if names[0] in (INDEX_GROUP, "sweeps") and len(names) > 3 and names[2] == PARTS_GROUP:
        return "/".join(names[:4] + [fmt.MARKER_GROUP, METADATA])
    if names[0] in (INDEX_GROUP, "sweeps", fmt.STATS_GROUP) and len(names) > 1 and names[1] != METADATA:
        return "/".join(names[:2] + [METADATA])
    return None


def _note_pending_parts(walker: _Walker, top: str, finished) -> None:
    """The parts of each unfinished index or sweep (``finished(attrs)`` false) that have no completion
    marker yet: still to come, so their arrays are not read."""
    for name in walker.children(top):
        node = f"{top}/{name}"
        attrs = walker.attrs(node)
        if attrs is None or finished(attrs):
            continue
        parts = [f"{node}/{PARTS_GROUP}/{part}" for part in walker.children(f"{node}/{PARTS_GROUP}")]
        to_come = [part for part in parts if walker.attrs(f"{part}/{fmt.MARKER_GROUP}") is None
                   and not walker.damaged(f"{part}/{fmt.MARKER_GROUP}")]
        walker.pending.update(to_come)
        # its own arrays (an index's pointers) may be mid-write too: checked once it is finished, before
        # any reader uses it
        walker.pending.update(n for n in walker.metadata if walker.is_array(n) and n.startswith(node + "/")
                              and not n.startswith(f"{node}/{PARTS_GROUP}/"))
        walker.report.to_come += [f"{part} (no completion marker yet)" for part in to_come]
        n_planned = len(attrs["parts"]) if isinstance(attrs.get("parts"), list) else attrs.get("n_parts")
        if isinstance(n_planned, int) and n_planned > len(parts):
            walker.report.to_come.append(f"{n_planned - len(parts)} more part(s) of {node}, not started")
        walker.report.to_come.append(f"{node} marked complete, once every part is written")


def _verify_shards(walker: _Walker, root: dict | None) -> dict[int, dict]:
    """Each shard against its completion marker; with a readable root, also against the run's record.
    Without one (the root's metadata is damaged or missing), each shard is checked on its own."""
    report = walker.report
    complete = root is not None and root.get("status") == fmt.STATUS_COMPLETE
    listed = {s["shard_id"] for s in root.get("shards", [])} if complete else set()
    run = (root or {}).get("run", {})
    saes = {fmt.sae_name(s): s for s in run.get("saes", [])} if root is not None else None
    markers, disagreements = {}, {}
    for name in walker.children(fmt.SHARDS_GROUP):
        node = f"{fmt.SHARDS_GROUP}/{name}"
        if not (name.isdigit() and len(name) == 6):
            report.add(node, "is not a shard (shard groups are named by six digits)")
            continue
        shard_id = int(name)
        marker_node = f"{node}/{fmt.MARKER_GROUP}"
        marker = walker.attrs(marker_node)
        if marker is None:
            if walker.damaged(marker_node) and (not complete or shard_id in listed):
                continue  # the unparsable marker is already reported
            if complete:
                report.add(node, "has no completion marker, yet the store says it is complete")
            else:
                walker.pending.add(node)
                report.to_come.append(f"{node} (no completion marker yet)")
            continue
        problem = shard_marker_problem(marker, ())  # an SAE missing from its nnz is named by _verify_shard
        if problem is not None:
            report.add(marker_node, problem)
            continue
        if complete and shard_id not in listed:
            report.add(node, "is not in the store's shard list (a leftover the finalizer should have deleted)")
        markers[shard_id] = marker
        report.n_shards += 1
        disagreements[node] = _verify_shard(walker, node, marker, saes, run.get("value_dtype"))
    if root is not None and not complete:
        present = {int(n) for n in walker.children(fmt.SHARDS_GROUP) if n.isdigit() and len(n) == 6}
        planned = (root.get("plan") or {}).get("n_shards")
        if isinstance(planned, int) and planned > len(present):
            report.to_come.append(f"up to {planned - len(present)} more shard(s), not started")
        report.to_come.append("the store's shard list, counts and merged statistics, written when the extraction "
                              "finishes")
    _blame_run_record(report, disagreements)
    return markers


def _blame_run_record(report: VerifyReport, disagreements: dict[str, list[tuple[str, str]]]) -> None:
    """Where shards disagree with the root's run record (SAEs, value dtype): if every shard does, the
    same way, the record was edited and the root is damaged; otherwise the odd shards are."""
    found = {node: tuple(d) for node, d in disagreements.items() if d}
    if not found:
        return
    if len(found) == len(disagreements) and len({tuple(m for _, m in d) for d in found.values()}) == 1:
        what = "; ".join(dict.fromkeys(m for _, m in next(iter(found.values()))))
        report.add(METADATA, f"the run record disagrees with every shard ({what}): it was changed after the shards "
                             "were written", DELETE_ROOT)
        return
    for node, items in found.items():
        for part, message in items:
            report.add(part, message)


def _verify_shard(walker: _Walker, node: str, marker: dict, saes: dict | None,
                  value_dtype: str | None) -> list[tuple[str, str]]:
    """Checks one complete shard; returns where it disagrees with the root's run record (``saes`` and
    ``value_dtype``; None when the root is unreadable), for ``_blame_run_record`` to decide."""
    report = walker.report
    disagreements = []
    shard_attrs = walker.attrs(node)
    for key in ("shard_id", "row_start", "row_stop"):
        if shard_attrs is not None and shard_attrs.get(key) != marker.get(key):
            report.add(node, f"{key} is {shard_attrs.get(key)} in the shard's attributes but "
                             f"{marker.get(key)} in its completion marker")
    checksums = dict(marker.get("checksums", {}))
    n_tokens, row_start, row_stop = marker.get("n_tokens"), marker.get("row_start"), marker.get("row_stop")

    def read(name: str) -> np.ndarray | None:
        path = f"{node}/{name}"
        return walker.read(path, checksums.pop(name, None))

    def expect_len(name: str, data: np.ndarray | None, n: int | None) -> bool:
        if data is None:
            return False
        if n is not None and len(data) != n:
            report.add(f"{node}/{name}", f"has {len(data)} entries, expected {n}")
            return False
        return True

    expect_len(fmt.TOKEN_IDS, read(fmt.TOKEN_IDS), n_tokens)
    rows = read(fmt.ROWS)
    pos = read(fmt.POSITIONS)
    expect_len(fmt.ROWS, rows, n_tokens)
    if expect_len(fmt.POSITIONS, pos, n_tokens) and len(pos) and pos.min() < fmt.BOS_POSITION:
        report.add(f"{node}/{fmt.POSITIONS}", f"holds position {int(pos.min())} (positions are >= -1)")
    if rows is not None and len(rows) and row_start is not None:
        if rows.min() < row_start or rows.max() >= row_stop:
            report.add(f"{node}/{fmt.ROWS}", f"holds rows outside the shard's range [{row_start}, {row_stop})")
        elif np.any(np.diff(rows) < 0):
            report.add(f"{node}/{fmt.ROWS}", "rows are not in store order (they decrease)")
    nnz = marker.get("nnz", {})
    for sae in sorted(set(saes if saes is not None else nnz) | set(nnz)):
        base = f"{fmt.SAES_GROUP}/{sae}"
        if sae not in nnz:
            disagreements.append((f"{node}/{base}", f"the run records an SAE named {sae}, the shard's marker has none"))
            continue
        if saes is not None and sae not in saes:
            disagreements.append((f"{node}/{base}", f"the shard's marker has an SAE named {sae}, the run records none"))
            continue
        d_sae = int(saes[sae]["d_sae"]) if saes is not None else None
        written_as = (walker.attrs(f"{node}/{base}") or {}).get("value_dtype", value_dtype)
        if value_dtype is not None and written_as != value_dtype:
            disagreements.append((f"{node}/{base}", f"the run records value_dtype {value_dtype}, the shard's "
                                                    f"values were written as {written_as}"))
        indptr = read(f"{base}/{fmt.INDPTR}")
        indices = read(f"{base}/{fmt.INDICES}")
        values = read(f"{base}/{fmt.VALUES}")
        if expect_len(f"{base}/{fmt.INDPTR}", indptr, None if n_tokens is None else n_tokens + 1):
            where = f"{node}/{base}/{fmt.INDPTR}"
            if len(indptr) and indptr[0] != 0:
                report.add(where, f"starts at {int(indptr[0])}, not 0")
            elif np.any(np.diff(indptr) < 0):
                report.add(where, "decreases somewhere (a pointer array never decreases)")
            elif len(indptr) and indptr[-1] != nnz[sae]:
                report.add(where, f"ends at {int(indptr[-1])}, but the marker records nnz={nnz[sae]}")
        expect_len(f"{base}/{fmt.VALUES}", values, nnz[sae])
        if expect_len(f"{base}/{fmt.INDICES}", indices, nnz[sae]) and len(indices):
            where = f"{node}/{base}/{fmt.INDICES}"
            if d_sae is not None and int(indices.max()) >= d_sae:
                report.add(where, f"holds feature {int(indices.max())}, outside [0, {d_sae})")
            elif indptr is not None and len(indptr) == (n_tokens or 0) + 1 and indptr[-1] == len(indices):
                step = np.diff(indices.astype(np.int64))
                starts = np.zeros(len(indices), bool)
                starts[indptr[:-1][indptr[:-1] < len(indices)]] = True
                if np.any(step[~starts[1:]] <= 0):
                    report.add(where, "feature indices do not ascend within a token")
        if values is not None and written_as is not None and \
                (written_as not in fmt.VALUE_DTYPES or values.dtype != fmt.storage_dtype(written_as)):
            expected = fmt.storage_dtype(written_as) if written_as in fmt.VALUE_DTYPES else "one of the value dtypes"
            report.add(f"{node}/{base}/{fmt.VALUES}", f"dtype {values.dtype}, expected {expected} for the "
                                                      f"value_dtype {written_as!r} its group records")
    for name, recorded in checksums.items():  # further arrays the marker vouches for (statistics, ...)
        path = f"{node}/{name}"
        walker.read(path, recorded)
    return disagreements


def _verify_root_lists(walker: _Walker, root: dict, markers: dict[int, dict]) -> None:
    report = walker.report
    listed = root.get("shards", [])
    keys = ("row_start", "row_stop", "window_start", "n_windows", "token_limit", "n_tokens", "nnz", "rows_digest")
    previous_stop = 0
    for entry in listed:
        shard_id = entry.get("shard_id")
        node = fmt.shard_path(shard_id)
        marker = markers.get(shard_id)
        if marker is None:  # a shard group that is there, but not complete, is named by _verify_shards
            if node not in walker.metadata and not walker.damaged(node):
                report.add(node, "is in the store's shard list but missing from the store")
            previous_stop = entry.get("row_stop")
            continue
        if node not in walker.metadata and not walker.damaged(node):
            report.add(node, f"its group's metadata ({METADATA}) is missing, so readers cannot open it")
        for key in keys:
            if entry.get(key) != marker.get(key):
                report.add(METADATA, f"shard {shard_id}: the root lists {key}={entry.get(key)!r}, its marker "
                                     f"says {marker.get(key)!r}")
        # a shard whose first windows an earlier shard holds (window_start > 0) continues that shard's last row
        continues = (entry.get("window_start") or 0) > 0
        if entry.get("row_start") != (previous_stop - continues if isinstance(previous_stop, int) else None):
            where = f" (at its window {entry.get('window_start')})" if continues else ""
            report.add(METADATA, f"shard {shard_id} starts at row {entry.get('row_start')}{where}, but the shard "
                                 f"before it ends at row {previous_stop} (rows skipped or covered twice)")
        previous_stop = entry.get("row_stop")
    counts = root.get("counts", {})
    n_tokens = sum(e.get("n_tokens", 0) for e in listed)
    if counts.get("n_tokens") != n_tokens:
        report.add(METADATA, f"counts.n_tokens is {counts.get('n_tokens')}, the shards hold {n_tokens}")
    if counts.get("n_shards") != len(listed):
        report.add(METADATA, f"counts.n_shards is {counts.get('n_shards')}, the root lists {len(listed)}")
    for sae, total in counts.get("nnz", {}).items():
        found = sum(e.get("nnz", {}).get(sae, 0) for e in listed)
        if total != found:
            report.add(METADATA, f"counts.nnz[{sae}] is {total}, the shards hold {found}")


def _verify_present(walker: _Walker, root: dict) -> None:
    """What a complete store holds beside its shards (``fmt.holds_stats_and_vocab``): each SAE's merged
    statistics, and the vocabulary of a run with a tokenizer. A deleted group or array is damage."""
    if not fmt.holds_stats_and_vocab(root):
        return
    run = root.get("run") or {}
    expected = [f"{fmt.STATS_GROUP}/{sae.get('name', sae.get('hook'))}/{name}"
                for sae in run.get("saes", []) for name in stats_mod.MERGED]
    if run.get("tokenizer"):
        expected += [f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_OFFSETS}", f"{fmt.VOCAB_GROUP}/{fmt.VOCAB_UTF8}"]
    for node in expected:
        parent = node.rsplit("/", 1)[0]
        if node not in walker.metadata and not walker.damaged(node) and not walker.damaged(parent):
            walker.report.add(node, "is missing from the complete store")


def _verify_index(walker: _Walker, root: dict, markers: dict[int, dict]) -> None:
    """Each complete, current index: its pointer array and parts cover every feature once."""
    report = walker.report
    n_tokens = root.get("counts", {}).get("n_tokens", 0)
    saes = {fmt.sae_name(s): s for s in root.get("run", {}).get("saes", [])}
    for sae in walker.children(INDEX_GROUP):
        node = f"{INDEX_GROUP}/{sae}"
        attrs = walker.attrs(node)
        if attrs is None or not attrs.get("complete") or sae not in saes:
            continue
        problem = index_attrs_problem(attrs)
        if problem is not None:  # a hand edit: its parts and pointers cannot be checked against it
            report.add(node, problem)
            continue
        d_sae = int(saes[sae]["d_sae"])
        written = {(walker.attrs(f"{fmt.shard_path(i)}/{fmt.SAES_GROUP}/{sae}") or {}).get("value_dtype")
                   for i in markers} - {None}
        if len(written) == 1 and attrs.get("value_dtype") not in written:
            report.add(node, f"records its values as {attrs.get('value_dtype')}, but the shards' were written as "
                             f"{written.pop()}")
        indptr = walker.read(f"{node}/{fmt.INDPTR}", attrs.get("checksums", {}).get(fmt.INDPTR))
        if indptr is None:
            continue
        where = f"{node}/{fmt.INDPTR}"
        nnz = root.get("counts", {}).get("nnz", {}).get(sae)
        if len(indptr) != d_sae + 1:
            report.add(where, f"has {len(indptr)} entries, expected d_sae + 1 = {d_sae + 1}")
            continue
        if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            report.add(where, "does not start at 0 or decreases somewhere")
            continue
        if nnz is not None and indptr[-1] != nnz:
            report.add(where, f"ends at {int(indptr[-1])}, but the store holds {nnz} entries for {sae}")
        expected_start = 0
        for part_id, start, stop in attrs.get("parts", []):
            part = f"{node}/{PARTS_GROUP}/{part_id}"
            if start != expected_start:
                report.add(node, f"part {part_id} starts at feature {start}, expected {expected_start} "
                                 "(features skipped or covered twice)")
            expected_start = stop
            marker = walker.attrs(f"{part}/{fmt.MARKER_GROUP}")
            if marker is None:
                if not walker.damaged(f"{part}/{fmt.MARKER_GROUP}"):
                    report.add(part, "has no completion marker, yet the index says it is complete")
                continue
            problem = index_part_marker_problem(marker)
            if problem is not None:
                report.add(f"{part}/{fmt.MARKER_GROUP}", problem)
                continue
            token = walker.read(f"{part}/{fmt.TOKEN}", marker.get("checksums", {}).get(fmt.TOKEN))
            values = walker.read(f"{part}/{fmt.VALUES}", marker.get("checksums", {}).get(fmt.VALUES))
            want = int(indptr[stop] - indptr[start])
            for name, data in ((fmt.TOKEN, token), (fmt.VALUES, values)):
                if data is not None and len(data) != want:
                    report.add(f"{part}/{name}", f"has {len(data)} entries, the index pointers say {want}")
            if token is not None and len(token) and int(token.max()) >= n_tokens:
                report.add(f"{part}/token", f"holds token index {int(token.max())}, outside the store's "
                                            f"{n_tokens} tokens")
        if expected_start != d_sae:
            report.add(node, f"its parts end at feature {expected_start}, expected {d_sae}")


def _verify_merged_stats(walker: _Walker) -> None:
    """The store-wide statistics of each SAE, against the checksums recorded with them (format 1.2)."""
    for sae in walker.children(fmt.STATS_GROUP):
        node = f"{fmt.STATS_GROUP}/{sae}"
        for name, recorded in ((walker.attrs(node) or {}).get("checksums") or {}).items():
            walker.read(f"{node}/{name}", recorded)


def _verify_marked_groups(walker: _Walker, top: str, problem_of: Callable[[dict], str | None]) -> None:
    """Each group under ``top`` with a completion marker (index parts, sweep parts): the marker's shape
    (``problem_of``), then the arrays it vouches for."""
    for node in sorted(walker.metadata):
        if not node.startswith(top + "/") or not node.endswith("/" + fmt.MARKER_GROUP):
            continue
        marker = walker.attrs(node)
        if marker is None:  # unreadable: the walker named it
            continue
        problem = problem_of(marker)
        if problem is not None:  # a hand edit, whose checksums cannot vouch for anything
            if node not in {p.part for p in walker.report.problems}:  # an index part's is named already
                walker.report.add(node, problem)
            continue
        parent = node[: -len(fmt.MARKER_GROUP) - 1]
        for name, recorded in marker["checksums"].items():
            path = f"{parent}/{name}"
            if path not in walker.read_arrays:
                walker.read(path, recorded)
