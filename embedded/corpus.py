"""Step 1: the corpus, the source of CPython's standard library (PSF licence).

Each ``.py`` file of this interpreter's ``Lib/`` becomes one row
``{"text": ..., "path": ...}`` in a gzipped JSONL file. Test suites, IDLE,
installed packages and data-only modules are left out. A file goes to the
held-out ``eval`` split when a hash of its path says so, so the split does not
depend on which other files exist. Given the same Python version the rows are
the same on every machine: files are visited in sorted order and gzip headers
carry no time stamp or file name.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import platform
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Directory names (at any depth) whose files are not ordinary library code:
# test suites, IDLE, third-party packages, the 2to3 fixer test data, the
# codec tables and pydoc's generated topic strings (mostly data, not code),
# and the bundled-wheel helper.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "lib2to3",
    "encodings", "pydoc_data", "ensurepip", "turtledemo", "__phello__", "__pycache__",
})
# Name prefixes of files generated for the build machine (paths, compiler flags).
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
# CPython's licence file (PSF licence and the history of the code), which the
# PSF licence asks to be kept with any copy: shipped beside the corpus.
LICENSE_FILE = "LICENSE.txt"
SHIPPED_LICENSE_FILE = "LICENSE-PSF.txt"
TRAIN_FILE = "train.jsonl.gz"
EVAL_FILE = "eval.jsonl.gz"


@dataclass(frozen=True)
class CorpusConfig:
    out_dir: Path
    # Where the .py files are read from; the running interpreter's stdlib by default.
    stdlib_dir: Path = Path(sysconfig.get_paths()["stdlib"])
    # One file in `eval_one_in` goes to the held-out split (by hash of its path).
    eval_one_in: int = 20
    # Larger files are generated tables more than code; they also skew the mix.
    max_file_bytes: int = 256_000
    # Stop after this many files (sorted order); None takes them all. For tests.
    max_files: int | None = None


def library_files(cfg: CorpusConfig) -> Iterator[Path]:
    """The selected .py files under the stdlib, sorted by relative path."""
    candidates = sorted(cfg.stdlib_dir.rglob("*.py"), key=lambda p: p.relative_to(cfg.stdlib_dir).as_posix())
    n_taken = 0
    for path in candidates:
        rel = path.relative_to(cfg.stdlib_dir)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith(EXCLUDED_PREFIXES):
            continue
        if rel.name.startswith(EXCLUDED_PREFIXES) or path.stat().st_size > cfg.max_file_bytes:
            continue
        if cfg.max_files is not None and n_taken >= cfg.max_files:
            return
        n_taken += 1
        yield path


def is_eval(rel_path: str, eval_one_in: int) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % eval_one_in == 0


def write_jsonl_gz(rows: list[dict[str, str]], path: Path) -> None:
    # mtime=0 and an empty name keep the gzip header free of build-time facts.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")


def read_jsonl_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_corpus(cfg: CorpusConfig) -> dict[str, int | str]:
    """Write the train and eval files; return counts for the provenance record."""
    splits: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    for path in library_files(cfg):
        rel = path.relative_to(cfg.stdlib_dir).as_posix()
        # Decode strictly: every stdlib file is UTF-8, and a failure here means
        # the input is not what the provenance record claims.
        text = path.read_bytes().decode("utf-8")
        splits["eval" if is_eval(rel, cfg.eval_one_in) else "train"].append({"text": text, "path": f"Lib/{rel}"})
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(splits["train"], cfg.out_dir / TRAIN_FILE)
    write_jsonl_gz(splits["eval"], cfg.out_dir / EVAL_FILE)
    shutil.copyfile(cfg.stdlib_dir / LICENSE_FILE, cfg.out_dir / SHIPPED_LICENSE_FILE)
    summary: dict[str, int | str] = {
        "python_version": platform.python_version(),
        "n_train_files": len(splits["train"]),
        "n_eval_files": len(splits["eval"]),
        "n_train_chars": sum(len(r["text"]) for r in splits["train"]),
        "n_eval_chars": sum(len(r["text"]) for r in splits["eval"]),
    }
    log.info("corpus: %s", summary)
    return summary


def main(argv: list[str] | None = None) -> dict[str, int | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--stdlib-dir", type=Path, default=CorpusConfig.stdlib_dir)
    parser.add_argument("--eval-one-in", type=int, default=CorpusConfig.eval_one_in)
    parser.add_argument("--max-files", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return build_corpus(CorpusConfig(out_dir=args.out_dir, stdlib_dir=args.stdlib_dir,
                                     eval_one_in=args.eval_one_in, max_files=args.max_files))


if __name__ == "__main__":
    main()
