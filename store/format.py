"""Names, versions and value encodings of the on-disk format (spec: docs/FORMAT.md).

A minor version bump keeps every reader of its major reading (it adds elements, or changes what
readers take from the store's own metadata, as 2.1's chunk sizes); a major bump breaks readers.
Readers accept any minor version of the majors they know and refuse newer majors.
"""

from __future__ import annotations

import re

import numpy as np

from store.errors import FormatVersionError

FORMAT_VERSION = "2.1"
MAJOR = int(FORMAT_VERSION.split(".")[0])  # readers refuse a newer one; writers write no older one
ATTRS_KEY = "latentstore"  # every latentstore attribute lives under this key

STORE_ENCODING = "latentstore.store"
SHARD_ENCODING = "latentstore.shard"
CSR_ENCODING = "latentstore.csr"
MARKER_ENCODING = "latentstore.complete"
STATS_ENCODING = "latentstore.stats"
INDEX_ENCODING = "latentstore.index"
INDEX_PART_ENCODING = "latentstore.index_part"  # since 1.4
VOCAB_ENCODING = "latentstore.vocab"  # since 1.4

SHARDS_GROUP = "shards"
SAES_GROUP = "saes"
MARKER_GROUP = "complete"
STATS_GROUP = "stats"
INDEX_GROUP = "index"
PARTS_GROUP = "parts"
VOCAB_GROUP = "vocab"

TOKEN_IDS = "token_ids"
ROWS = "row"
POSITIONS = "pos"
INDPTR = "indptr"
INDICES = "indices"
VALUES = "values"
TOKEN = "token"  # an index part's store-wide token of each entry
VOCAB_OFFSETS = "offsets"
VOCAB_UTF8 = "utf8"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

# Provenance position of a BOS token that latentstore put at the start of a window:
# it is not part of the row's own tokenization.
BOS_POSITION = -1

VALUE_DTYPES = ("bfloat16", "float16", "float32")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def shard_path(shard_id: int) -> str:
    return f"{SHARDS_GROUP}/{shard_name(shard_id)}"


def encoding(kind: str) -> dict[str, str]:
    """The attributes that stamp an element with its encoding type and version."""
    return {"encoding-type": kind, "encoding-version": FORMAT_VERSION}


def check_stamp(attrs: dict, kind: str, where: str) -> None:
    """``check_version`` of an element that is stamped since format 1.4 (vocabulary, index parts):
    the same element written before then has no stamp."""
    if "encoding-type" in attrs:
        check_version(attrs, kind, where)


def check_version(attrs: dict, kind: str, where: str) -> None:
    """Refuse elements of another type or of a newer major version, saying what to do."""
    found_kind = attrs.get("encoding-type")
    if found_kind != kind:
        raise FormatVersionError(
            f"{where}: expected a {kind!r} element, found {found_kind!r}. "
            "Is this path a latentstore store (made by `latentstore extract`)?"
        )
    version, major = _version(attrs, where)
    if major > MAJOR:
        raise FormatVersionError(
            f"{where} was written in latentstore format {version}; this latentstore reads format "
            f"{MAJOR}.x. Upgrade latentstore: pip install -U latentstore."
        )


VERSION = re.compile(r"(\d+)\.(\d+)")  # an encoding-version: MAJOR.MINOR


def version_numbers(attrs: dict, default: str) -> tuple[int, int] | None:
    """An element's ``encoding-version`` (``default`` where none is recorded) as (major, minor), or
    None where it is not one (a hand edit)."""
    found = VERSION.fullmatch(str(attrs.get("encoding-version", default)))
    return (int(found[1]), int(found[2])) if found else None


def _version(attrs: dict, where: str) -> tuple[str, int]:
    """An element's recorded ``encoding-version``, and its major version; one that is not a version
    is refused, naming it."""
    version, numbers = str(attrs.get("encoding-version", "0.0")), version_numbers(attrs, "0.0")
    if numbers is None:
        raise FormatVersionError(f"{where}: its encoding-version {version!r} is not a format version such as "
                                 f"{FORMAT_VERSION!r}: its metadata was edited by hand or damaged.")
    return version, numbers[0]


def holds_stats_and_vocab(attrs: dict) -> bool:
    """Whether a complete store whose root has these attributes holds each SAE's merged statistics and,
    for a run with a tokenizer, its vocabulary: every store since format 1.1 (1.0 had neither)."""
    return attrs.get("encoding-version", "1.0") != "1.0"


def check_writes(attrs: dict, location: str) -> None:
    """Refuse to write into a store of an older major format: it opens read-only (a 2.x element
    inside a 1.x store would be read by rules it was not written for)."""
    version, major = _version(attrs, location)
    if major < MAJOR:
        raise FormatVersionError(
            f"{location} was written in latentstore format {version}, by an older latentstore. It opens "
            f"read-only: queries, dashboards and exports read it as before, but nothing is written into it "
            f"(this latentstore writes format {FORMAT_VERSION}). To index it, resume it or add sweeps to it, "
            "extract again into a new store, or into this one with `latentstore extract --overwrite`, which "
            "replaces it."
        )


# An SAE's name keys its groups (``saes/<name>``, ``stats/<name>``, ``index/<name>``) since 2.0:
# a zarr node name, kept to characters that are safe in any store URL and shell.
SAE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def sae_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an SAE in a store, or None when it can."""
    if SAE_NAME.fullmatch(name) and not name.startswith("__"):  # zarr reserves names starting "__"
        return None
    return (f"{name!r} cannot name an SAE: a name is 1 to 200 letters, digits, '_', '.' or '-', and starts "
            "with a letter, digit or one '_' (it is a group's name in the store), e.g. res_16k or blocks.8.hook_resid_pre")


def saes_named_by(key: str, hooks: dict[str, str]) -> list[str]:
    """The SAEs that ``key`` names, of those given as ``{name: hook}``: the SAE of that name, else
    every SAE reading the hook ``key`` (one: the key names it; several: the key is ambiguous)."""
    return [key] if key in hooks else [name for name, hook in hooks.items() if hook == key]


def sae_name(record: dict) -> str:
    """An SAE's name from its entry in the run record; a 1.x store named none, so its hook is its name."""
    return record.get("name") or record["hook"]


def storage_dtype(value_dtype: str) -> np.dtype:
    """zarr 3.1 has no bfloat16: its bits are kept as uint16, the logical dtype in attributes."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    return np.dtype({"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}[value_dtype])


def decode_values(stored: np.ndarray, value_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32, written into ``out`` (a float32 array of their shape) when given."""
    out = np.empty(stored.shape, np.float32) if out is None else out
    if value_dtype == "bfloat16":  # a bfloat16 is the high half of the float32 of the same value
        bits = out.view(np.uint32)
        bits[...] = stored
        bits <<= 16
    else:
        out[...] = stored
    return out


def index_dtype(d_sae: int) -> np.dtype:
    return np.dtype("<u2") if d_sae <= np.iinfo(np.uint16).max + 1 else np.dtype("<u4")
