"""Sparse encoding: the model's activations at each hook, through that SAE's own ``encode``.

One forward per batch serves every SAE, stops after the deepest hooked layer and
builds no autograd graph. The hooks leave the model's activations untouched, so
each SAE sees what it would see under ``run_with_cache_with_saes(...,
use_error_term=True)``. The dense ``[tokens, d_sae]`` activations never leave the
device: only each token's count of active features, their indices and values do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models import stop_layer
from store.format import index_dtype


@dataclass(frozen=True)
class SparseBatch:
    """One SAE's activations over a batch's real tokens (window order), in CSR pieces."""

    counts: np.ndarray  # int64 [n_tokens]: active features per token
    indices: np.ndarray  # uint16/uint32 [nnz], ascending within a token
    values: np.ndarray  # storage dtype of the value dtype [nnz]


def to_storage(values: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Round on the device, then copy: bfloat16 travels as its uint16 bits (numpy has no bfloat16)."""
    if value_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return values.to(getattr(torch, value_dtype)).cpu().numpy()


class SparseEncoder:
    """Maps a batch of right-padded token windows to each SAE's sparse activations."""

    def __init__(self, model, saes: dict, value_dtype: str):
        self.model = model
        self.saes = saes  # hook name -> sae_lens SAE
        self.value_dtype = value_dtype
        self.stop_at_layer = stop_layer(list(saes))
        self._index_dtypes = {hook: index_dtype(sae.cfg.d_sae) for hook, sae in saes.items()}

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, SparseBatch]:
        # Right padding needs no attention mask: causal attention never looks at later positions,
        # and padded positions are dropped here before anything is kept.
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        out: dict[str, SparseBatch] = {}

        def encode_at(hook_name: str, sae):
            def hook(activation: torch.Tensor, hook) -> None:
                features = sae.encode(activation.to(sae.dtype))[valid]  # [n_tokens, d_sae]
                token, feature = features.nonzero(as_tuple=True)  # row-major: features ascend per token
                counts = torch.bincount(token, minlength=features.shape[0])
                out[hook_name] = SparseBatch(
                    counts=counts.cpu().numpy().astype(np.int64),
                    indices=feature.to(torch.int32).cpu().numpy().astype(self._index_dtypes[hook_name]),
                    values=to_storage(features[token, feature], self.value_dtype),
                )

            return hook

        self.model.run_with_hooks(
            tokens,
            fwd_hooks=[(hook, encode_at(hook, sae)) for hook, sae in self.saes.items()],
            stop_at_layer=self.stop_at_layer,
        )
        return out


def concat_batches(batches: list[SparseBatch], indices_dtype: np.dtype, values_dtype: np.dtype,
                   n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join batches (in order) into one CSR (indptr, indices, values) over ``n_tokens`` tokens."""
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    if batches:
        np.cumsum(np.concatenate([b.counts for b in batches]), out=indptr[1:])
    join = lambda parts, dtype: np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)  # noqa: E731
    return indptr, join([b.indices for b in batches], indices_dtype), join([b.values for b in batches], values_dtype)
