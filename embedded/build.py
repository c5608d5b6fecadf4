"""Build every embedded default in order: corpus, tokenizer, model, SAEs, metrics.

``python -m embedded.build`` rebuilds ``pipeline/default/`` (about half an hour
on two CPU cores); ``--preset tiny --out-dir DIR`` runs the same steps at toy
sizes in seconds, which is what the tests do. Each step is called through its
own command line, so this script runs exactly what a person would. The seeds
and sizes used and each step's summary go to ``build_info.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from embedded import corpus, evaluate, tokenizer, train_model, train_saes

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "default"

# Extra command-line options per step; the full preset uses each script's defaults.
PRESETS: dict[str, dict[str, list[str]]] = {
    "full": {"corpus": [], "tokenizer": [], "train_model": [], "train_saes": [], "evaluate": []},
    "tiny": {
        "corpus": ["--max-files", "40"],
        "tokenizer": ["--vocab-size", "320"],
        "train_model": ["--n-layers", "3", "--d-model", "32", "--n-heads", "2", "--d-mlp", "64",
                        "--n-ctx", "32", "--n-steps", "3", "--warmup-steps", "1", "--batch-size", "4"],
        "train_saes": ["--training-tokens", "1024", "--d-sae", "64", "--context-size", "16",
                       "--train-batch-size-tokens", "128", "--n-batches-in-buffer", "8",
                       "--store-batch-size-prompts", "4", "--n-batches-for-norm-estimate", "2"],
        "evaluate": ["--n-windows", "4", "--context-size", "16"],
    },
}


def build(out_dir: Path, preset: str) -> dict[str, Any]:
    steps = PRESETS[preset]
    corpus_dir, model_dir, saes_dir = out_dir / "corpus", out_dir / "model", out_dir / "saes"
    train_file, eval_file = corpus_dir / corpus.TRAIN_FILE, corpus_dir / corpus.EVAL_FILE
    info: dict[str, Any] = {"preset": preset}
    start = time.monotonic()
    info["corpus"] = corpus.main(["--out-dir", str(corpus_dir), *steps["corpus"]])
    # The tokenizer is written into the model directory, where save_model keeps it.
    tokenizer.main(["--train-corpus", str(train_file), "--out-dir", str(model_dir), *steps["tokenizer"]])
    info["model"] = train_model.main(["--train-corpus", str(train_file), "--tokenizer-dir", str(model_dir),
                                      "--out-dir", str(model_dir), *steps["train_model"]])
    info["saes"] = train_saes.main(["--model-dir", str(model_dir), "--train-corpus", str(train_file),
                                    "--out-dir", str(saes_dir), *steps["train_saes"]])
    sae_dirs = [str(saes_dir / name) for name in info["saes"]]
    info["metrics"] = evaluate.main(["--model-dir", str(model_dir), "--sae-dirs", *sae_dirs,
                                     "--train-corpus", str(train_file), "--eval-corpus", str(eval_file),
                                     "--write", str(out_dir / "metrics.json"), *steps["evaluate"]])
    info["wall_s"] = round(time.monotonic() - start, 1)
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    log.info("build (%s) done in %.0f s", preset, info["wall_s"])
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return build(args.out_dir, args.preset)


if __name__ == "__main__":
    main()
