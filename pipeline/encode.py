"""Sparse encoding: the model's activations at each hook, through the own ``encode`` of each SAE there.

One forward per batch serves every SAE (several may read one hook), stops after the deepest hooked layer and
builds no autograd graph. Several threads may encode batches at once (a CPU worker runs one stream per core):
the encoder's hooks stay on the model and serve the batch of the thread whose forward calls them. The hooks
leave the model's activations untouched, so
each SAE sees what it would see under ``run_with_cache_with_saes(...,
use_error_term=True)``. The dense ``[tokens, d_sae]`` activations never leave the
device: only each token's count of active features, their indices and values do.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipeline.models import hook_module, is_bridge_model, stop_layer
from pipeline.saes import encode_keeps_state
from store.format import index_dtype


@dataclass(frozen=True)
class SparseBatch:
    """One SAE's activations over a batch's real tokens (window order), in CSR pieces, on the host.

    From a GPU the arrays are pinned host buffers that the device is still filling (non-blocking
    copies): ``wait()`` before reading them."""

    counts: np.ndarray  # int64 [n_tokens]: active features per token
    indices: np.ndarray  # uint16/uint32 [nnz], ascending within a token
    values: np.ndarray  # storage dtype of the value dtype [nnz]
    copied: object = None  # the CUDA event recorded after the copies, or None when already on the host
    entries: tuple | None = None  # (token within the batch, feature, stored value) on the device, for statistics there

    def wait(self) -> "SparseBatch":
        if self.copied is not None:
            self.copied.synchronize()
        return self


def to_storage(values: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """Round on the device: bfloat16 travels as its uint16 bits (numpy has no bfloat16)."""
    if value_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.uint16)
    return values.to(getattr(torch, value_dtype))


def host_copies(tensors: list[torch.Tensor]) -> tuple[list[np.ndarray], object]:
    """Host arrays of ``tensors`` (``to_host``) and, from a GPU, the CUDA event recorded after their
    copies: the host waits on it, the device goes on (None from the CPU)."""
    copied = torch.cuda.Event() if tensors and tensors[0].device.type == "cuda" else None
    arrays = [to_host(t) for t in tensors]
    if copied is not None:
        copied.record()
    return arrays, copied


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A host array of ``tensor``: a view on the CPU, else a non-blocking copy into pinned memory."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    return pinned.numpy()


class SparseEncoder:
    """Maps a batch of right-padded token windows to each SAE's sparse activations.

    Its hooks are the model's from construction on (permanent, so that ``run_with_hooks`` and
    ``run_with_cache`` elsewhere leave them), and act only inside a call of this encoder, on the
    batch of the calling thread: calls from several threads at once do not mix their batches, as
    hooks added per call would. An SAE whose ``encode`` keeps per-call state on itself (sae_lens's
    run-time activation normalizations) encodes one call at a time."""

    def __init__(self, model, saes: dict, value_dtype: str):
        self.model = model
        self.saes = saes  # SAE name -> sae_lens SAE; several may read one hook
        self.value_dtype = value_dtype
        self.at_hook: dict[str, list[str]] = {}  # hook -> the names of the SAEs that read it
        for name, sae in saes.items():
            self.at_hook.setdefault(sae.cfg.metadata.hook_name, []).append(name)
        self.stop_at_layer = stop_layer(list(self.at_hook))
        self._index_dtypes = {name: index_dtype(sae.cfg.d_sae) for name, sae in saes.items()}
        self._call = threading.local()  # per thread: (valid, found) while its forward runs
        # an SAE whose encode keeps per-call state on itself encodes one call at a time
        self._one_at_a_time = {name: threading.Lock() if encode_keeps_state(sae) else nullcontext()
                               for name, sae in saes.items()}
        for hook, names in self.at_hook.items():
            hook_module(model, hook).add_hook(partial(self._encode_at, names), is_permanent=True)

    def _encode_at(self, names: list[str], activation: torch.Tensor, hook) -> None:
        if getattr(self._call, "batch", None) is None:  # a forward of someone else's
            return
        valid, found = self._call.batch
        real = activation[valid]  # real tokens only: padding is never encoded, nothing dense is copied
        for name in names:
            sae = self.saes[name]
            with self._one_at_a_time[name]:
                token, feature, values = sparse_encode(sae, real.to(sae.dtype))
            stored = to_storage(values, self.value_dtype)
            # only the first three leave the device
            found[name] = (torch.bincount(token, minlength=real.shape[0]),
                           to_index(feature, self._index_dtypes[name]), stored, (token, feature, stored))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, SparseBatch]:
        # Right padding needs no attention mask: causal attention never looks at later positions,
        # and padded positions are dropped here before anything is kept.
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        found: dict[str, tuple] = {}
        self._call.batch = valid, found
        try:
            self.model(tokens, stop_at_layer=self.stop_at_layer)
        finally:
            self._call.batch = None
        missing = [name for name in self.saes if name not in found]
        if missing:
            raise RuntimeError(f"the model ran without this encoder's hooks for {', '.join(missing)}: something "
                               "removed its permanent hooks (reset_hooks(including_permanent=True)). Make a new "
                               "SparseEncoder after that.")
        names = list(found)
        arrays, copied = host_copies([t for name in names for t in found[name][:3]])
        return {name: SparseBatch(*arrays[3 * i : 3 * i + 3], copied, found[name][3]) for i, name in enumerate(names)}


def encode_streams(model, device: torch.device, n_threads: int | None) -> int:
    """How many batches a worker encodes at once, each on one torch thread: one per core on a CPU,
    where a forward on every core loses to one forward per core (fewer, larger pieces of work, no
    waiting for each other within each operation) and host threads then take a core from one stream
    instead of stalling all of them; one on a GPU, which queues its work anyway. A TransformerBridge
    encodes one batch at a time: its forward sets state on its blocks."""
    if device.type != "cpu" or not n_threads or is_bridge_model(model):
        return 1
    return n_threads


# On a CPU, tokens are encoded this many dense feature bytes at a time (at least CPU_BLOCK_MIN_ROWS
# tokens): a block's latents are still in cache when their nonzeros are read. Measured on 4,096 tokens,
# encoded and read: the default's SAE of 2,048 features 39 ms in blocks against 64 ms whole (its encode
# alone 52 ms: a 32 MiB output spills from cache), 3% of the default's whole forward and encode; a
# GPT-2-small-shaped SAE of 24,576 features 1.27 against 1.59 s; bench.extract's fast-device proxy
# (TopK of 4,096 on a 32-wide model) went from 0.75 to 1.02 of the bare limit. A GPU encodes a batch at once.
CPU_BLOCK_BYTES = 2 << 20
CPU_BLOCK_MIN_ROWS = 128


def block_rows(inputs: torch.Tensor, d_sae: int) -> int:
    """How many of ``inputs``' tokens to encode at once into ``d_sae`` latents."""
    if inputs.device.type != "cpu":
        return len(inputs)
    return max(CPU_BLOCK_MIN_ROWS, CPU_BLOCK_BYTES // (inputs.element_size() * d_sae))


def sparse_encode(sae, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, feature, value) of each nonzero of ``sae.encode(inputs)``, row-major, as ``nonzeros``."""
    rows = block_rows(inputs, sae.cfg.d_sae)
    if rows >= len(inputs):
        return nonzeros(sae.encode(inputs))
    blocks = [nonzeros(sae.encode(block)) for block in inputs.split(rows)]
    token = torch.cat([t + i * rows for i, (t, _, _) in enumerate(blocks)])
    return token, torch.cat([f for _, f, _ in blocks]), torch.cat([v for _, _, v in blocks])


def nonzeros(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, feature, value) of each nonzero of ``[n_tokens, d_sae]`` latents, row-major (features
    ascend within each token). A sparse COO tensor (sae_lens's TopK with ``use_sparse_activations``)
    is read as it is, never made dense; its explicit zeros are dropped."""
    if features.is_sparse:
        coalesced = features.coalesce()  # sorted row-major, duplicates summed
        token, feature = coalesced.indices()
        values = coalesced.values()
        kept = values != 0
        return token[kept], feature[kept], values[kept]
    if features.device.type == "cpu" and features.dtype != torch.bfloat16:  # numpy has no bfloat16
        # numpy's comparison and nonzero take about half of torch's time on a CPU (0.75 against 1.35 ms
        # for a block of 256 tokens by 2,048 latents, on one thread), beside the SAE's own encode
        dense = features.numpy()
        flat = np.flatnonzero(dense != 0)
        token, feature = np.divmod(flat, dense.shape[1])
        return torch.from_numpy(token), torch.from_numpy(feature), torch.from_numpy(dense.ravel()[flat])
    token, feature = (features != 0).nonzero().unbind(1)
    return token, feature, features[token, feature]  # a gather of the nonzeros: no second pass over the mask


def to_index(feature: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """Feature ids in the store's index dtype, on the device, by casts every device implements (casts
    to unsigned types are not): shifted into int16's range, the sign bit flipped back, viewed unsigned."""
    if dtype == np.dtype("<u2"):
        return ((feature - 32768).to(torch.int16) ^ -32768).view(torch.uint16)
    return feature.to(torch.int32).view(torch.uint32)


def concat_batches(batches: list[SparseBatch], indices_dtype: np.dtype, values_dtype: np.dtype,
                   n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join batches (in order) into one CSR (indptr, indices, values) over ``n_tokens`` tokens."""
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    batches = [b.wait() for b in batches]
    if batches:
        np.cumsum(np.concatenate([b.counts for b in batches]), out=indptr[1:])
    join = lambda parts, dtype: np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)  # noqa: E731
    return indptr, join([b.indices for b in batches], indices_dtype), join([b.values for b in batches], values_dtype)
