"""Writing a store: the root metadata (driver) and immutable shard parts (workers).

Every shard is written by one worker into its own group; its completion marker
is written last, so a shard without a marker is never read. The root says
``status: writing`` until the driver finalizes it. Writes are idempotent: a
shard that is written again replaces its group wholesale.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import zarr

from store import codecs, format as fmt
from store import stats as stats_mod
from store.elements import (complete_markers, has_shard_markers, now, part_marker, read_root_attrs,
                            stamped_as_store, write_array, write_part)
from store.errors import StoreConflictError, StoreCorruptError
from store.location import (RootHandle, check_writable, has_content, normalize, open_root, open_zarr_store,
                            subgroup_names)
from store.schema import shard_marker_problem

log = logging.getLogger(__name__)

# What may differ when a run is resumed over edited data (a bad row fixed, rows appended): each
# complete shard is then kept only if the rows it covers are unchanged (see StoreWriter.begin).
DATA_KEYS = ("dataset.fingerprint", "dataset.n_rows")


@dataclass(frozen=True)
class SparseActivations:
    """One SAE's activations over a shard's tokens, as CSR."""

    indptr: np.ndarray  # int64 [n_tokens + 1]
    indices: np.ndarray  # uint16 or uint32 [nnz], ascending within a token
    values: np.ndarray  # storage dtype of the value dtype [nnz]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])


@dataclass(frozen=True)
class ShardData:
    """Everything one shard holds, ready to write."""

    shard_id: int
    row_start: int
    row_stop: int
    token_limit: int | None
    token_ids: np.ndarray  # int32 [n_tokens]
    rows: np.ndarray  # int64 [n_tokens], dataset row of each token
    positions: np.ndarray  # int32 [n_tokens], position in the row's tokenization (-1: added BOS)
    saes: dict[str, SparseActivations] = field(default_factory=dict)
    stats: dict[str, stats_mod.FeatureStats] = field(default_factory=dict)  # per SAE; computed when missing
    rows_digest: str | None = None  # of the dataset rows read (pipeline.dataset.rows_digest)
    window_start: int = 0  # the rows' windows that earlier shards hold
    n_windows: int | None = None  # the windows this shard holds (None: not planned by windows)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def latentstore_version() -> str:
    try:
        return version("latentstore")
    except PackageNotFoundError:
        return "unknown"


def canonical(obj) -> dict:
    """A JSON round trip, so comparisons see exactly what the store will hold."""
    return json.loads(json.dumps(obj, sort_keys=True))


def diff_runs(stored: dict, wanted: dict, prefix: str = "", only_shared: bool = False) -> list[str]:
    """Human-readable differences between two run descriptions."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        name = f"{prefix}{key}"
        if key not in stored or key not in wanted:
            if not only_shared:
                out.append(f"{name}: store has {stored.get(key)!r}, this run has {wanted.get(key)!r}")
            continue
        a, b = stored[key], wanted[key]
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_runs(a, b, f"{name}.", only_shared))
        elif a != b:
            out.append(f"{name}: store has {_short(a)}, this run has {_short(b)}")
    return out


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_conflict(location: str, run: dict, overwrite: bool, only_shared: bool = False,
                   ignore: tuple[str, ...] = ()) -> dict | None:
    """Refuse to resume a store that holds another run. Returns the existing root attributes, or None
    where there are none to compare: no store yet, or a store whose root's metadata is missing or
    unreadable but whose shards remain (``StoreWriter.begin`` rebuilds that root, keeping the shards)."""
    location = normalize(location)
    check_writable(location)
    try:
        attrs, damage = read_root_attrs(location), None
    except StoreCorruptError as e:
        attrs, damage = None, e  # nothing to compare with: begin rebuilds the root from the shards (or --overwrite replaces all)
    if attrs is None and has_content(location) and not has_shard_markers(location):
        if damage is not None and stamped_as_store(location):
            return None  # a store of ours with no shard written: nothing to keep, begin starts it afresh
        if damage is not None:
            raise StoreConflictError(
                f"--store {location}: its root's metadata (zarr.json) is damaged and it holds no complete "
                "shard, so there is nothing to rebuild the store from, nor any sign that latentstore wrote it: "
                "latentstore will not write over it (not even with --overwrite). If it is a store of yours, "
                "delete it and rerun; else choose a new path."
            )
        raise StoreConflictError(
            f"--store {location} exists and is not a latentstore store. latentstore will not write over "
            "it (not even with --overwrite): choose a new path."
        )
    if attrs is None or overwrite:
        return attrs
    fmt.check_writes(attrs, location)
    problems = diff_runs(attrs.get("run", {}), canonical(run), only_shared=only_shared)
    problems = [p for p in problems if p.split(":", 1)[0] not in ignore]
    if problems:
        raise StoreConflictError(
            f"--store {location} already holds a different run:\n  "
            + "\n  ".join(problems[:20])
            + "\nUse another --store path, or pass --overwrite to replace it."
        )
    return attrs


