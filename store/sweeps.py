"""Ablation sweep results in a store, under ``sweeps/<name>/`` (spec: docs/SWEEPS.md).

The driver creates a sweep's group with its spec and the features it covers; each worker
writes whole parts (a block of prompts by a block of features) into groups of their own,
each completion marker last, so a part without a marker is never read and a rerun redoes
only the parts that lack one. The sweep's ``status`` becomes ``complete`` once every part is.

A sweep can live in an extraction store (its prompts are rows of it) or in a zarr group
holding only sweeps (prompts from a file). Needs numpy, zarr and pandas only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import zarr

from store import codecs, format as fmt
from store.errors import ConfigError, StoreConflictError, StoreIncompleteError, StoreNotFoundError, did_you_mean
from store.location import RootHandle, normalize, open_root, subgroup_names
from store.checked import corrupt, read_whole
from store.elements import complete_markers, now, part_marker, write_array, write_part
from store.schema import sweep_part_marker_problem
from store.writer import canonical, diff_runs

log = logging.getLogger(__name__)

SWEEPS_GROUP = "sweeps"
PARTS_GROUP = "parts"
FEATURES = "features"
PROMPT_ROWS = "prompt_rows"

SWEEPS_ENCODING = "latentstore.sweeps"
SWEEP_ENCODING = "latentstore.sweep"
PART_ENCODING = "latentstore.sweep_part"
PARTS_ENCODING = "latentstore.sweep_parts"
COLUMN_ENCODING = "latentstore.sweep_column"

METHODS = ("exact", "attribution")  # the codes of the ``method`` column
COLUMNS = {"prompt": "<i8", "feature": "<i8", "delta": "<f4", "method": "|u1", "attribution": "<f4"}
EVERY_PART = ("prompt", "feature", "delta", "method")  # the columns every part holds; attribution, some sweeps


@dataclass(frozen=True)
class SweepPart:
    """The results of one part: one line per (prompt, feature) it covers."""

    part_id: int
    prompt: np.ndarray  # int64: the sweep's prompt index
    feature: np.ndarray  # int64
    delta: np.ndarray  # float32
    method: np.ndarray  # uint8: index into METHODS
    attribution: np.ndarray | None = None  # float32; sweeps with method "attribution" only

    @classmethod
    def from_frame(cls, part_id: int, frame: pd.DataFrame) -> SweepPart:
        """From ``ablation_sweep``'s DataFrame (``prompt`` already the sweep's prompt index)."""
        return cls(
            part_id=part_id,
            prompt=frame["prompt"].to_numpy(np.int64),
            feature=frame["feature"].to_numpy(np.int64),
            delta=frame["delta"].to_numpy(np.float32),
            method=frame["method"].map(METHODS.index).to_numpy(np.uint8),
            attribution=frame["attribution"].to_numpy(np.float32) if "attribution" in frame else None,
        )


def sweep_path(name: str) -> str:
    return f"{SWEEPS_GROUP}/{name}"


def part_name(part_id: int) -> str:
    return f"{part_id:06d}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"sweep name {name!r}: use letters, digits, '-', '_' and '.', e.g. 'l8-last-pos'.")
    return name


class SweepWriter(RootHandle):
    """Writes one named sweep, through one handle on the store's root (made if there is none yet).
    The driver calls ``begin`` and ``finalize``; workers ``write_part``."""

    def __init__(self, location: str, name: str):
        super().__init__(location)
        self.name = check_name(name)

    def _group(self) -> zarr.Group | None:
        path = sweep_path(self.name)
        return self.root[path] if path in self.root else None

    def existing_spec(self) -> dict | None:
        """The spec of a sweep of this name already in the store, or None. A sweep whose ``begin``
        was cut short has no spec yet (it is written last): it counts as absent and is made anew."""
        group = self._group()
        return None if group is None else _sweep_attrs(group, self.location, self.name).get("spec")

    def begin(self, spec: dict, features: np.ndarray, prompt_rows: np.ndarray | None, n_parts: int,
              overwrite: bool) -> dict[int, dict]:
        """Create the sweep, or reopen a sweep with the same spec to resume it. Returns its complete parts."""
        store_attrs = self.root.attrs.asdict().get(fmt.ATTRS_KEY)
        if store_attrs is not None:  # the sweep goes into an extraction store (else a bare group of sweeps)
            fmt.check_writes(store_attrs, self.location)
        existing = self.existing_spec()
        if existing is not None and not overwrite:
            problems = diff_runs(existing, canonical(spec))
            if problems:
                raise StoreConflictError(
                    f"store {self.location} already holds a different sweep {self.name!r}:\n  "
                    + "\n  ".join(problems[:20])
                    + "\nChoose another --name, or pass --overwrite to replace it."
                )
            return self.completed_parts()
        if SWEEPS_GROUP not in self.root:
            self.root.create_group(SWEEPS_GROUP, attributes={fmt.ATTRS_KEY: fmt.encoding(SWEEPS_ENCODING)})
        sweeps = self.root[SWEEPS_GROUP]
        if self.name in sweeps:
            del sweeps[self.name]
        attrs = {**fmt.encoding(SWEEP_ENCODING), "status": fmt.STATUS_WRITING, "created_at": now(), "n_parts": n_parts}
        group = sweeps.create_group(self.name, attributes={fmt.ATTRS_KEY: attrs})
        for name, data in ((FEATURES, features), (PROMPT_ROWS, prompt_rows)):
            if data is not None:
                write_array(group, name, *_column(name, np.asarray(data, dtype=np.int64)),
                            attributes=fmt.encoding(COLUMN_ENCODING))
        group.create_group(PARTS_GROUP, attributes={fmt.ATTRS_KEY: fmt.encoding(PARTS_ENCODING)})
        # The spec last: a driver killed before this point leaves a sweep that a rerun makes anew,
        # never one that it would resume without its features.
        group.attrs.update({fmt.ATTRS_KEY: {**attrs, "spec": canonical(spec)}})
        return {}

    def features(self) -> np.ndarray:
        return self._group()[FEATURES][:]

    def completed_parts(self) -> dict[int, dict]:
        """The complete parts' markers, by part id. A marker that is not as the format says (a hand
        edit) leaves its part to be redone, as the rerun computes every part not returned here."""
        group = self._group()
        if group is None or PARTS_GROUP not in group:
            return {}
        done = {}
        for name, marker in complete_markers(group[PARTS_GROUP]).items():
            problem = sweep_part_marker_problem(marker, EVERY_PART)
            if problem is None:
                done[int(name)] = marker
            else:
                log.warning("%s: %s/%s/%s/%s is damaged: %s. The part will be redone.", self.location,
                            sweep_path(self.name), PARTS_GROUP, name, fmt.MARKER_GROUP, problem)
        return done

    def completed_part(self, part_id: int) -> dict | None:
        """The part's completion marker, or None while it is absent, incomplete or damaged (to be redone)."""
        marker = part_marker(self.root[f"{sweep_path(self.name)}/{PARTS_GROUP}"], part_name(part_id))
        return marker if marker is not None and sweep_part_marker_problem(marker, EVERY_PART) is None else None

    def write_part(self, part: SweepPart) -> dict:
        """Write a part's columns, then its completion marker. Writing a part again replaces it."""
        parts = self.root[f"{sweep_path(self.name)}/{PARTS_GROUP}"]
        columns = {"prompt": part.prompt, "feature": part.feature, "delta": part.delta, "method": part.method}
        if part.attribution is not None:
            columns["attribution"] = part.attribution
        return write_part(parts, part_name(part.part_id), {**fmt.encoding(PART_ENCODING), "part_id": part.part_id},
                          {key: _column(key, values) for key, values in columns.items()},
                          {"part_id": part.part_id, "n_lines": len(part.prompt)},
                          array_attributes=fmt.encoding(COLUMN_ENCODING))

    def finalize(self, counts: dict) -> None:
        """Mark the sweep complete. Written last."""
        group = self.root[sweep_path(self.name)]
        attrs = dict(group.attrs[fmt.ATTRS_KEY])
        attrs.update(canonical({"status": fmt.STATUS_COMPLETE, "completed_at": now(), "counts": counts}))
        group.attrs.update({fmt.ATTRS_KEY: attrs})


