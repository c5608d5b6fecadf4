"""`latentstore export delphi`: a store's activations as EleutherAI delphi's latent cache.

delphi (PyPI ``eai-delphi``) explains and scores latents from a cache folder per module, which
``delphi.latents.LatentDataset(raw_dir, SamplerConfig(), ConstructorConfig(), tokenizer,
modules=[...])`` loads. This writes that layout from the store's feature-major index, a range of
features at a time, never a whole SAE's activations at once. Each SAE's folder is named by its
name in the store (an SAE named by its hook: the hook, delphi's usual module name)::

    DIR/<name>/config.json                  what delphi reads (model_name, cache_ctx_len, dataset, ...)
    DIR/<name>/<first>_<last>.safetensors   latents first..last (inclusive):
        locations    [n, 3] uint16 (uint32 past 65,536 windows, window length or latents): window,
                     position in the window, latent - first; by latent, then in token order (delphi
                     pools a latent's activations into windows by runs of equal window)
        activations  [n] float16 (float32 with --float32)
        tokens       [windows, ctx_len] int32: the store's context windows, every split holding them

A window is one of the store's context windows (``n_tokens_in_prompt`` tokens, BOS first when the
run added one); a shorter last window of a row is padded with the tokenizer's padding token (or
0) where it holds no token and no activation. Every stored activation is written, BOS tokens
included, as delphi's own cache keeps every nonzero activation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from jobs.output import output_folder
from jobs.terminal import terminal_text
from pipeline.dashboard_data import window_starts
from store import FeatureStore
from store.errors import ConfigError
from store.index import DEFAULT_PART_NNZ, plan_parts

log = logging.getLogger(__name__)
N_SPLITS = 5  # delphi's CacheConfig.n_splits
EXAMPLE_CTX_LEN = 32  # delphi's ConstructorConfig.example_ctx_len, which must divide the windows' length


def add_command(formats) -> None:
    parser = formats.add_parser(
        "delphi", help="EleutherAI delphi's latent cache, for its explainer and scorer",
        description="Write delphi's latent cache (one folder per SAE: split files {first}_{last}.safetensors "
                    "with locations, activations and the token windows, and config.json) from the store's "
                    "feature-major index, a range of features at a time. Load it with "
                    "delphi.latents.LatentDataset(DIR, ..., modules=[NAME]).",
        epilog="example: latentstore export delphi demo.zarr --out delphi-cache/ --sae blocks.1.hook_resid_post",
    )
    parser.add_argument("store", help="the store's path or URL (its index built: latentstore index STORE)")
    parser.add_argument("--out", required=True, help="the cache folder: one folder per SAE is written inside")
    parser.add_argument("--sae", action="append", dest="saes", metavar="NAME",
                        help="an SAE to export, by its name, or by its hook where it is the only SAE (repeat for "
                             "several; default: every SAE of the store)")
    parser.add_argument("--n-splits", type=int, default=N_SPLITS,
                        help="split files per SAE, at least (default: %(default)s, as delphi's); each holds whole "
                             "latents and a copy of the store's tokens, so at most the SAE's latents")
    parser.add_argument("--split-entries", type=int, default=DEFAULT_PART_NNZ,
                        help="activations per split file, at most about: bounds the memory used (default: "
                             "%(default)s)")
    parser.add_argument("--float32", dest="value_dtype", action="store_const", const="float32", default="float16",
                        help="write activations as float32 (default: float16, as delphi writes them)")
    parser.set_defaults(handler=_handle)


def export_delphi(fs: FeatureStore, out: str | Path, saes: list[str] | None = None, n_splits: int = N_SPLITS,
                  split_entries: int = DEFAULT_PART_NNZ, value_dtype: str = "float16") -> dict[str, list[Path]]:
    """Write each SAE's cache folder ``out/<name>`` (``saes``: names, or hooks where one SAE sits;
    default: every SAE); returns the split files written per SAE name."""
    from safetensors.numpy import save_file

    fs.require_complete(then="export it")  # a cache of part of the run would pass for the whole
    names = list(dict.fromkeys(fs.resolve(sae) for sae in saes or fs.saes))  # every one checked before writing
    for name in names:
        if fs.index(name) is None:
            raise ConfigError(f"{fs.location} has no complete index for SAE {name}; delphi's cache is written "
                              f"from it. Build it first: latentstore index {shlex.quote(fs.location)}")
    if n_splits < 1 or split_entries < 1:
        raise ConfigError(f"--n-splits {n_splits} and --split-entries {split_entries} must be at least 1.")
    fewest = min(names, key=fs.d_sae)
    latents = fs.d_sae(fewest)
    if n_splits > latents:  # each split file holds whole latents, and a copy of the store's tokens
        raise ConfigError(f"--n-splits {n_splits:,} is more than the {latents:,} latents of SAE {fewest}, and each "
                          f"split file holds whole latents. Give at most {latents:,}; fewer take less disk, as every "
                          f"split file also holds the store's tokens ({4 * fs.n_tokens / 2**20:,.1f} MiB).")
    out = output_folder(out, "delphi's latent cache", make=True)
    tokens, windows, positions = token_windows(fs)
    ctx_len = tokens.shape[1]
    if ctx_len % EXAMPLE_CTX_LEN:
        log.warning("the windows hold %d tokens, which delphi's example length (ConstructorConfig.example_ctx_len, "
                    "%d by default) does not divide: give delphi an example_ctx_len that divides %d.",
                    ctx_len, EXAMPLE_CTX_LEN, ctx_len)
    written = {}
    for name in names:
        folder = _module_folder(out, name)
        index = fs.index(name)
        parts = plan_parts(np.diff(index.indptr), min_parts=n_splits, part_nnz=split_entries)
        written[name] = []
        for part in parts:
            # in token order within each latent, as delphi's own cache holds them: its loader pools a
            # latent's activations into windows by runs of equal window (torch.unique_consecutive).
            # Two counting sorts (to token-major and back) order each latent's entries by token.
            indptr, entry_tokens, values = index.feature_block(part.start, part.stop)
            by_latent = sp.csr_matrix((values, entry_tokens, indptr),
                                      shape=(part.stop - part.start, fs.n_tokens)).tocsc().tocsr()
            entry_tokens, values = by_latent.indices, by_latent.data
            fits = max(len(windows), ctx_len, part.stop - part.start) <= 2**16
            locations = np.empty((len(entry_tokens), 3), np.uint16 if fits else np.uint32)
            locations[:, 0], locations[:, 1] = windows[entry_tokens], positions[entry_tokens]
            locations[:, 2] = np.repeat(np.arange(part.stop - part.start), np.diff(by_latent.indptr))
            path = folder / f"{part.start}_{part.stop - 1}.safetensors"
            partial = path.with_name(path.name + ".partial")
            save_file({"locations": locations, "activations": values.astype(value_dtype), "tokens": tokens},
                      str(partial))
            os.replace(partial, path)
            written[name].append(path)
        config = cache_config(fs, name, ctx_len, len(parts), value_dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return written


def token_windows(fs: FeatureStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store's tokens as delphi's ``[windows, ctx_len]`` int32 matrix, and each store token's
    window and position in it."""
    provenance = fs.provenance()
    starts = window_starts(provenance["row"].to_numpy(), provenance["pos"].to_numpy())
    n_tokens = fs.n_tokens
    windows = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n_tokens)))
    positions = np.arange(n_tokens) - starts[windows]
    ctx_len = max(int(fs.run["context_size"]), int(positions.max(initial=-1)) + 1)
    pad = (fs.run.get("tokenizer") or {}).get("pad_token_id")
    tokens = np.full((len(starts), ctx_len), 0 if pad is None else int(pad), np.int32)
    tokens[windows, positions] = fs.token_ids()
    return tokens, windows, positions


