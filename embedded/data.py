"""Token windows shared by model training, SAE training and evaluation.

Each file's tokens are followed by ``<|endoftext|>``, the files are joined into
one stream, and the stream is cut into windows of ``n_ctx - 1`` tokens, each
given a leading BOS. Every window therefore starts the way TransformerLens's
``prepend_bos=True`` inputs do, which is what the extractor feeds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from embedded.corpus import read_jsonl_gz


def token_windows(corpus: Path, tokenizer: Any, n_ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n_windows, n_ctx]`` int64 token ids, in corpus order, BOS first in each."""
    texts = [row["text"] for row in read_jsonl_gz(corpus)]
    stream: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:  # one batched call: the Rust side runs it in parallel
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    body = n_ctx - 1
    n_windows = len(stream) // body
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"{corpus} holds {len(stream)} tokens, fewer than one window of {body}.")
    tokens = torch.tensor(stream[: n_windows * body], dtype=torch.long).view(n_windows, body)
    return torch.cat([torch.full((n_windows, 1), tokenizer.bos_token_id, dtype=torch.long), tokens], dim=1)
