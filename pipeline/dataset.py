"""Datasets in, token windows out: opening, sharding by rows, tokenizing and windowing.

The driver only opens the dataset (to count rows and read its fingerprint) and
splits it into deterministic row ranges; tokenization happens in the workers,
shard by shard. A row longer than the context is split into consecutive
windows, never dropped. With BOS on, every window starts with a BOS token that
is not part of the row (its provenance position is -1).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from store.errors import ConfigError, DataError
from store.format import BOS_POSITION

# Local file suffix -> the `datasets` builder that reads it. Compressed variants
# (.gz, .zst, ...) of these are read through fsspec's compression inference.
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4"}

# Tokens per shard, chosen by measurement (docs/OPERATIONS.md): the host side keeps pace at any size
# past a few batches; smaller shards spread a small run over more workers and bound a worker's memory,
# larger ones shrink the per-shard statistics (top-K of every feature) beside the activations.
DEFAULT_SHARD_TOKENS = 1 << 16
DEFAULT_CONTEXT_SIZE = 128  # tokens per window
DEFAULT_SPLIT = "train"  # also what datasets calls a local file's one split


@dataclass(frozen=True)
class DatasetSpec:
    """Where the rows come from, which column holds them, and how they are cut into windows."""

    name: str  # a hub dataset name, a local file, or a folder written by Dataset.save_to_disk
    split: str = DEFAULT_SPLIT  # hub datasets and save_to_disk DatasetDicts; a local file is one split
    subset: str | None = None  # the hub dataset's configuration, where it has several
    text_column: str = "text"
    tokens_column: str | None = None  # pre-tokenized rows, used exactly as given (no BOS added)
    context_size: int = DEFAULT_CONTEXT_SIZE  # tokens per window; longer rows become several windows
    max_tokens: int | None = None  # keep exactly this many tokens, in row order; None: the whole dataset
    prepend_bos: bool | None = None  # start each window with BOS; None: as the SAEs were trained

    @property
    def is_local(self) -> bool:
        return Path(self.name).exists()

    @property
    def column(self) -> str:
        return self.tokens_column or self.text_column


@dataclass(frozen=True)
class Shard:
    """A deterministic run of consecutive windows, written by one worker as one store part: the
    windows of rows ``[row_start, row_stop)`` from the ``window_start``-th on, ``n_windows`` of them.
    A long row spans several shards (each of them reads it whole, but encodes only its windows)."""

    shard_id: int
    row_start: int
    row_stop: int
    window_start: int = 0  # windows of these rows that an earlier shard holds
    n_windows: int | None = None  # None: every window from window_start on
    token_limit: int | None = None  # the tokens left before --max-tokens, where the cut falls in this shard
    n_tokens: int | None = None  # what the plan counted

    def is_written_by(self, marker: dict) -> bool:
        """Whether a completion marker is this shard's: the same windows of the same rows, cut alike."""
        plan = ("row_start", "row_stop", "window_start", "n_windows", "token_limit", "n_tokens")
        return all(marker.get(key) == getattr(self, key) for key in plan)


def local_builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None


@contextmanager
def _datasets_logging(level: int) -> Iterator[None]:
    import datasets

    before = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(level)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(before)


