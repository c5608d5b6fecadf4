"""What writers and readers of a store share: the root's attributes, and the completion markers by
which every part (a shard, an index part, a sweep part) becomes visible.

Every part is written the same way: its arrays first, then its marker, a ``complete`` group whose
attributes (``latentstore.complete``) say what the part holds. A part without a readable marker is
absent to every reader, so a crash, a kill or a torn upload never shows half a part. This module is
the one place that writes and reads markers.
"""

from __future__ import annotations

import zarr

from store import format as fmt
from store.checked import ROOT_METADATA, corrupt
from store.location import is_url, normalize, open_root, subgroup_names


def read_root_attrs(location: str) -> dict | None:
    """The latentstore attributes of the store at ``location``, or None if there is no root there.
    A root whose metadata cannot be read (a torn upload, a hand edit) raises StoreCorruptError,
    naming it and the repair: rerunning the extraction rebuilds it (``StoreWriter.begin``)."""
    try:
        root = open_root(location, mode="r")
        attrs = root.attrs.asdict().get(fmt.ATTRS_KEY)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # JSON cut short or garbled: zarr raises several types
        raise corrupt(location, ROOT_METADATA, f"it cannot be parsed ({type(e).__name__}: {e})") from None
    if attrs is not None:
        fmt.check_version(attrs, fmt.STORE_ENCODING, f"store {location}")
    return attrs


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
    except ValueError:  # a torn marker (JSON cut short): the part is not complete
        return None
    marker = marker_group.attrs.asdict().get(fmt.ATTRS_KEY)
    if marker is None:
        return None
    fmt.check_version(marker, fmt.MARKER_ENCODING, f"part {part.path}")
    return marker


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


def has_shard_markers(location: str) -> bool:
    """Whether any shard at ``location`` has a completion marker file (looked up without zarr, so
    that it answers when the root's metadata is missing or unreadable)."""
    import fsspec

    location = normalize(location)
    fs, base = fsspec.core.url_to_fs(location) if is_url(location) else (fsspec.filesystem("file"), location)
    try:
        shards = fs.ls(f"{base.rstrip('/')}/{fmt.SHARDS_GROUP}", detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    # the first shard is usually complete: one existence check, not a listing of every shard
    return any(fs.exists(f"{shard}/{fmt.MARKER_GROUP}/{ROOT_METADATA}") for shard in sorted(shards))