def list_sweeps(location: str) -> list[str]:
    """Names of the sweeps in a store."""
    try:
        root = open_root(normalize(location), mode="r")
    except FileNotFoundError:
        raise StoreNotFoundError(f"no store at {location}.") from None
    return subgroup_names(root[SWEEPS_GROUP]) if SWEEPS_GROUP in root else []


def read_sweep(location: str, name: str, allow_incomplete: bool = False) -> pd.DataFrame:
    """A sweep's results as ``ablation_sweep`` returns them: ``prompt``, (``row``,) ``feature``,
    ``delta``, ``method`` (and ``attribution``), sorted by prompt and feature. The sweep's
    spec is in ``frame.attrs["sweep"]``."""
    location = normalize(location)
    group = _sweep_group(location, check_name(name))  # a path ("../shards") would read another group
    if group is None:
        names = list_sweeps(location)
        raise StoreNotFoundError(f"store {location} has no sweep {name!r}; it has: {did_you_mean(name, names) or 'none'}.")
    attrs = _sweep_attrs(group, location, name)
    parts = group[PARTS_GROUP] if PARTS_GROUP in group else None  # absent until ``begin`` is done
    complete = complete_markers(parts) if parts is not None else {}
    if attrs["status"] != fmt.STATUS_COMPLETE and not allow_incomplete:
        raise StoreIncompleteError(
            f"sweep {name!r} in {location} is not complete ({len(complete)} of {attrs['n_parts']} parts "
            "written). Run the same `latentstore sweep` command again to finish it, "
            "or pass allow_incomplete=True to read the parts written so far."
        )
    root, base = open_root(location, mode="r"), f"{sweep_path(name)}/{PARTS_GROUP}"
    pieces = []
    for part, marker in complete.items():
        problem = sweep_part_marker_problem(marker, EVERY_PART)
        if problem is not None:
            raise corrupt(location, f"{base}/{part}/{fmt.MARKER_GROUP}", problem)
        sums = marker["checksums"]  # one per array the part holds (docs/FORMAT.md)
        pieces.append(pd.DataFrame({key: read_whole(root, f"{base}/{part}/{key}", location, sums[key])
                                    for key in COLUMNS if key in sums}))
    frame = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(
        {key: np.zeros(0, dtype) for key, dtype in COLUMNS.items() if key != "attribution"})
    frame["method"] = pd.Categorical.from_codes(frame["method"].astype(np.int64), categories=list(METHODS)).astype(str)
    if PROMPT_ROWS in group:
        frame.insert(1, "row", group[PROMPT_ROWS][:][frame["prompt"].to_numpy()])
    frame = frame.sort_values(["prompt", "feature"], ignore_index=True)
    frame.attrs["sweep"] = attrs.get("spec")
    return frame


def _sweep_group(location: str, name: str) -> zarr.Group | None:
    try:
        root = open_root(location, mode="r")
    except FileNotFoundError:
        return None
    path = sweep_path(name)
    return root[path] if path in root else None


def _sweep_attrs(group: zarr.Group, location: str, name: str) -> dict:
    attrs = group.attrs.asdict().get(fmt.ATTRS_KEY, {})
    fmt.check_version(attrs, SWEEP_ENCODING, f"sweep {name!r} in {location}")
    return attrs


def _column(name: str, data: np.ndarray) -> tuple[np.ndarray, codecs.Encoding]:
    """A column in its dtype, with its encoding."""
    data = np.ascontiguousarray(data, dtype=COLUMNS.get(name, data.dtype))
    return data, codecs.VALUES if data.dtype.kind == "f" else codecs.TOKEN_LEVEL
