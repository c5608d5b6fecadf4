"""Every error latentstore raises, under one root.

Each type also inherits the built-in exception that callers already catch
(`ValueError`, `FileNotFoundError`, ...), so `except ValueError` keeps working.
Messages say what failed, what was expected against what was found, and the fix.
"""

from __future__ import annotations

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
