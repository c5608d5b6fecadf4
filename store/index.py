"""The feature-major index: each SAE's activations ordered by feature, highest first.

``index/<name>`` holds ``indptr`` (feature ``f``'s entries are ``[indptr[f], indptr[f+1])``
in the index's global order) and one part per contiguous feature range, each part
written by one worker with its own arrays and a completion marker, so no two
workers ever write the same chunk and a crashed build resumes part by part. Within
a feature, entries are sorted by activation, highest first, earlier token first on
ties: one feature's top examples are one short contiguous read. Building a part
scans every shard's CSR for the part's feature range; it holds only that range's
entries in memory.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import zarr

from store import checked, codecs, format as fmt
from store.elements import now, part_marker, write_array, write_part
from store.location import open_root
from store.schema import index_attrs_problem, index_part_marker_problem
from store.stats import arrange_by_feature_then_value

# entries per chunk and checksum block: a feature's read decodes about one; 2^16 took a third of
# the build in zarr's per-chunk work and read no faster
CHUNK = 1 << 18
DEFAULT_PART_NNZ = 1 << 25  # entries per part: bounds a task's memory (about 30 bytes each at the peak: 1 GB; each part reads every shard)


@dataclass(frozen=True)
class Part:
    part_id: int
    start: int  # first feature
    stop: int  # one past the last feature


def plan_parts(counts: np.ndarray, min_parts: int = 1, part_nnz: int = DEFAULT_PART_NNZ) -> list[Part]:
    """Contiguous feature ranges holding about equal numbers of entries."""
    total = int(counts.sum())
    n_parts = min(max(min_parts, -(-total // part_nnz), 1), len(counts))
    return parts_at(counts, np.linspace(0, total, n_parts + 1)[1:-1])


def plan_layout(counts: dict[str, np.ndarray], n_workers: int, min_split: int,
                part_nnz: int = DEFAULT_PART_NNZ) -> dict[str, list[Part]]:
    """Every SAE's parts, such that ``n_workers`` tasks, handed the parts longest first as each
    frees up, share the entries about equally (within ``min_split``) while the fewest parts re-read
    an SAE's shards (each part reads all of them).

    The SAEs' entries are laid end to end and cut every ``stride`` entries (McNaughton's wrap-around
    rule): a task's share, ``max(total / n_workers, min_split)``, or an equal fraction of it within
    ``part_nnz`` (the memory bound). A part is a piece of one SAE between cuts. A cut nearer than
    ``min_split`` entries to an SAE's end is left out: such a sliver would re-read the SAE for
    little (so a part may pass ``part_nnz`` by two slivers). Since tasks take the pieces longest
    first rather than stretch by stretch, the largest piece is then halved for as long as that
    hand-out leaves a task more than ``min_split`` past its share (or past the largest feature's
    entries, which no cut divides), a few times per task at most."""
    share = max(-(-sum(int(c.sum()) for c in counts.values()) // max(1, n_workers)), min_split, 1)
    per_share = -(-share // part_nnz)  # equal pieces of a share, each within the memory bound
    stride = -(-share // per_share)
    cuts, laid = {}, 0
    for name, feature_counts in counts.items():
        n = int(feature_counts.sum())
        # the multiples of the stride inside this SAE's stretch, counted from its start
        inside = [c - laid for c in range((laid // stride + 1) * stride, laid + n, stride)]
        cuts[name] = [c for c in inside if min_split <= c <= n - min_split]
        laid += n
    # no task can take less than the largest feature, which no cut divides
    target = max(share + min_split, max((int(c.max(initial=0)) for c in counts.values()), default=0))
    for _ in range(4 * max(1, n_workers)):
        pieces = sorted(((int(counts[name][p.start:p.stop].sum()), name, p) for name in counts
                         for p in parts_at(counts[name], cuts[name])), key=lambda piece: -piece[0])
        splittable = [piece for piece in pieces if piece[2].stop - piece[2].start > 1]
        if longest_first_load(pieces, n_workers) <= target or not splittable:
            break
        size, name, part = splittable[0]
        cuts[name] = sorted(cuts[name] + [int(counts[name][:part.start].sum()) + size // 2])
    return {name: parts_at(counts[name], cuts[name]) for name in counts}


def longest_first_load(pieces: list[tuple], n_workers: int) -> int:
    """The entries of the busiest of ``n_workers`` tasks when each takes the next of ``pieces``
    (sized by their first item, longest first) as it frees up."""
    loads = [0] * max(1, n_workers)
    for piece in pieces:
        heapq.heapreplace(loads, loads[0] + piece[0])
    return max(loads)


def parts_at(counts: np.ndarray, cuts) -> list[Part]:
    """Contiguous feature ranges, cut at the features where the running entry count reaches each of
    ``cuts`` (ascending); a range is never empty."""
    cum = np.concatenate([[0], np.cumsum(counts)])
    bounds = np.searchsorted(cum, np.asarray(cuts, dtype=np.float64), side="left")
    edges = np.unique(np.concatenate([[0], bounds, [len(counts)]]).astype(np.int64))
    return [Part(i, int(a), int(b)) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def built_for(shards: list[dict]) -> dict:
    """What an index was built from; an index whose record differs from the store's is stale. The
    rows' digest (which shards record since format 1.2) tells apart a shard redone over edited
    rows of as many tokens."""
    return {"n_shards": len(shards), "n_tokens": int(sum(s["n_tokens"] for s in shards)),
            "shards": [[s["shard_id"], s["n_tokens"], *([s["rows_digest"]] if "rows_digest" in s else [])]
                       for s in shards]}


def begin(location: str, name: str, counts: np.ndarray, shards: list[dict], value_dtype: str,
          parts: list[Part]) -> tuple[list[Part], set[int]]:
    """Create an SAE's index in ``parts`` (as planned), or reopen it to resume in the parts it was
    begun with. Returns its parts and the ids already complete."""
    root = open_root(location, mode="a")
    fmt.check_writes(root.attrs.asdict().get(fmt.ATTRS_KEY, {}), location)
    parent = root.require_group(fmt.INDEX_GROUP)
    record = built_for(shards)
    if name in parent:
        attrs = parent[name].attrs.asdict().get(fmt.ATTRS_KEY, {})
        if attrs.get("built_for") == record and index_attrs_problem(attrs) is None:  # else rebuilt
            parts = [Part(*p) for p in attrs["parts"]]
            return parts, {p.part_id for p in parts if _marker(parent[name], p.part_id) is not None}
        del parent[name]  # built for other contents of the store
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    group = parent.create_group(name, attributes={fmt.ATTRS_KEY: {
        **fmt.encoding(fmt.INDEX_ENCODING), "complete": False, "value_dtype": value_dtype,
        "built_for": record, "parts": [[p.part_id, p.start, p.stop] for p in parts],
        "checksums": {fmt.INDPTR: checked.checksum(indptr)}}})
    write_array(group, fmt.INDPTR, indptr, codecs.TOKEN_LEVEL, chunk=CHUNK)
    group.create_group(fmt.PARTS_GROUP)
    return parts, set()


def build_part(location: str, name: str, part: Part, shards: list[dict], token_dtype: str) -> dict:
    """Scan every shard for the part's features, sort, write the part and then its marker.
    Safe to call again: a part that is already complete is kept as it is."""
    root = open_root(location, mode="a")
    group = root[f"{fmt.INDEX_GROUP}/{name}"]
    existing = _marker(group, part.part_id)
    if existing is not None:  # a retried call whose first attempt finished (its worker died returning)
        return existing
    value_dtype = group.attrs[fmt.ATTRS_KEY]["value_dtype"]
    offsets = np.cumsum([0] + [s["n_tokens"] for s in shards[:-1]])
    found = [_entries_in(root, shard["shard_id"], name, part, offset, token_dtype)
             for shard, offset in zip(shards, offsets)]
    empty = (np.zeros(0, np.uint32), np.zeros(0, fmt.storage_dtype(value_dtype)), np.zeros(0, token_dtype))
    _, values, token = arrange_by_feature_then_value(found or [empty])
    del found  # the shards' pieces: a part's memory is about 30 bytes per entry at its peak
    arrays = {fmt.TOKEN: (token, codecs.VALUES), fmt.VALUES: (values, codecs.VALUES)}
    where = {"part_id": part.part_id, "start": part.start, "stop": part.stop}
    return write_part(group[fmt.PARTS_GROUP], str(part.part_id), {**fmt.encoding(fmt.INDEX_PART_ENCODING), **where},
                      arrays, {**where, "nnz": int(len(token))}, chunk=CHUNK)


def _entries_in(root: zarr.Group, shard_id: int, name: str, part: Part, offset: int,
                token_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's entries of the part's features: (feature less the part's start, stored value,
    store-wide token), in the shard's order."""
    base = f"{fmt.shard_path(shard_id)}/{fmt.SAES_GROUP}/{name}/"
    indices = root[base + fmt.INDICES][:]
    # one unsigned comparison tests both bounds: features below the start wrap round to large numbers
    local = indices - indices.dtype.type(part.start)
    inside = local < part.stop - part.start
    indptr = root[base + fmt.INDPTR][:]
    # each entry's store-wide token, then the part's: one pass over the shard, cheaper than a bisection per entry
    token_of = np.repeat(np.arange(offset, offset + len(indptr) - 1, dtype=token_dtype), np.diff(indptr))
    values = root[base + fmt.VALUES][:]
    if inside.all():  # a part of all the SAE's features keeps every entry as it is
        return local, values, token_of
    return local[inside], values[inside], token_of[inside]


