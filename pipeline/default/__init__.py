"""latentstore's embedded defaults: a small model, its SAEs and a corpus, shipped as package data.

They let ``latentstore extract`` run offline with no model, SAE or dataset
named. The model and SAEs were trained on the source of CPython's standard
library; ``README.md`` in this directory records provenance, licence, seeds
and metrics, and the ``embedded`` scripts in the repository rebuild them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
# latentstore's local model format (pipeline.models.load_model), tokenizer included.
MODEL_DIR = ROOT / "model"
# sae_lens disk format (sae_lens.SAE.load_from_disk), by name.
SAE_DIRS: dict[str, Path] = {
    name: ROOT / "saes" / name for name in ("resid_post_1_standard", "resid_post_2_topk")
}
# Gzipped JSON lines, one source file per row: {"text": ..., "path": ...}.
TRAIN_CORPUS = ROOT / "corpus" / "train.jsonl.gz"
EVAL_CORPUS = ROOT / "corpus" / "eval.jsonl.gz"
TEXT_COLUMN = "text"
METRICS_FILE = ROOT / "metrics.json"


def default_sae_dirs() -> list[Path]:
    """The shipped SAE directories, in a fixed order."""
    return list(SAE_DIRS.values())
