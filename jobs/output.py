"""Where the exports and the dashboard write their files: a local folder, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from store.errors import ConfigError
from store.location import mask_url


def output_folder(out: str | os.PathLike, what: str, make: bool = False) -> Path:
    """``--out`` as a Path, once ``what`` (such as "the Neuronpedia export") can be written there; with
    ``make``, the folder is made if it is new (callers check first, writing nothing, before any work).
    A URL is refused, shown masked: these commands write local files, so a URL would become a local
    folder named after it, credentials and all. So is a file, a folder inside a store, or a folder
    that cannot be made."""
    text = os.fspath(out)
    if not text.strip():  # Path("") is this folder: files would land beside whatever is here
        raise ConfigError(f"--out is empty; give a folder for {what} (`.` for this one, if that is meant).")
    if "://" in text or "::" in text:
        raise ConfigError(f"--out {mask_url(text)} is a URL, but {what} is written to a local folder. Give a "
                          "local folder, then copy it with your storage's own tool (such as `aws s3 sync` or "
                          "`gcloud storage cp -r`).")
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for {what}.")
    lineage = (*reversed(folder.absolute().parents), folder.absolute())  # from the root down: the store, not a group
    store = next((p for p in lineage if (p / "zarr.json").is_file()), None)
    if store is not None:  # its files would become part of the store, which verify then calls damaged
        raise ConfigError(f"--out {folder} is inside the zarr store {store}; give a folder outside it for {what}.")
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--out {folder} cannot be made: {ancestor} is a file. Give another folder for {what}.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {folder} cannot be made: {ancestor} is not writable. Give a folder you can "
                          f"write to for {what}.")
    if make:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # what permissions do not show: a read-only mount, /proc
            raise ConfigError(f"--out {folder} cannot be made ({e.strerror or e}); give a folder you can write "
                              f"to for {what}.") from None
    return folder
