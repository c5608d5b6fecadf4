"""Every error latentstore raises, under one root.

Each type also inherits the built-in exception that callers already catch
(`ValueError`, `FileNotFoundError`, ...), so `except ValueError` keeps working.
Messages say what failed, what was expected against what was found, and the fix.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable


class LatentStoreError(Exception):
    """Root of every latentstore error."""


class ConfigError(LatentStoreError, ValueError):
    """The settings of a run are invalid. Raised before any work is spent."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class TokenRangeError(ConfigError, IndexError):
    """A range of token indices outside the store's tokens."""


class DataError(LatentStoreError, ValueError):
    """A dataset row cannot be used (bad token ids, wrong types, ...)."""


class StoreNotFoundError(LatentStoreError, FileNotFoundError):
    """No latentstore store at the given path."""


class StoreConflictError(LatentStoreError, FileExistsError):
    """The store holds a different run than the one asked for."""


class StoreIncompleteError(LatentStoreError, RuntimeError):
    """The store (or a part of it) has not been completely written."""


class FormatVersionError(LatentStoreError, ValueError):
    """The store was written by a format this version cannot read."""


class StoreWriteError(LatentStoreError, PermissionError):
    """The store path cannot be written."""


class StoreAccessError(LatentStoreError, OSError):
    """The store cannot be reached or opened: no connection, no credentials, access denied, or a URL its
    storage cannot take (a bucket name it refuses, a backend not installed)."""


class StoreCorruptError(LatentStoreError, ValueError):
    """Part of the store was damaged after it was written: unreadable metadata, a chunk that
    does not decode, or data whose checksum differs from the one recorded at write time."""


def did_you_mean(name: str, valid: Iterable[str], limit: int = 12) -> str:
    """A short list of valid names for an error message, closest ones first."""
    import difflib

    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    rest = [v for v in valid if v not in close]
    shown = close + rest[: max(0, limit - len(close))]
    more = f", ... ({len(valid) - len(shown)} more)" if len(valid) > len(shown) else ""
    return ", ".join(shown) + more


class StoreLockedError(LatentStoreError, BlockingIOError):
    """Another run holds the store's writer lease (or this run lost it): two writers would corrupt it."""


class StoreFullError(LatentStoreError, OSError):
    """The disk (or the quota) that holds the store is full. Complete shards are kept: a rerun of the
    same command resumes once there is room."""

    def __init__(self, message: str, location: str | None = None):
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.location = location


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full(error: OSError, location: str | None = None) -> StoreFullError:
    """The StoreFullError for ``error`` (ENOSPC or EDQUOT) met while writing the store at ``location``:
    it names the full path and its file system, and says that a rerun resumes. Raise it ``from error``.
    A StoreFullError that already names its store is returned as it is."""
    if isinstance(error, StoreFullError) and (error.location or location is None):
        return error
    path = getattr(error, "filename", None) or location
    what = "quota exceeded" if error.errno == errno.EDQUOT else "no space left on the device"
    where = f" for {path}" if path else " for the store"
    mount = _mount_point(path) if path and "://" not in path else None
    if mount is not None:
        import shutil

        free = shutil.disk_usage(mount).free
        where += f" (the file system mounted at {mount}, {free / 2**20:,.1f} MiB free)"
    full = StoreFullError(
        f"cannot write the store: {what}{where}. Make room there (or give a --store on a disk with more "
        "space), then rerun the same command: it resumes, keeping every complete shard.", location=path)
    for note in getattr(error, "__notes__", []):
        full.add_note(note)
    return full


def _mount_point(path: str) -> str | None:
    import os

    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path
