"""Where a store lives: a local path or any fsspec URL (``s3://``, ``gs://``, ...).

Credentials come from the environment or the usual config files, through
fsspec; they are never passed in here, so they cannot reach store metadata.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import zarr
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

from store.errors import ConfigError, StoreWriteError


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A canonical string for a store location (absolute for local paths)."""
    location = os.fspath(location)
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if is_url(location):
        _refuse_credentials(location)
        return location
    return str(Path(location).expanduser().resolve())


def _refuse_credentials(url: str) -> None:
    """A URL with ``user:password@`` would carry credentials into messages and logs: refuse it,
    without repeating it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        raise ConfigError(
            f"the store URL {parts.scheme}://***@{host}{parts.path} holds credentials. Remove them from the URL "
            "and give them the usual way instead: environment variables (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...) or the provider's config files."
        )


def open_zarr_store(location: str, read_only: bool = False) -> zarr.abc.store.Store:
    location = normalize(location)
    if is_url(location):
        return FsspecStore.from_url(location, read_only=read_only)
    return LocalStore(location, read_only=read_only)


def open_root(location: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(open_zarr_store(location, read_only=(mode == "r")), mode=mode)


def has_content(location: str) -> bool:
    """Whether anything at all lives at ``location``."""
    location = normalize(location)
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path) and bool(fs.ls(path))
    path = Path(location)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_writable(location: str) -> None:
    """Fail now, not after the model ran, when the store cannot be written."""
    location = normalize(location)
    if is_url(location):
        return  # object stores say so on the first write; there is no cheap probe
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise StoreWriteError(f"--store {location} is a file, not a store directory. Choose another path.")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StoreWriteError(f"--store {location} cannot be created: {ancestor} is a file. Choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StoreWriteError(
            f"--store {location}: cannot write in {ancestor} (permission denied). "
            "Choose a path you can write, or fix its permissions."
        )


def subgroup_names(group: zarr.Group) -> list[str]:
    """The names of a group's subgroups, sorted.

    zarr's local store writes each file through a temporary ``<name>.<uuid>.partial`` beside it;
    a listing that meets one (readers may read while writers write) warns that it is no part of
    the hierarchy, which is so and no concern of the reader's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .*\.partial is not recognized as a component",
                                category=ZarrUserWarning)
        return sorted(group.group_keys())
