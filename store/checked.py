"""Reads that refuse damaged data: arrays checked against the crc32 recorded when they were written.

A damaged part raises ``StoreCorruptError`` naming it and saying how to repair it, instead of
returning wrong numbers. Shard arrays and merged statistics carry one checksum per array
(their first read decodes them whole); index parts carry one per block of entries, so that a
top-k read decodes and checks only the blocks it touches.
"""

from __future__ import annotations

import shlex
import zlib

import numpy as np
import zarr

from store import format as fmt
from store.errors import StoreCorruptError


def checksum(data: np.ndarray) -> str:
    """What the writers record: crc32 of the array's uncompressed little-endian bytes."""
    return f"crc32:{zlib.crc32(np.ascontiguousarray(data).view(np.uint8)):08x}"


def block_checksums(data: np.ndarray, block: int) -> list[str]:
    """One checksum per ``block`` entries (the last block may be shorter)."""
    return [checksum(data[i:i + block]) for i in range(0, len(data), block)]


ROOT_METADATA = "zarr.json"  # a node's metadata file; at the top of the store, the root's

# What zarr raises on a metadata file that is no zarr node: JSON cut short or garbled (ValueError,
# UnicodeDecodeError), a document of another shape, such as a list or a string (TypeError,
# AttributeError), or one nested deeper than the JSON parser recurses (RecursionError).
METADATA_ERRORS = (ValueError, TypeError, AttributeError, RecursionError)

REBUILD_ROOT = ("rerun the same `latentstore extract` command: it rewrites the root's metadata (zarr.json), "
                "rebuilding it if it is missing or unreadable, and keeps every complete shard that it would "
                "write the same")


def repair(location: str, part: str) -> str:
    """How to repair a damaged part, by what it belongs to. Following it leaves a store that verifies."""
    names = part.split("/")
    top = names[0]
    if top == ROOT_METADATA or names == [fmt.SHARDS_GROUP, ROOT_METADATA]:
        return REBUILD_ROOT
    if top == fmt.VOCAB_GROUP:
        return (f"delete {fmt.VOCAB_GROUP}/ and rerun the same `latentstore extract` command: it writes the "
                "vocabulary anew")
    if top == "sweeps":  # a damaged part (sweeps/<name>/parts/<id>) is redone alone; other damage, the sweep
        damaged = "/".join(names[:4] if names[2:3] == ["parts"] else names[:2])
        return f"delete {damaged} and rerun the same `latentstore sweep` command (it redoes what is missing)"
    if top == fmt.INDEX_GROUP:
        return f"delete {fmt.INDEX_GROUP}/ and run `latentstore index {shlex.quote(location)}` to rebuild it"
    if top == fmt.STATS_GROUP:
        return (f"delete {fmt.STATS_GROUP}/ and rerun the same `latentstore extract` command: it keeps the shards "
                "and rewrites the merged statistics from them")
    shard = "/".join(names[:2])
    return f"delete {shard} and rerun the same `latentstore extract` command (it rewrites missing shards)"


def corrupt(location: str, part: str, what: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{location}: {part} is damaged: {what}. Reads that touch it are refused rather than return wrong "
        f"numbers. Run `latentstore verify {shlex.quote(location)}` to list every damaged part; to repair, "
        f"{repair(location, part)}."
    )


def open_node(root: zarr.Group, path: str, location: str):
    """``root[path]``, with unreadable metadata (torn JSON, an unknown codec) reported as damage.
    A missing node raises KeyError, for callers to which absence means something else."""
    try:
        return root[path]
    except KeyError:
        raise
    except METADATA_ERRORS as e:
        raise corrupt(location, path, f"its metadata cannot be read ({type(e).__name__}: {e})") from e


def open_array(root: zarr.Group, path: str, location: str, sums: list[str] | None,
               block: int | None = None) -> CheckedArray:
    """An array that a complete element lists, so its absence is damage too."""
    try:
        array = open_node(root, path, location)
    except KeyError:
        raise corrupt(location, path, "the array is missing") from None
    return CheckedArray(array, path, location, sums, block)


class CheckedArray:
    """A zarr array whose reads (slices of its first axis) are checked, block by block, against
    recorded checksums.

    ``sums`` holds one crc32 per ``block`` entries (``block`` None: one for the whole array),
    or is None for arrays written before checksums were recorded, which are read unchecked. A
    block is checked the first time a read touches it; later reads of it go straight to zarr.
    Decoding errors and missing chunks (which zarr would read as zeros) become StoreCorruptError."""

    def __init__(self, array: zarr.Array, key: str, location: str, sums: list[str] | None, block: int | None = None):
        self.array, self.key, self.location, self.sums = array, key, location, sums
        self.n = array.shape[0]
        self.whole = block is None
        self.block = block or max(1, self.n)
        self.checked: set[int] = set()

    def __getitem__(self, selection: slice) -> np.ndarray:
        start, stop, step = selection.indices(self.n)
        if stop <= start:
            return self._read(slice(0, 0))
        first, last = start // self.block, (stop - 1) // self.block
        if self.sums is None or all(b in self.checked for b in range(first, last + 1)):
            return self._read(slice(start, stop, step))
        if last >= len(self.sums):
            raise corrupt(self.location, self.key, f"it holds {self.n} entries, more than the {len(self.sums)} "
                                                   f"checksummed blocks of {self.block} recorded when it was written")
        lo = first * self.block
        data = self._read(slice(lo, min(self.n, (last + 1) * self.block)))
        for b in range(first, last + 1):
            found = checksum(data[(b - first) * self.block:(b - first + 1) * self.block])
            if found != self.sums[b]:
                what = "its checksum" if self.whole else \
                    f"the checksum of its entries {b * self.block} to {min(self.n, (b + 1) * self.block) - 1}"
                raise corrupt(self.location, self.key, f"{what} is {found}, but {self.sums[b]} was recorded "
                                                       "when it was written")
            self.checked.add(b)
        return data[start - lo:stop - lo:step]

    def _read(self, selection: slice) -> np.ndarray:
        try:
            return self.array[selection]
        except (RuntimeError, ValueError, KeyError) as e:  # blosc/zstd/delta failures on damaged bytes
            raise corrupt(self.location, self.key, f"a chunk cannot be decoded ({type(e).__name__}: {e})") from e


def read_whole(root: zarr.Group, path: str, location: str, recorded: str | None) -> np.ndarray:
    """A whole array, checked against its one recorded checksum (None: unchecked, older stores)."""
    return open_array(root, path, location, None if recorded is None else [recorded])[:]
