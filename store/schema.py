"""The shapes of the store's metadata that readers rely on: the root's latentstore attributes, an SAE
index group's, and the completion markers of shards, index parts and sweep parts (docs/FORMAT.md),
each checked once, where it is read, so that a hand edit or a torn write is named as such, never met
later as a KeyError or a TypeError."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from store import format as fmt


@dataclass(frozen=True)
class Kind:
    """What one attribute must be: ``test`` tells whether a value is one, ``what`` says it in words."""
    what: str
    test: Callable[[object], bool]


@dataclass(frozen=True)
class ListOf:
    """A list of at least ``at_least`` items, each as ``item`` says."""
    item: object
    at_least: int = 0


@dataclass(frozen=True)
class MapOf:
    """An object of any keys (an SAE's name, ...), each value as ``item`` says."""
    item: object


@dataclass(frozen=True)
class Maybe:
    """An attribute that may be absent (one an older format did not write, or one a run may lack);
    when there, as ``item`` says."""
    item: object


@dataclass(frozen=True)
class OrNull:
    """Null, or as ``item`` says."""
    item: object


def _whole(at_least: int) -> Kind:
    return Kind(f"a whole number >= {at_least}",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= at_least)


def _one_of(*values: str) -> Kind:
    return Kind(f"one of {', '.join(map(json.dumps, values))}", lambda v: isinstance(v, str) and v in values)


TEXT = Kind("a string", lambda v: isinstance(v, str))
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
COUNT, SIZE = _whole(0), _whole(1)
VERSION = Kind('a "MAJOR.MINOR" string', lambda v: isinstance(v, str) and fmt.VERSION.fullmatch(v) is not None)
NAME = Kind("an SAE name (1 to 200 letters, digits, '_', '.' or '-')",
            lambda v: isinstance(v, str) and fmt.sae_name_problem(v) is None)

TOKEN_ID = Maybe(OrNull(COUNT))  # null where the tokenizer has none

# The root's attributes that readers take (docs/FORMAT.md, "The root group"), as every version of the
# format writes them; a dict is an object with those keys (others are allowed: a minor version adds).
# The stamp is checked first, so that another element or a newer format is refused as such.
ROOT_STAMP = {"encoding-type": TEXT,
              "encoding-version": VERSION}
ROOT_SHAPE = {
    "status": _one_of(fmt.STATUS_WRITING, fmt.STATUS_COMPLETE),
    "run": {
        "model": {"name": TEXT},
        "dataset": {"name": TEXT},
        # an extraction takes at least one SAE; a 1.x run named none (each is named by its hook)
        "saes": ListOf({"name": Maybe(NAME), "hook": TEXT, "source": TEXT, "architecture": TEXT,
                        "d_sae": SIZE}, at_least=1),
        "tokenizer": Maybe(OrNull({"bos_token_id": TOKEN_ID, "eos_token_id": TOKEN_ID, "pad_token_id": TOKEN_ID})),
        "context_size": SIZE,
        "prepend_bos": FLAG,
        "value_dtype": _one_of(*fmt.VALUE_DTYPES),
    },
}
# What readers and a rerun take from a shard's completion marker, and from its entry in the shard list
SHARD_ENTRY = {"shard_id": COUNT, "row_start": COUNT, "row_stop": COUNT, "window_start": Maybe(COUNT),
               "n_tokens": COUNT, "nnz": MapOf(COUNT)}
CHECKSUM = Kind('a "crc32:XXXXXXXX" string', lambda v: isinstance(v, str) and re.fullmatch(r"crc32:[0-9a-f]{8}", v)
                is not None)
# the version of a marker or an index group, which says what else it must hold (1.0 where none is recorded)
STAMP = {"encoding-version": Maybe(VERSION)}
# The marker adds the checksums its arrays are read against: required since 1.2, which began to record
# them, for the arrays every read takes (a marker without them would let damage read back unchecked)
SHARD_MARKER = {**STAMP, **SHARD_ENTRY, "checksums": Maybe(MapOf(CHECKSUM))}
CHECKSUMS_SINCE = (1, 2)
COMPLETE_SHAPE = {  # what the extraction adds when it finishes
    "shards": ListOf(SHARD_ENTRY),
    "counts": {"n_tokens": Maybe(COUNT), "n_shards": Maybe(COUNT), "nnz": Maybe(MapOf(COUNT))},
}


def root_attrs_problem(attrs: object, where: str) -> str | None:
    """What is wrong with the shape of a store root's latentstore attributes, said for a message
    (the first few problems), or None when nothing is. The root of another element, or of a newer
    major format, raises FormatVersionError (``fmt.check_version``): its shape is not ours to judge."""
    problems = list(_shape_problems(attrs, ROOT_STAMP, fmt.ATTRS_KEY))
    if not problems:
        fmt.check_version(attrs, fmt.STORE_ENCODING, where)
        complete = attrs.get("status") == fmt.STATUS_COMPLETE
        problems = list(_shape_problems(attrs, {**ROOT_SHAPE, **COMPLETE_SHAPE} if complete else ROOT_SHAPE,
                                        fmt.ATTRS_KEY))
        if not problems and complete:
            problems = _uncounted_saes(attrs)
    return _said(problems)


def shard_marker_problem(marker: dict, saes: Iterable[str]) -> str | None:
    """What is wrong with the shape of a shard's completion marker (a hand edit), said for a message,
    or None when nothing is: its place, its token count and its nonzeros for each SAE of ``saes``."""
    problems = list(_shape_problems(marker, SHARD_MARKER, fmt.ATTRS_KEY))
    missing = set(saes) - marker["nnz"].keys() if not problems else set()
    if missing:
        problems.append(f"{fmt.ATTRS_KEY}.nnz has no entry for {', '.join(sorted(missing))}")
    if not problems and _version(marker) >= CHECKSUMS_SINCE:
        # an SAE the marker holds no array of is not this check's to name: readers and verify say that
        # the shard lacks the SAE
        recorded = marker.get("checksums", {})
        held = [name for name in marker["nnz"] if any(key.startswith(f"{fmt.SAES_GROUP}/{name}/") for key in recorded)]
        arrays = [fmt.TOKEN_IDS, fmt.ROWS, fmt.POSITIONS, *(f"{fmt.SAES_GROUP}/{name}/{array}" for name in held
                                                             for array in (fmt.INDPTR, fmt.INDICES, fmt.VALUES))]
        unchecked = [name for name in arrays if name not in recorded]
        if unchecked:
            problems.append(f"{fmt.ATTRS_KEY}.checksums has no entry for {', '.join(unchecked[:3])}"
                            f"{' and more' if len(unchecked) > 3 else ''} (format 1.2 and later record one per array)")
    return _said(problems)


# An SAE index group's attributes, which every read of the index takes: its parts (id, first feature,
# past the last), and since 1.2 the checksum of its pointers
INDEX_ATTRS = {**STAMP, "complete": FLAG, "value_dtype": _one_of(*fmt.VALUE_DTYPES), "built_for": OBJECT,
               "parts": ListOf(ListOf(COUNT, at_least=3)), "checksums": Maybe(MapOf(CHECKSUM))}


def index_attrs_problem(attrs: object) -> str | None:
    """What is wrong with the shape of an SAE index group's attributes (a hand edit), said for a
    message, or None when nothing is."""
    problems = list(_shape_problems(attrs, INDEX_ATTRS, fmt.ATTRS_KEY))
    if not problems and _version(attrs) >= CHECKSUMS_SINCE:
        problems = _unchecked("checksums", attrs.get("checksums", {}), (fmt.INDPTR,))
    return _said(problems)


# An index part's marker: the checksums its entries are read against, whole (1.1) and since 1.2 also
# per block of ``checksum_block`` entries
INDEX_PART_MARKER = {**STAMP, "checksums": MapOf(CHECKSUM), "chunk_checksums": Maybe(MapOf(ListOf(CHECKSUM))),
                     "checksum_block": Maybe(SIZE)}


def index_part_marker_problem(marker: dict) -> str | None:
    """What is wrong with the shape of an index part's completion marker (a hand edit), said for a
    message, or None when nothing is: a checksum of each of its arrays (``token``, ``values``), and
    since 1.2 their blocks' checksums and the block's size."""
    problems = list(_shape_problems(marker, INDEX_PART_MARKER, fmt.ATTRS_KEY))
    if not problems:
        needed = [("checksums", marker["checksums"])]
        if _version(marker) >= CHECKSUMS_SINCE:
            needed.append(("chunk_checksums", marker.get("chunk_checksums", {})))
            if "checksum_block" not in marker:
                problems.append(f"{fmt.ATTRS_KEY}.checksum_block is missing")
        problems += [line for key, recorded in needed for line in _unchecked(key, recorded, (fmt.TOKEN, fmt.VALUES))]
    return _said(problems)


# A sweep part's marker: a checksum of each column it holds
SWEEP_PART_MARKER = {**STAMP, "checksums": MapOf(CHECKSUM)}


def sweep_part_marker_problem(marker: dict, columns: Iterable[str]) -> str | None:
    """What is wrong with the shape of a sweep part's completion marker (a hand edit), said for a
    message, or None when nothing is: a checksum of each of ``columns`` (those every part holds)."""
    problems = list(_shape_problems(marker, SWEEP_PART_MARKER, fmt.ATTRS_KEY))
    return _said(problems or _unchecked("checksums", marker["checksums"], columns))


def _unchecked(key: str, recorded: dict, arrays: Iterable[str]) -> list[str]:
    """A line for each of ``arrays`` that the marker's ``key`` records no checksum of."""
    return [f"{fmt.ATTRS_KEY}.{key} has no entry for {array}" for array in arrays if array not in recorded]


def _version(marker: dict) -> tuple[int, int]:
    """A marker's or index group's ``encoding-version`` (1.0 where none is recorded), once its shape is checked."""
    return fmt.version_numbers(marker, "1.0")


def _said(problems: list[str]) -> str | None:
    """The first few shape problems, for a message; None for none."""
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"its attributes are not as the format says: {'; '.join(problems[:3])}{more}"


def _uncounted_saes(attrs: dict) -> list[str]:
    """Each entry of the shard list that records no nnz for an SAE of the run (readers sum them by SAE)."""
    names = {fmt.sae_name(sae) for sae in attrs["run"]["saes"]}
    return [f"{fmt.ATTRS_KEY}.shards[{i}].nnz has no entry for {', '.join(sorted(names - entry['nnz'].keys()))}"
            for i, entry in enumerate(attrs["shards"]) if names - entry["nnz"].keys()]


def _shape_problems(value: object, shape: object, path: str) -> Iterator[str]:
    """Where ``value`` (found at ``path`` in the metadata) differs from ``shape``, one line each."""
    if isinstance(shape, OrNull):
        if value is None:
            return
        shape = shape.item
    if isinstance(shape, Kind):
        if not shape.test(value):
            yield f"{path} is {_shown(value)}, expected {shape.what}"
        return
    expected = list if isinstance(shape, ListOf) else dict
    if not isinstance(value, expected):
        yield f"{path} is {_shown(value)}, expected {'a list' if expected is list else 'an object'}"
    elif isinstance(shape, ListOf):
        if len(value) < shape.at_least:
            yield f"{path} is {_shown(value)}, expected at least {shape.at_least} item(s)"
        for i, item in enumerate(value):
            yield from _shape_problems(item, shape.item, f"{path}[{i}]")
    elif isinstance(shape, MapOf):
        for key, item in value.items():
            yield from _shape_problems(item, shape.item, f"{path}[{json.dumps(key)}]")
    else:
        for key, item in shape.items():
            if key in value:
                yield from _shape_problems(value[key], item.item if isinstance(item, Maybe) else item, f"{path}.{key}")
            elif not isinstance(item, Maybe):
                yield f"{path}.{key} is missing"


def _shown(value: object, limit: int = 40) -> str:
    """A value as its JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