def cache_config(fs: FeatureStore, sae: str, ctx_len: int, n_splits: int, value_dtype: str) -> dict[str, Any]:
    """delphi's ``config.json``: its ``CacheConfig`` fields and ``model_name`` (which it loads the
    tokenizer from when none is given), and where the cache came from."""
    dataset = fs.run["dataset"]
    return {
        "dataset_repo": dataset["name"], "dataset_split": dataset.get("split") or "",
        "dataset_name": dataset.get("subset") or "", "dataset_column": dataset.get("column") or "text",
        "cache_ctx_len": ctx_len, "ctx_len": ctx_len, "n_tokens": fs.n_tokens, "n_splits": n_splits,
        "model_name": fs.run["model"]["name"],
        "latentstore": {"store": fs.location, "sae": fs.resolve(sae), "hook": fs.sae_record(sae)["hook"],
                        "d_sae": fs.d_sae(sae), "activations": value_dtype},
    }


def _module_folder(out: Path, name: str) -> Path:
    """``out/<name>``, emptied of an earlier export's split files (whose ranges may differ, and delphi
    reads every split file it finds); a folder holding split files latentstore did not write is refused."""
    folder = out / name
    splits = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if splits:
        try:
            ours = "latentstore" in json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ConfigError(f"{folder} holds split files that latentstore did not write ({splits[0].name}, ...); "
                              "delphi would read them with the new ones. Give another --out, or remove them.")
        for path in splits:
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _handle(args: argparse.Namespace) -> None:
    output_folder(args.out, "delphi's latent cache")  # before any work
    fs = FeatureStore.open(args.store)
    written = export_delphi(fs, args.out, args.saes, args.n_splits, args.split_entries, args.value_dtype)
    for name, paths in written.items():
        print(terminal_text(f"wrote {len(paths)} split file{'s' if len(paths) != 1 else ''} for {name} to "
                            f"{Path(args.out) / name}"))
