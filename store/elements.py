"""What writers and readers of a store share: the root's attributes, its arrays, and the completion
markers by which every part (a shard, an index part, a sweep part) becomes visible. The shapes the
root's attributes and a shard's marker must have are in ``store.schema``.

Every part is written the same way, by ``write_part``: a group stamped with its encoding, its arrays,
then its marker, a ``complete`` group whose attributes (``latentstore.complete``) say what the part
holds and the checksum of every array. A part without a readable marker is absent to every reader,
so a crash, a kill or a torn upload never shows half a part. This module is the one place that
writes arrays and writes and reads markers.
"""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import Executor

import numpy as np
import zarr

from store import codecs, format as fmt
from store.checked import METADATA_ERRORS, ROOT_METADATA, block_checksums, checksum, corrupt
from store.location import is_url, normalize, open_root, subgroup_names
from store.schema import root_attrs_problem


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_root_attrs(location: str) -> dict | None:
    """The latentstore attributes of the store at ``location``, or None if there is no root there.
    A root whose metadata cannot be read (a torn upload, a hand edit), or whose attributes are not as
    the format says, raises StoreCorruptError, naming it and the repair: rerunning the extraction
    rebuilds it (``StoreWriter.begin``)."""
    try:
        root = open_root(location, mode="r")
        attrs = root.attrs.asdict().get(fmt.ATTRS_KEY)
    except FileNotFoundError:
        return None
    except METADATA_ERRORS as e:
        raise corrupt(location, ROOT_METADATA, f"it cannot be parsed ({type(e).__name__}: {e})") from None
    if attrs is not None:
        problem = root_attrs_problem(attrs, f"store {location}")
        if problem is not None:
            raise corrupt(location, ROOT_METADATA, problem)
    return attrs


def write_array(group: zarr.Group, name: str, data: np.ndarray, encoding: codecs.Encoding,
                chunk: int | None = None, attributes: dict | None = None) -> str:
    """Create ``group/name`` holding ``data``, in chunks of ``chunk`` entries (default: the codecs'
    size); returns the checksum that markers record."""
    array = group.create_array(
        name, shape=data.shape, dtype=data.dtype,
        chunks=codecs.chunk_shape(len(data)) if chunk is None else (max(1, min(len(data), chunk)),),
        filters=encoding.filters(data.dtype), compressors=encoding.compressors(), fill_value=0,
        attributes=None if attributes is None else {fmt.ATTRS_KEY: attributes},
        # zarr would compare every chunk with the fill value to skip the empty ones, which ours
        # almost never are: that check was half the time of an uncompressed write
        config={"write_empty_chunks": True},
    )
    if len(data):
        array[:] = data
    return checksum(data)


def write_part(parent: zarr.Group, name: str, attributes: dict, arrays: dict[str, tuple[np.ndarray, codecs.Encoding]],
               marker: dict, *, groups: dict[str, dict] | None = None, chunk: int | None = None,
               array_attributes: dict | None = None, pool: Executor | None = None) -> dict:
    """Write the part ``parent/name`` whole, then mark it complete; returns its marker as stamped.

    Whatever is at ``parent/name`` goes first (a retry, or what a crashed attempt left). The part's
    group gets ``attributes`` (its encoding stamp first), each of ``groups`` (paths within the part,
    parents first) its attributes, and each array of ``arrays`` (by path) is written, on ``pool``
    when given (Blosc releases the GIL). The marker records every array's checksum by path and, with
    ``chunk``, one checksum per chunk, so that readers check what they read block by block."""
    if name in parent:
        del parent[name]
    part = parent.create_group(name, attributes={fmt.ATTRS_KEY: attributes})
    made = {"": part}
    for path, attrs in (groups or {}).items():
        made[path] = part.create_group(path, attributes={fmt.ATTRS_KEY: attrs})

    def write(item: tuple[str, tuple[np.ndarray, codecs.Encoding]]) -> tuple[str, str]:
        path, (data, encoding) = item
        within, _, leaf = path.rpartition("/")
        return path, write_array(made[within], leaf, data, encoding, chunk, array_attributes)

    checksums = dict(pool.map(write, arrays.items()) if pool is not None else map(write, arrays.items()))
    marker = {**marker, "checksums": checksums, "written_at": now()}
    if chunk is not None:
        marker["checksum_block"] = chunk
        marker["chunk_checksums"] = {path: block_checksums(data, chunk) for path, (data, _) in arrays.items()}
    return write_marker(part, marker)


def write_marker(part: zarr.Group, marker: dict) -> dict:
    """Mark ``part`` complete, after every array of it is written; returns the marker as stamped."""
    marker = {**fmt.encoding(fmt.MARKER_ENCODING), **marker}
    part.create_group(fmt.MARKER_GROUP, attributes={fmt.ATTRS_KEY: marker})
    return marker


def read_marker(part: zarr.Group) -> dict | None:
    """A part's completion marker, or None while the part is incomplete."""
    try:
        marker_group = part[fmt.MARKER_GROUP]
    except KeyError:
        return None
    except METADATA_ERRORS:  # a torn or garbled marker: the part is not complete
        return None
    marker = marker_group.attrs.asdict().get(fmt.ATTRS_KEY)
    if not isinstance(marker, dict) or fmt.version_numbers(marker, "1.0") is None:
        return None  # absent, or garbled by hand: the part is not complete
    fmt.check_version(marker, fmt.MARKER_ENCODING, f"part {part.path}")
    return marker


def part_marker(parent: zarr.Group, name: str) -> dict | None:
    """The marker of the part ``parent/name``, or None while it is absent or incomplete."""
    try:
        return read_marker(parent[name])
    except KeyError:
        return None


def complete_markers(parent: zarr.Group) -> dict[str, dict]:
    """The completion markers of ``parent``'s subgroups, by name; incomplete subgroups are left out.
    A subgroup can vanish between the listing and the read (a retry replacing what a crashed
    attempt left): it was not complete either."""
    out = {}
    for name in subgroup_names(parent):
        try:
            marker = read_marker(parent[name])
        except KeyError:
            continue
        if marker is not None:
            out[name] = marker
    return out


def _filesystem(location: str):
    """The fsspec filesystem of ``location`` and the store's path on it, for lookups made without zarr."""
    import fsspec

    location = normalize(location)
    fs, base = fsspec.core.url_to_fs(location) if is_url(location) else (fsspec.filesystem("file"), location)
    return fs, base.rstrip("/")


def stamped_as_store(location: str) -> bool:
    """Whether the root's metadata file at ``location``, however damaged its attributes, still parses
    and carries a store's encoding type: latentstore wrote it (read without zarr, as below)."""
    fs, base = _filesystem(location)
    try:
        with fs.open(f"{base}/{ROOT_METADATA}", "rb") as f:
            stamp = json.loads(f.read(1 << 20))["attributes"][fmt.ATTRS_KEY]["encoding-type"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return False
    return stamp == fmt.STORE_ENCODING


def has_shard_markers(location: str) -> bool:
    """Whether any shard at ``location`` has a completion marker file (looked up without zarr, so
    that it answers when the root's metadata is missing or unreadable)."""
    fs, base = _filesystem(location)
    try:
        shards = fs.ls(f"{base}/{fmt.SHARDS_GROUP}", detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    # the first shard is usually complete: one existence check, not a listing of every shard
    return any(fs.exists(f"{shard}/{fmt.MARKER_GROUP}/{ROOT_METADATA}") for shard in sorted(shards))
