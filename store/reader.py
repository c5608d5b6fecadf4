"""Reading a store: ``FeatureStore.open(path)``.

Reads only complete shards. A store still being written (or left part-way by a
crash) opens too and shows the shards completed so far; ``fs.complete`` says which.
"""

from __future__ import annotations

import copy
import os
import shlex
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from store import format as fmt
from store.checked import METADATA_ERRORS, ROOT_METADATA, CheckedArray, corrupt, open_array, open_node
from store.arguments import is_whole
from store.errors import (ConfigError, StoreCorruptError, StoreIncompleteError, StoreNotFoundError, TokenRangeError,
                          did_you_mean)
from store.location import has_content, is_url, normalize, open_root
from store import index as index_mod
from store import stats as stats_mod
from store.queries import Queries
from store.elements import complete_markers, has_shard_markers, read_marker, read_root_attrs
from store.schema import shard_marker_problem


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    token_start: int  # offset of the shard's first token in store order
    n_tokens: int
    row_start: int
    row_stop: int
    nnz: dict[str, int]

    @property
    def token_stop(self) -> int:
        return self.token_start + self.n_tokens


class FeatureStore(Queries):
    """Sparse SAE activations over a dataset, in store order (dataset row, then position)."""

    def __init__(self, location: str, attrs: dict, shards: list[ShardInfo]):
        self.location = location
        self.attrs = attrs
        self.shards = shards
        self._root = open_root(location, mode="r")
        self._arrays: dict[str, CheckedArray] = {}
        self._stats: dict[str, stats_mod.FeatureStats] = {}
        self._indexes: dict[str, index_mod.IndexReader | None] = {}

    @classmethod
    def open(cls, location: str) -> "FeatureStore":
        location = normalize(location)
        attrs = read_root_attrs(location)  # unreadable: StoreCorruptError, with the repair
        if attrs is None and has_shard_markers(location):
            raise corrupt(location, ROOT_METADATA, "the root's metadata is missing, but the store holds shards")
        if attrs is None and not is_url(location) and os.path.isfile(location):
            raise StoreNotFoundError(f"{location} is a file, not a latentstore store (a store is a folder). Give the "
                                     "store's folder.")
        if attrs is None and has_content(location):  # extract will not write over it either
            raise StoreNotFoundError(
                f"{location} is not a latentstore store: something else is there (its root has no latentstore "
                "attributes). Give the path of a store, or make one at a new path with `latentstore extract --store`."
            )
        if attrs is None:
            raise StoreNotFoundError(
                f"No latentstore store at {location}. Make one with `latentstore extract --store {shlex.quote(location)}`."
            )
        if attrs.get("status") == fmt.STATUS_COMPLETE:
            listed = attrs["shards"]
        else:  # being written: whatever is complete so far, in store order
            try:
                shards = open_node(open_root(location, mode="r"), fmt.SHARDS_GROUP, location)
            except KeyError:
                shards = None  # the root is written before its shards group
            markers = complete_markers(shards) if shards is not None else {}
            names = [fmt.sae_name(sae) for sae in attrs["run"]["saes"]]
            for name, marker in markers.items():  # a complete store's list is checked with its root
                problem = shard_marker_problem(marker, names)
                if problem is not None:
                    raise corrupt(location, f"{fmt.SHARDS_GROUP}/{name}/{fmt.MARKER_GROUP}", problem)
            listed = list(markers.values())
        infos, offset = [], 0
        for m in sorted(listed, key=lambda m: m["shard_id"]):
            infos.append(ShardInfo(m["shard_id"], offset, m["n_tokens"], m["row_start"], m["row_stop"], m["nnz"]))
            offset += m["n_tokens"]
        return cls(location, attrs, infos)

    # -- description -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.attrs.get("status") == fmt.STATUS_COMPLETE

    def require_complete(self, then: str) -> None:
        """Raise StoreIncompleteError unless the whole run is written: for what would otherwise look
        complete while missing the shards still to come. ``then`` says what to do once it is."""
        if not self.complete:
            raise StoreIncompleteError(
                f"{self.location} is still being written (or its extraction stopped part-way): it holds "
                f"{len(self.shards)} complete shards, {self.n_tokens:,} tokens so far. Finish it by rerunning the "
                f"same `latentstore extract` command, then {then}."
            )

    @property
    def run(self) -> dict:
        return self.attrs["run"]

    @cached_property
    def _saes(self) -> dict[str, dict]:
        """Each SAE's entry in the run record, by name (a 1.x store named none: its hooks are its names)."""
        return {fmt.sae_name(sae): {**sae, "name": fmt.sae_name(sae)} for sae in self.run["saes"]}

    @property
    def saes(self) -> list[str]:
        """The names of the store's SAEs, in the order they were given."""
        return list(self._saes)

    @property
    def hooks(self) -> list[str]:
        """The hooks the store's SAEs read, each once."""
        return list(dict.fromkeys(sae["hook"] for sae in self._saes.values()))

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def value_dtype(self) -> str:
        """The dtype the activations are stored in: the run's record, once the first shard's own groups
        confirm it (what decodes by it, such as an index build, never meets a hand-edited record)."""
        for name in self.saes if self.shards else ():
            self._value_dtype(self.shards[0], name)
        return self.run["value_dtype"]

    def d_sae(self, sae: str) -> int:
        return int(self._saes[self.resolve(sae)]["d_sae"])

    def nnz(self, sae: str) -> int:
        name = self.resolve(sae)
        return sum(s.nnz[name] for s in self.shards)

    def resolve(self, sae: str) -> str:
        """The name of the SAE called ``sae``, or of the one SAE at hook ``sae``. Every method that
        takes an SAE takes either."""
        if not isinstance(sae, str):
            raise ConfigError(f"sae={sae!r}: give an SAE's name (a string); store {self.location} has "
                              f"{', '.join(map(repr, self.saes))}.")
        at_hook = fmt.saes_named_by(sae, {name: record["hook"] for name, record in self._saes.items()})
        if len(at_hook) == 1:
            return at_hook[0]
        if at_hook:
            raise ConfigError(f"hook {sae!r} holds {len(at_hook)} SAEs in store {self.location}: "
                              f"{', '.join(at_hook)}. Name one of them instead of the hook.")
        raise ConfigError(f"store {self.location} has no SAE named {sae!r} (nor one at a hook of that name); "
                          f"its SAEs: {did_you_mean(sae, self.saes)}")

    def sae_record(self, sae: str) -> dict:
        """The run record's entry of one SAE (by name, or by its hook): ``name``, ``hook``, ``source``,
        ``architecture``, ``d_in``, ``d_sae``, ``config``, and a transcoder's ``hook_out``."""
        return copy.deepcopy(self._saes[self.resolve(sae)])  # a copy: an edit must not change what reads use

    def info(self) -> dict:
        """A plain summary of the store: what ran, over what, and how much it holds."""
        run = self.run
        return {
            "location": self.location,
            "status": self.attrs.get("status"),
            "format_version": self.attrs.get("encoding-version"),
            "latentstore_version": self.attrs.get("latentstore_version"),
            "created_at": self.attrs.get("created_at"),
            "completed_at": self.attrs.get("completed_at"),
            "model": run["model"]["name"],
            "dataset": run["dataset"]["name"],
            "split": run["dataset"].get("split"),
            "context_size": run["context_size"],
            "prepend_bos": run["prepend_bos"],
            "value_dtype": run["value_dtype"],
            "n_shards": len(self.shards),
            "n_tokens": self.n_tokens,
            "saes": [
                {
                    "name": name,
                    "hook": sae["hook"],
                    "source": sae["source"],
                    "architecture": sae["architecture"],
                    "d_sae": sae["d_sae"],
                    "nnz": self.nnz(name),
                    "mean_l0": self.nnz(name) / max(1, self.n_tokens),
                }
                for name, sae in self._saes.items()
            ],
        }

    def tree(self) -> str:
        """The store's zarr hierarchy, one node a line: arrays with dtype, shape and codecs."""
        lines = []

        def walk(group: zarr.Group, depth: int) -> None:
            for name, node in sorted(group.members(), key=lambda m: m[0]):
                indent = "  " * depth
                if isinstance(node, zarr.Array):
                    codecs = " -> ".join(c["name"] for c in node.metadata.to_dict()["codecs"])
                    lines.append(f"{indent}{name}  {node.dtype} {list(node.shape)}  [{codecs}]")
                else:
                    kind = node.attrs.asdict().get(fmt.ATTRS_KEY, {}).get("encoding-type", "group")
                    lines.append(f"{indent}{name}/  ({kind})")
                    walk(node, depth + 1)

        lines.append(f"/  ({self.attrs['encoding-type']} {self.attrs['encoding-version']})")
        walk(self._root, 1)
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "" if self.complete else ", incomplete"
        return f"FeatureStore({self.location!r}, {self.n_tokens:,} tokens, saes={self.saes}{state})"

    # -- statistics, index, vocabulary --------------------------------------------------------

    def stats(self, sae: str) -> stats_mod.FeatureStats:
        """Per-feature statistics over the whole store (merged from the shards when still writing)."""
        name = self.resolve(sae)
        if name not in self._stats:
            if self.complete:
                self._stats[name] = stats_mod.read_merged(self.location, name)
            else:
                markers = [self._marker(s.shard_id) for s in self.shards]
                for shard in self.shards:  # each shard's statistics are decoded by the run's value dtype
                    self._value_dtype(shard, name)
                self._stats[name] = stats_mod.merge_shards(self.location, markers, name, self.d_sae(name),
                                                           self.value_dtype)
        return self._stats[name]

    def index(self, sae: str) -> index_mod.IndexReader | None:
        """The SAE's feature-major index, or None when it is missing or stale (queries then scan)."""
        name = self.resolve(sae)
        if name not in self._indexes:
            index = (index_mod.open_index(self._root, name, self.attrs["shards"], self.location)
                     if self.complete else None)
            if index is not None and index.value_dtype != self.value_dtype:
                raise StoreCorruptError(
                    f"{self.location}: {index.path} records its values as {index.value_dtype}, but the store's run "
                    f"record ({ROOT_METADATA}, run.value_dtype) says {self.value_dtype}. Run `latentstore verify "
                    f"{self.location}`: it names the damaged one and how to repair it."
                )
            self._indexes[name] = index
        return self._indexes[name]

    @cached_property
    def vocab(self) -> list[str] | None:
        """Each token id's text (as the tokenizer decodes it alone), or None without a tokenizer."""
        try:
            group = open_node(self._root, fmt.VOCAB_GROUP, self.location)
        except KeyError:
            if self.complete and self.run.get("tokenizer") and fmt.holds_stats_and_vocab(self.attrs):
                raise corrupt(self.location, fmt.VOCAB_GROUP, "the group is missing") from None
            return None
        fmt.check_stamp(group.attrs.asdict().get(fmt.ATTRS_KEY, {}), fmt.VOCAB_ENCODING, f"{self.location} vocabulary")
        offsets, data = (open_array(self._root, f"{fmt.VOCAB_GROUP}/{name}", self.location, None)[:]
                         for name in (fmt.VOCAB_OFFSETS, fmt.VOCAB_UTF8))
        data = data.tobytes()
        return [data[a:b].decode("utf-8", errors="replace") for a, b in zip(offsets[:-1], offsets[1:])]

    @cached_property
    def special_token_ids(self) -> set[int]:
        """BOS, EOS and padding ids of the run's tokenizer."""
        tokenizer = self.run.get("tokenizer") or {}
        ids = (tokenizer.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
        return {int(i) for i in ids if i is not None}

    @cached_property
    def _token_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """token ids, rows and positions of every token, loaded once for fast context lookups."""
        return self.token_ids(), self._concat(fmt.ROWS, 0, None, np.int64), self._concat(fmt.POSITIONS, 0, None, np.int32)

    # -- token-level arrays ------------------------------------------------------------------

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids in store order (dataset row, then position), optionally a range of them."""
        return self._concat(fmt.TOKEN_IDS, start, stop, np.int32)

    def provenance(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Where each stored token came from: dataset ``row`` and ``pos`` in that row's tokenization
        (``pos`` is -1 for a BOS token latentstore added at the start of a window)."""
        return pd.DataFrame(
            {
                "row": self._concat(fmt.ROWS, start, stop, np.int64),
                "pos": self._concat(fmt.POSITIONS, start, stop, np.int32),
            }
        )

    def csr(self, sae: str, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """One SAE's activations as a ``(n_tokens, d_sae)`` float32 CSR matrix, or a row range of it."""
        name = self.resolve(sae)  # which keys its groups
        d_sae = self.d_sae(name)
        start, stop = self._range(start, stop)
        base = f"{fmt.SAES_GROUP}/{name}/"
        pieces = []
        for shard, lo, hi in self._pieces(start, stop):
            self._value_dtype(shard, name)  # the shard's group against the run's record first: there, same dtype
            pieces.append((shard, self._array(shard, base + fmt.INDPTR)[lo : hi + 1]))
        nnz = sum(int(ptr[-1] - ptr[0]) for _, ptr in pieces)
        # decoded straight into the matrix's arrays: no per-shard copies to concatenate
        indptr, indices, values = np.zeros(stop - start + 1, np.int64), np.empty(nnz, np.int32), np.empty(nnz, np.float32)
        row = offset = 0
        for shard, ptr in pieces:
            a, b = int(ptr[0]), int(ptr[-1])
            if b > a:
                indices[offset : offset + b - a] = self._array(shard, base + fmt.INDICES)[a:b]
                fmt.decode_values(self._array(shard, base + fmt.VALUES)[a:b], self._value_dtype(shard, name),
                                  out=values[offset : offset + b - a])
            indptr[row + 1 : row + len(ptr)] = ptr[1:] - a + offset
            row, offset = row + len(ptr) - 1, offset + b - a
        return sp.csr_matrix((values, indices, indptr), shape=(stop - start, d_sae))

    # -- plumbing ----------------------------------------------------------------------------

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else stop
        if not (is_whole(start) and is_whole(stop) and 0 <= start <= stop <= self.n_tokens):
            raise TokenRangeError(
                f"token range start={start!r}, stop={stop!r} is not a range of the store's {self.n_tokens:,} tokens: "
                f"give whole numbers with 0 <= start <= stop <= {self.n_tokens} (stop=None: to the end).")
        return int(start), int(stop)

    def _pieces(self, start: int, stop: int):
        """(shard, local start, local stop) for every shard overlapping [start, stop)."""
        for shard in self.shards:
            lo, hi = max(start, shard.token_start), min(stop, shard.token_stop)
            if lo < hi:
                yield shard, lo - shard.token_start, hi - shard.token_start

    def _concat(self, name: str, start: int, stop: int | None, dtype) -> np.ndarray:
        start, stop = self._range(start, stop)
        parts = [self._array(s, name)[lo:hi] for s, lo, hi in self._pieces(start, stop)]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def _array(self, shard: ShardInfo, name: str) -> CheckedArray:
        """A shard's array; its first read is checked against the crc32 in the shard's marker."""
        key = f"{fmt.shard_path(shard.shard_id)}/{name}"
        if key not in self._arrays:
            recorded = self._marker(shard.shard_id).get("checksums", {}).get(name)
            self._arrays[key] = open_array(self._root, key, self.location, None if recorded is None else [recorded])
        return self._arrays[key]

    def _marker(self, shard_id: int) -> dict:
        """A listed shard's completion marker, which holds the checksums its arrays are checked against."""
        markers = self.__dict__.setdefault("_markers", {})
        if shard_id not in markers:  # only a marker that was read is kept: damage raises the same error each time
            path = fmt.shard_path(shard_id)
            try:
                marker = read_marker(self._root[path])
            except (KeyError, *METADATA_ERRORS) as e:
                raise corrupt(self.location, path, f"the shard cannot be opened ({e})") from None
            if marker is None:
                raise corrupt(self.location, f"{path}/{fmt.MARKER_GROUP}",
                              "the store lists this shard as complete but its completion marker is missing or "
                              "unreadable")
            problem = shard_marker_problem(marker, self.saes)
            if problem is not None:  # its checksums, say, which every read of the shard's arrays takes
                raise corrupt(self.location, f"{path}/{fmt.MARKER_GROUP}", problem)
            markers[shard_id] = marker
        return markers[shard_id]

    def _value_dtype(self, shard: ShardInfo, name: str) -> str:
        """The value dtype a shard's CSR group recorded when it was written, which its values are
        decoded by; one that disagrees with the run's record, or with the values array's own dtype,
        is damage (decoding by the wrong one would return wrong numbers)."""
        dtypes = self.__dict__.setdefault("_value_dtypes", {})
        if (shard.shard_id, name) not in dtypes:
            path = f"{fmt.shard_path(shard.shard_id)}/{fmt.SAES_GROUP}/{name}"
            try:
                attrs = open_node(self._root, path, self.location).attrs.asdict().get(fmt.ATTRS_KEY, {})
            except KeyError:  # the shard, or the run record that lists the SAE, was changed
                raise StoreCorruptError(
                    f"{self.location}: the store's run record ({ROOT_METADATA}) lists an SAE named {name}, but the "
                    f"complete shard {fmt.shard_path(shard.shard_id)} holds none. Reads are refused. Run "
                    f"`latentstore verify {shlex.quote(self.location)}`: it names the damaged one and how to repair it."
                ) from None
            run_dtype = self.run["value_dtype"]
            recorded = attrs.get("value_dtype", run_dtype)  # a group that records none: the run's
            if recorded != run_dtype:
                raise StoreCorruptError(
                    f"{self.location}: {path} records its values as {recorded}, but the store's run record "
                    f"({ROOT_METADATA}, run.value_dtype) says {run_dtype}; one of them was changed after it "
                    f"was written. Reads are refused rather than decode the values wrongly. Run `latentstore verify "
                    f"{self.location}`: it names the damaged one and how to repair it."
                )
            stored = self._array(shard, f"{fmt.SAES_GROUP}/{name}/{fmt.VALUES}").array.dtype
            if recorded not in fmt.VALUE_DTYPES or stored != fmt.storage_dtype(recorded):
                raise corrupt(self.location, f"{path}/{fmt.VALUES}", f"its dtype is {stored}, but its group records "
                                                                      f"the values as {recorded}")
            dtypes[shard.shard_id, name] = recorded
        return dtypes[shard.shard_id, name]