def root_needs_rebuild(location: str) -> bool:
    """Whether the store's root (or its shards group) has metadata that is missing or unreadable
    while complete shards remain: ``StoreWriter.begin`` then rebuilds it and keeps those shards."""
    try:
        if read_root_attrs(location) is not None:
            open_root(location, mode="r")[fmt.SHARDS_GROUP]
            return False
    except (StoreCorruptError, KeyError, ValueError, UnicodeDecodeError):
        pass
    return has_shard_markers(location)


def _write_group_metadata(location: str, path: str, attributes: dict) -> None:
    """A group's zarr.json alone, written over whatever is there; unlike zarr's overwrite, the nodes
    below it are kept."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata
    from zarr.core.sync import sync

    store = open_zarr_store(location)  # not through zarr.open_group: the root may be unreadable
    for key, buffer in GroupMetadata(attributes=attributes).to_buffer_dict(default_buffer_prototype()).items():
        sync(store.set(f"{path}/{key}" if path else key, buffer))


class StoreWriter(RootHandle):
    """Writes one store, through one handle on its root, opened at first use. The driver creates the
    store with it; each worker opens its own instance."""

    # -- driver side -------------------------------------------------------------------------

    def begin(self, run: dict, plan: dict, overwrite: bool, keep_shard=None) -> dict[int, dict]:
        """Create the store (or reopen it to resume) and return its complete shards' markers.

        ``keep_shard(marker) -> bool``, when given, allows resuming over edited data (``DATA_KEYS``
        differ): complete shards it rejects (their rows changed) are deleted, so they are redone."""
        existing = check_conflict(self.location, run, overwrite, ignore=DATA_KEYS if keep_shard else ())
        if not overwrite and root_needs_rebuild(self.location):
            return self._rebuild_root(run, plan, keep_shard)
        if existing is None or overwrite:
            attrs = {
                **fmt.encoding(fmt.STORE_ENCODING),
                "latentstore_version": latentstore_version(),
                "status": fmt.STATUS_WRITING,
                "created_at": now(),
                "run": canonical(run),
                "plan": canonical(plan),
            }
            # the root's metadata is written once, with its attributes: a reader never finds a root that
            # is not yet a store (readers take a missing shards group for no shards yet)
            self._root = zarr.open_group(open_root(self.location, mode="w").store, mode="w",
                                         attributes={fmt.ATTRS_KEY: attrs})
            self._root.create_group(fmt.SHARDS_GROUP)
            return {}
        if existing.get("status") == fmt.STATUS_COMPLETE:
            self._set_root(status=fmt.STATUS_WRITING)  # it is about to change again
        done = self.completed_shards()
        changed = diff_runs(existing.get("run", {}).get("dataset", {}), canonical(run).get("dataset", {}), "dataset.")
        if keep_shard is not None and changed:
            kept = {shard_id: m for shard_id, m in done.items() if keep_shard(m)}
            for shard_id in sorted(done.keys() - kept.keys()):
                self.delete_shard(shard_id)
            # Recorded only after the deletions: a crash before this point repeats the check on rerun.
            self._set_root(run=run, plan=plan)
            log.warning("%s: the dataset changed since this store was written (%s). Kept %d complete shards "
                        "whose rows are unchanged; %d will be redone.", self.location, "; ".join(changed),
                        len(kept), len(done) - len(kept))
            done = kept
        return done

    def _rebuild_root(self, run: dict, plan: dict, keep_shard=None) -> dict[int, dict]:
        """The root's (or the shards group's) metadata is missing or unreadable, the shards are not:
        write the root anew for this run, with nothing below it deleted, and keep each complete shard
        that this run would write the same (its SAEs, value dtype and, with ``keep_shard``, its rows);
        the others are deleted, to be redone. The shard list and counts come at finalize, as ever."""
        run = canonical(run)
        attrs = {**fmt.encoding(fmt.STORE_ENCODING), "latentstore_version": latentstore_version(),
                 "status": fmt.STATUS_WRITING, "created_at": now(), "run": run, "plan": canonical(plan)}
        _write_group_metadata(self.location, "", {fmt.ATTRS_KEY: attrs})
        _write_group_metadata(self.location, fmt.SHARDS_GROUP, {})
        self._root = None  # written past the handle: opened anew
        names = {fmt.sae_name(sae) for sae in run["saes"]}
        shards = self.root[fmt.SHARDS_GROUP]
        done, kept = self.completed_shards(), {}
        for shard_id, marker in done.items():
            try:
                csr = shards[f"{fmt.shard_name(shard_id)}/{fmt.SAES_GROUP}"]
                dtypes = {csr[name].attrs.asdict().get(fmt.ATTRS_KEY, {}).get("value_dtype") for name in names}
            except (KeyError, ValueError, UnicodeDecodeError):  # missing or unreadable: redone
                continue
            if set(marker["nnz"]) == names and dtypes == {run["value_dtype"]} and \
                    (keep_shard is None or keep_shard(marker)):
                kept[shard_id] = marker
        for shard_id in sorted(done.keys() - kept.keys()):
            self.delete_shard(shard_id)
        log.warning("%s: the store's root metadata was missing or unreadable; rebuilt it for this run. Kept %d "
                    "complete shards that this run would write the same; %d will be redone.", self.location,
                    len(kept), len(done) - len(kept))
        return kept

    def write_vocab(self, strings: list[str]) -> None:
        """Each token id's text, so queries and dashboards need no tokenizer."""
        encoded = [t.encode("utf-8", errors="replace") for t in strings]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        if fmt.VOCAB_GROUP in self.root:
            if self._vocab_is(offsets, data):
                return  # a rerun's: kept as it is, so that readers of a complete store never find it missing
            del self.root[fmt.VOCAB_GROUP]
        group = self.root.create_group(fmt.VOCAB_GROUP, attributes={fmt.ATTRS_KEY: fmt.encoding(fmt.VOCAB_ENCODING)})
        write_array(group, fmt.VOCAB_OFFSETS, offsets, codecs.TOKEN_LEVEL)
        write_array(group, fmt.VOCAB_UTF8, data if len(data) else np.zeros(0, np.uint8), codecs.VALUES)

    def _vocab_is(self, offsets: np.ndarray, data: np.ndarray) -> bool:
        """Whether the store's vocabulary holds these arrays already (not where it is damaged)."""
        try:
            group = self.root[fmt.VOCAB_GROUP]
            return (np.array_equal(group[fmt.VOCAB_OFFSETS][:], offsets)
                    and np.array_equal(group[fmt.VOCAB_UTF8][:], data))
        except Exception:  # a missing or undecodable array: written anew
            return False

    def completed_shards(self) -> dict[int, dict]:
        """The complete shards' markers, by shard id. A marker that is not as the format says (a hand
        edit), or that counts no nonzeros for an SAE of the run, leaves its shard to be redone, as the
        rerun rewrites every shard not returned here."""
        done = {}
        for name, marker in complete_markers(self.root[fmt.SHARDS_GROUP]).items():
            problem = self._marker_problem(marker)
            if problem is None:
                done[int(name)] = marker
            else:
                log.warning("%s: %s/%s/%s is damaged: %s. The shard will be redone.", self.location,
                            fmt.SHARDS_GROUP, name, fmt.MARKER_GROUP, problem)
        return done

    def shard_ids(self) -> set[int]:
        """Every shard with a group in the store, complete or not."""
        return {int(name) for name in subgroup_names(self.root[fmt.SHARDS_GROUP])}

    def delete_shard(self, shard_id: int) -> None:
        shards = self.root[fmt.SHARDS_GROUP]
        name = fmt.shard_name(shard_id)
        if name in shards:
            del shards[name]

    def complete(self, done: dict[int, dict], d_sae: dict[str, int], value_dtype: str) -> dict:
        """Finish the store whose shards are ``done`` (markers by shard id): delete every other shard
        group (past a cut, or an attempt that died there), merge the shards' statistics, and mark the
        store complete. Returns its counts."""
        for shard_id in self.shard_ids() - done.keys():
            self.delete_shard(shard_id)
        markers = [done[i] for i in sorted(done)]
        counts = {"n_tokens": sum(m["n_tokens"] for m in markers), "n_shards": len(markers),
                  "nnz": {name: sum(m["nnz"][name] for m in markers) for name in d_sae}}
        for name, width in d_sae.items():
            merged = stats_mod.merge_shards(self.location, markers, name, width, value_dtype)
            stats_mod.write_merged(self.location, name, merged, counts["n_tokens"])
        self.finalize([shard_entry(m) for m in markers], counts)
        return counts

    def finalize(self, shards: list[dict], counts: dict) -> None:
        """Mark the store complete, listing its shards in order. Written last."""
        self._set_root(status=fmt.STATUS_COMPLETE, completed_at=now(), shards=shards, counts=counts)

    def _set_root(self, **changes) -> None:
        attrs = dict(self.root.attrs[fmt.ATTRS_KEY])
        attrs.update(canonical(changes))
        self.root.attrs.update({fmt.ATTRS_KEY: attrs})

    # -- worker side -------------------------------------------------------------------------

    def write_shard(self, shard: ShardData, value_dtype: str, d_sae: dict[str, int],
                    top_k: int = stats_mod.DEFAULT_TOP_K, pool: Executor | None = None) -> dict:
        """Write a shard's arrays and per-feature statistics, then its completion marker. Arrays are
        compressed and written on ``pool`` when given (Blosc and zstd release the GIL)."""
        groups: dict[str, dict] = {fmt.SAES_GROUP: {}}
        arrays = {fmt.TOKEN_IDS: (shard.token_ids.astype("<i4"), codecs.TOKEN_LEVEL),
                  fmt.ROWS: (shard.rows.astype("<i8"), codecs.TOKEN_LEVEL),
                  fmt.POSITIONS: (shard.positions.astype("<i4"), codecs.TOKEN_LEVEL)}
        for name, acts in shard.saes.items():
            base = f"{fmt.SAES_GROUP}/{name}"
            groups[base] = {**fmt.encoding(fmt.CSR_ENCODING), "value_dtype": value_dtype}
            arrays |= {f"{base}/{fmt.INDPTR}": (acts.indptr.astype("<i8"), codecs.TOKEN_LEVEL),
                       f"{base}/{fmt.INDICES}": (acts.indices, codecs.FEATURE_INDICES),
                       f"{base}/{fmt.VALUES}": (acts.values, codecs.VALUES)}
            feature_stats = shard.stats.get(name)
            if feature_stats is None:
                accumulator = stats_mod.Accumulator(d_sae[name], value_dtype, top_k)
                accumulator.add(np.diff(acts.indptr), acts.indices, acts.values)
                feature_stats = accumulator.result()
            groups[f"{base}/{fmt.STATS_GROUP}"], stat_arrays = stats_mod.element(feature_stats, value_dtype)
            arrays |= {f"{base}/{fmt.STATS_GROUP}/{name}": (data, codecs.VALUES) for name, data in stat_arrays.items()}
        where = {"shard_id": shard.shard_id, "row_start": shard.row_start, "row_stop": shard.row_stop}
        marker = {
            **where,
            "token_limit": shard.token_limit,
            "window_start": shard.window_start,
            "n_windows": shard.n_windows,
            "n_tokens": shard.n_tokens,
            "nnz": {name: acts.nnz for name, acts in shard.saes.items()},
        }
        if shard.rows_digest is not None:
            marker["rows_digest"] = shard.rows_digest
        return write_part(self.root[fmt.SHARDS_GROUP], fmt.shard_name(shard.shard_id),
                          {**fmt.encoding(fmt.SHARD_ENCODING), **where}, arrays, marker, groups=groups, pool=pool)

    def shard_marker(self, shard_id: int) -> dict | None:
        """A shard's completion marker, or None while it is absent, incomplete or damaged (to be redone)."""
        marker = part_marker(self.root[fmt.SHARDS_GROUP], fmt.shard_name(shard_id))
        return marker if marker is not None and self._marker_problem(marker) is None else None

    def _marker_problem(self, marker: dict) -> str | None:
        """What is wrong with a shard's marker for this store's run (``shard_marker_problem``)."""
        saes = [fmt.sae_name(sae) for sae in self.root.attrs[fmt.ATTRS_KEY]["run"]["saes"]]
        return shard_marker_problem(marker, saes)


def shard_entry(marker: dict) -> dict:
    """A shard's entry in the complete root's shard list, from its completion marker."""
    keys = ("shard_id", "row_start", "row_stop", "window_start", "n_windows", "token_limit", "n_tokens", "nnz",
            "rows_digest")  # the rows' digest: an index built from other rows is stale
    return {k: marker[k] for k in keys if k in marker}