def open_dataset(spec: DatasetSpec) -> Any:
    """The dataset as a memory-mapped ``datasets.Dataset`` (hub datasets are downloaded once, cached)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec.name)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, IndexError, ValueError) as e:  # datasets fails so on empty or foreign folders
            raise ConfigError(
                f"--dataset {spec.name} is a folder that datasets.load_from_disk cannot read ({_root_cause(e)}); "
                "is it empty? Give a folder written by Dataset.save_to_disk with at least one row, or a data file."
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ConfigError(
                    f"--dataset {spec.name} has splits {', '.join(ds)}; --split {spec.split} is not one of them."
                )
            ds = ds[spec.split]
        elif spec.split != DEFAULT_SPLIT:
            raise ConfigError(f"--dataset {spec.name} holds one dataset, not splits (Dataset.save_to_disk, not "
                              f"DatasetDict's): --split {spec.split} does not apply. Leave --split out.")
        return ds
    if path.is_file():
        if spec.split != DEFAULT_SPLIT:
            raise ConfigError(f"--dataset {spec.name} is a file, which holds one split: --split {spec.split} "
                              "does not apply. Leave --split out.")
        builder = local_builder(path)
        if builder is None:
            raise ConfigError(
                f"--dataset {spec.name}: unknown file type. Use a .jsonl, .json, .parquet, .csv or .txt file "
                "(optionally compressed, e.g. .jsonl.gz), or a folder written by Dataset.save_to_disk."
            )
        try:
            with _datasets_logging(datasets.logging.CRITICAL):  # its errors on a bad file are reported below, once
                return datasets.load_dataset(builder, data_files=str(path), split="train")
        except StopIteration as e:  # how datasets' JSON reader meets a file with no line at all
            raise ConfigError(f"--dataset {spec.name} is empty: there is nothing to extract. "
                              "Give a file with at least one row.") from e
        # OSError: a compressed file that is not what its suffix says (gzip's BadGzipFile, ...)
        except (UnicodeDecodeError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            if "corresponds to no data" in _root_cause(e):  # how datasets says a file has no rows
                raise ConfigError(f"--dataset {spec.name} is empty: there is nothing to extract.") from e
            raise ConfigError(
                f"--dataset {spec.name} could not be read as {builder} ({_root_cause(e)}). "
                "Check that the file is valid UTF-8 text in that format (compressed as its suffix says, if it does)."
            ) from e
    if local_builder(path) is not None or spec.name.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"--dataset {spec.name}: no such file or folder ({path.expanduser().absolute()} does not "
                          "exist). Check the path; a hub dataset is named as on the hub, e.g. NeelNanda/pile-10k.")
    try:
        return datasets.load_dataset(spec.name, spec.subset, split=spec.split)
    except OSError as e:  # huggingface_hub's network and cache errors, a missing repository among them
        raise ConfigError(
            f"--dataset {spec.name!r} is not a local file or folder, and the hub has no such dataset "
            f"(or cannot be reached: {_root_cause(e).splitlines()[0]})."
        ) from e


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def describe_dataset(ds: Any, spec: DatasetSpec) -> dict:
    """What the store records about the dataset: enough to refuse resuming over different data."""
    return {
        "name": os.path.abspath(spec.name) if spec.is_local else spec.name,
        "split": None if Path(spec.name).is_file() else spec.split,
        "subset": spec.subset,
        "column": spec.column,
        "pretokenized": spec.tokens_column is not None,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "n_rows": len(ds),
    }


def check_dataset(ds: Any, spec: DatasetSpec) -> list[str]:
    """Problems with the dataset's shape, all at once."""
    problems = []
    if spec.column not in ds.column_names:
        flag = "--tokens-column" if spec.tokens_column else "--text-column"
        problems.append(
            f"--dataset {spec.name} has no column {spec.column!r}; its columns are: "
            f"{', '.join(ds.column_names)}. Pass {flag} with one of them."
        )
    if len(ds) == 0:
        problems.append(f"--dataset {spec.name} (split {spec.split}) is empty: there is nothing to extract.")
    elif spec.column in ds.column_names:
        if spec.tokens_column and _is_text(ds.features[spec.column]):
            problems.append(
                f"--tokens-column {spec.column!r} of --dataset {spec.name} holds text (strings), not lists of "
                f"token ids. Pass --text-column {spec.column} instead to tokenize it, or a column of token-id lists."
            )
            return problems
        found = _check_utf8(ds, spec)
        problems.extend(found or _check_not_all_empty(ds, spec))
    return problems


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_not_all_empty(ds: Any, spec: DatasetSpec) -> list[str]:
    """A dataset whose every row is empty (empty text, no tokens, or null) would make a store of no
    tokens. One pass over the column's lengths in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = getattr(getattr(ds, "data", None), "table", None)
    if table is None or getattr(ds, "_indices", None) is not None:
        return []
    column = table.column(spec.column)
    try:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            lengths = pc.utf8_length(column)
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            lengths = pc.list_value_length(column)
        else:
            return []
        longest = pc.max(lengths).as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return []
    if longest:
        return []
    what = "has no tokens" if spec.tokens_column else "is empty text"
    return [f"--dataset {spec.name}: every row of column {spec.column!r} {what} ({len(ds)} rows): there is "
            f"nothing to extract. Check that {'--tokens-column' if spec.tokens_column else '--text-column'} "
            "names the column that holds the data."]


def _check_utf8(ds: Any, spec: DatasetSpec) -> list[str]:
    """Text that is not UTF-8: Arrow's JSON reader lets it in, and it fails only when a worker reads
    the row. One pass over the column's bytes here; on failure, find the first bad row to name it."""
    import pyarrow as pa

    table = getattr(getattr(ds, "data", None), "table", None)
    if table is None or getattr(ds, "_indices", None) is not None:
        return []
    column = table.column(spec.column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return []
    offset = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i in range(len(chunk)):
                try:
                    chunk[i].as_py()
                except UnicodeDecodeError as e:
                    return [f"--dataset {spec.name}: row {offset + i} of column {spec.column!r} is not valid UTF-8 "
                            f"({e.reason} at byte {e.start}). Re-encode the file as UTF-8 (for example "
                            f"`iconv -f latin1 -t utf-8`), or fix that row."]
        offset += len(chunk)
    return []


def rows_digest(rows: Sequence[Any]) -> str:
    """A digest of a shard's rows as read from the dataset, recorded in the shard's marker, so that a
    rerun over edited data (a bad row fixed) keeps the shards whose rows did not change."""
    digest = hashlib.sha256()
    for row in rows:
        data = json.dumps(row, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        encoded = data.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return f"sha256:{digest.hexdigest()}"


def row_lengths(ds: Any, spec: DatasetSpec, tokenizer: Any, d_vocab: int,
                block: int = 1024) -> Iterator[np.ndarray]:
    """Each row's number of tokens, a block of rows at a time, in row order. Tokenizing checks every
    row as the workers will (a bad row is named now, before any work)."""
    for start in range(0, len(ds), block):
        rows = ds[start : start + block][spec.column]
        tokens = tokenize_rows(rows, range(start, start + len(rows)), tokenizer, spec.tokens_column is not None,
                               d_vocab)
        yield np.array([len(t) for t in tokens], dtype=np.int64)


def plan_shards(lengths: Iterable[np.ndarray], context_size: int, bos: bool, shard_tokens: int,
                max_tokens: int | None = None) -> list[Shard]:
    """Cut the dataset's windows into shards of about ``shard_tokens`` tokens (whole windows: a shard
    starts with the window that starts at or past each multiple of ``shard_tokens``), up to
    ``max_tokens`` exactly. Depends only on the rows' token counts, never on the number of workers.
    ``lengths`` is read only as far as ``max_tokens`` needs."""
    step = context_size - bos
    blocks, total = [], 0
    for block in lengths:
        blocks.append(block)
        total += int(block.sum() + bos * (-(-block // step)).sum())
        if max_tokens is not None and total >= max_tokens:
            break
    row_tokens = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    per_row = -(-row_tokens // step)  # windows of each row
    row = np.repeat(np.arange(len(row_tokens)), per_row)  # each window's row, index in it, length and start
    index = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    length = np.minimum(step, row_tokens[row] - index * step) + bos
    start = np.cumsum(length) - length
    n_rows = len(row_tokens)
    if max_tokens is not None and total > max_tokens:
        kept = start < max_tokens
        row, index, length, start = row[kept], index[kept], length[kept], start[kept]
        n_rows = int(row[-1]) + 1 if len(row) else 0
    firsts = np.flatnonzero(np.diff(start // shard_tokens, prepend=-1))  # each shard's first window
    lasts = np.append(firsts[1:], len(row)) - 1
    shards = []
    for i, (a, b) in enumerate(zip(firsts, lasts)):
        # rows between shards that make no window (empty rows) belong to the shard before them
        row_stop = n_rows if i == len(firsts) - 1 else int(row[firsts[i + 1]]) + bool(index[firsts[i + 1]])
        end = int(start[b] + length[b])
        limit = max_tokens - int(start[a]) if max_tokens is not None and end > max_tokens else None
        n_tokens = (end if limit is None else max_tokens) - int(start[a])
        shards.append(Shard(i, int(row[a]) if i else 0, row_stop, int(index[a]), int(b - a + 1), limit, n_tokens))
    return shards


def tokenize_rows(rows: Sequence[Any], row_ids: Sequence[int], tokenizer: Any, pretokenized: bool,
                  d_vocab: int) -> list[np.ndarray]:
    """Each row's tokens (no special tokens added), with clear errors that name the row."""
    if pretokenized:
        out = []
        for row_id, tokens in zip(row_ids, rows):
            problem = token_row_problem(tokens)
            if problem is not None:
                raise DataError(f"dataset row {row_id}: {problem}")
            arr = np.asarray(tokens if tokens is not None else [], dtype=np.int64).reshape(-1)
            bad = (arr < 0) | (arr >= d_vocab)
            if bad.any():
                raise DataError(
                    f"dataset row {row_id}: token id {int(arr[bad][0])} is outside the model's vocabulary "
                    f"[0, {d_vocab}). Were these rows tokenized with another model's tokenizer?"
                )
            out.append(arr)
        return out
    for row_id, text in zip(row_ids, rows):
        if not isinstance(text, str):
            raise DataError(
                f"dataset row {row_id}: text is {type(text).__name__}, not a string. "
                "Fix or drop the row, or point --text-column at the text."
            )
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer; give pre-tokenized rows with --tokens-column.")
    encoded = tokenizer(list(rows), add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def token_row_problem(tokens: Any) -> str | None:
    """What is wrong with a pre-tokenized row (``None``: nothing): it must be a list of integer ids.
    A string is refused, even one of digits, which numpy would otherwise take for a single id."""
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)):
        return (f"tokens are a string ({_preview(tokens)}), not a list of token ids. Give each row as a list "
                "of integers, or pass the column as --text-column to tokenize it.")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as e:
        return f"tokens are not a list of integers ({e})."
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        return (f"tokens are not a flat list of integers (found {_preview(tokens)}). Give each row as a list "
                "of integer token ids.")
    return None


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Windows:
    """Right-padded token windows and the provenance of every real token in them."""

    tokens: np.ndarray  # int64 [n_windows, width], padded with 0 past each length
    lengths: np.ndarray  # int64 [n_windows]
    rows: np.ndarray  # int64 [n_tokens]: dataset row of each real token, in window order
    positions: np.ndarray  # int32 [n_tokens]: position in the row's tokenization (-1: added BOS)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def flat_tokens(self) -> np.ndarray:
        mask = np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]
        return self.tokens[mask]


def make_windows(token_lists: Sequence[np.ndarray], row_ids: Sequence[int], context_size: int,
                 bos_id: int | None, token_limit: int | None = None, first_window: int = 0,
                 n_windows: int | None = None) -> Windows:
    """Split each row into consecutive windows of ``context_size`` tokens (BOS first when given);
    keep ``n_windows`` of them (all: None) from the ``first_window``-th on, and at most ``token_limit``
    tokens."""
    step = context_size - (bos_id is not None)
    if step < 1:
        raise ConfigError(f"--context-size {context_size} leaves no room for text after the BOS token that starts "
                          "every window. Use --context-size 2 or more, or --no-prepend-bos.")
    windows, rows, positions = [], [], []
    budget = np.inf if token_limit is None else token_limit
    skip, wanted = first_window, np.inf if n_windows is None else n_windows
    for row_id, tokens in zip(row_ids, token_lists):
        starts = range(0, len(tokens), step)
        skipped = min(skip, len(starts))
        skip -= skipped
        for start in starts[skipped:]:
            if budget <= 0 or len(windows) == wanted:
                break
            body = tokens[start : start + step]
            pos = np.arange(start, start + len(body), dtype=np.int32)
            if bos_id is not None:
                body = np.concatenate([[bos_id], body])
                pos = np.concatenate([[BOS_POSITION], pos]).astype(np.int32)
            if len(body) > budget:
                body, pos = body[: int(budget)], pos[: int(budget)]
            budget -= len(body)
            windows.append(body)
            rows.append(np.full(len(body), row_id, dtype=np.int64))
            positions.append(pos)
    lengths = np.array([len(w) for w in windows], dtype=np.int64)
    tokens = np.zeros((len(windows), int(lengths.max()) if len(windows) else 0), dtype=np.int64)
    for i, w in enumerate(windows):
        tokens[i, : len(w)] = w
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return Windows(tokens, lengths, cat(rows, np.int64), cat(positions, np.int32))