def finalize(location: str, name: str) -> None:
    group = open_root(location, mode="a")[f"{fmt.INDEX_GROUP}/{name}"]
    attrs = dict(group.attrs[fmt.ATTRS_KEY], complete=True, completed_at=now())
    group.attrs[fmt.ATTRS_KEY] = attrs


def _marker(group: zarr.Group, part_id: int) -> dict | None:
    return part_marker(group[fmt.PARTS_GROUP], str(part_id))


class IndexReader:
    """Reads one SAE's complete index. Every read is checked against the checksums recorded when
    the index was written: the pointers whole, at open; a part's entries block by block."""

    def __init__(self, root: zarr.Group, name: str, location: str):
        self.root, self.location, self.path = root, location, f"{fmt.INDEX_GROUP}/{name}"
        attrs = root[self.path].attrs.asdict().get(fmt.ATTRS_KEY, {})
        fmt.check_version(attrs, fmt.INDEX_ENCODING, f"index {self.path}")
        problem = index_attrs_problem(attrs)
        if problem is not None:  # a hand edit: its parts and pointers' checksum are what every read takes
            raise checked.corrupt(location, self.path, problem)
        self.value_dtype = attrs["value_dtype"]
        self.indptr = checked.read_whole(root, f"{self.path}/{fmt.INDPTR}", location,
                                         attrs.get("checksums", {}).get(fmt.INDPTR))
        self._starts = np.array([p[1] for p in attrs["parts"]])
        self._part_ids = [p[0] for p in attrs["parts"]]
        self._arrays: dict[tuple[int, str], checked.CheckedArray] = {}

    def entries(self, feature: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token indices, float32 values) of a feature's entries ``[start, stop)``, highest first."""
        i = int(np.searchsorted(self._starts, feature, side="right") - 1)
        base = self.indptr[self._starts[i]]
        a, b = self.indptr[feature] - base, self.indptr[feature + 1] - base
        lo, hi = a + start, b if stop is None else min(b, a + stop)
        if hi <= lo:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        part = self._part_ids[i]
        tokens = self._array(part, fmt.TOKEN)[lo:hi].astype(np.int64)
        values = fmt.decode_values(self._array(part, fmt.VALUES)[lo:hi], self.value_dtype)
        return tokens, values

    def feature_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features ``[start, stop)`` at once: ``(indptr, token indices, float32 values)``, feature
        ``start + i``'s entries (highest first) being ``[indptr[i], indptr[i + 1])``. One read per
        part the range touches, so a range of many small features costs no more than its entries."""
        tokens, values = [], []
        for i in range(int(np.searchsorted(self._starts, start, side="right") - 1), len(self._starts)):
            part_start = int(self._starts[i])
            if part_start >= stop:
                break
            part_stop = int(self._starts[i + 1]) if i + 1 < len(self._starts) else len(self.indptr) - 1
            a, b = max(start, part_start), min(stop, part_stop)
            base = self.indptr[part_start]
            lo, hi = int(self.indptr[a] - base), int(self.indptr[b] - base)
            if hi > lo:
                tokens.append(self._array(self._part_ids[i], fmt.TOKEN)[lo:hi].astype(np.int64))
                values.append(fmt.decode_values(self._array(self._part_ids[i], fmt.VALUES)[lo:hi], self.value_dtype))
        indptr = self.indptr[start:stop + 1] - self.indptr[start]
        return (indptr, np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
                np.concatenate(values) if values else np.zeros(0, np.float32))

    def _array(self, part_id: int, name: str) -> checked.CheckedArray:
        """A part's array, checked against its marker: per block of entries (format 1.2), or whole
        (1.1, whose markers record one checksum per array)."""
        if (part_id, name) not in self._arrays:
            part = f"{self.path}/{fmt.PARTS_GROUP}/{part_id}"
            marker = _marker(self.root[self.path], part_id)
            if marker is not None:
                fmt.check_stamp(self.root[part].attrs.asdict().get(fmt.ATTRS_KEY, {}), fmt.INDEX_PART_ENCODING,
                                f"{self.location}: {part}")
            if marker is None:
                raise checked.corrupt(self.location, f"{part}/{fmt.MARKER_GROUP}", "the index says it is complete, "
                                      "but this part's completion marker is missing or unreadable")
            problem = index_part_marker_problem(marker)
            if problem is not None:  # its checksums, which every read of the part's entries takes
                raise checked.corrupt(self.location, f"{part}/{fmt.MARKER_GROUP}", problem)
            if "chunk_checksums" in marker:
                sums, block = marker["chunk_checksums"].get(name), marker["checksum_block"]
            else:
                whole = marker.get("checksums", {}).get(name)
                sums, block = (None if whole is None else [whole]), None
            self._arrays[part_id, name] = checked.open_array(self.root, f"{part}/{name}", self.location, sums, block)
        return self._arrays[part_id, name]


def open_index(root: zarr.Group, name: str, shards: list[dict], location: str) -> IndexReader | None:
    """The SAE's index if it is complete and was built from exactly these shards, else None."""
    path = f"{fmt.INDEX_GROUP}/{name}"
    try:
        group = checked.open_node(root, path, location)
    except KeyError:
        return None
    attrs = group.attrs.asdict().get(fmt.ATTRS_KEY, {})
    if not attrs.get("complete") or attrs.get("built_for") != built_for(shards):
        return None
    return IndexReader(root, name, location)
