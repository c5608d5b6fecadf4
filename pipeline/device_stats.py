"""Per-feature statistics accumulated in torch on the device that encodes the batches (a GPU).

There the host's cores are better spent compressing and writing, and each batch's entries are
already on the device: the sums, the histogram and the choice of the batch's top-K candidates
(``store.stats.Accumulator``'s pruning: at or above the feature's histogram floor, and better
than the K-th value it keeps) are done there with scatter operations. Only the candidates, a
small share of the entries, travel to the host, whose ``Accumulator`` keeps each feature's K
best; the sums and histogram travel once, when the shard is done. The result equals the host's
own accumulation (sums up to float64 rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from store import stats

# stored values as the float32 they stand for, by value dtype (bfloat16 travels as its uint16 bits)
_DECODED = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DeviceStats:
    """One SAE's statistics over one shard's batches, on ``device``, feeding ``accumulator``."""

    def __init__(self, accumulator: stats.Accumulator, device: torch.device):
        self.accumulator, self.device = accumulator, device
        d_sae, self.top_k, self.value_dtype = accumulator.d_sae, accumulator.top_k, accumulator.value_dtype
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros((d_sae, stats.N_BINS), dtype=torch.int64, device=device)
        table = stats.bin_table(self.value_dtype)
        self._bins = None if table is None else torch.from_numpy(table.astype(np.int64)).to(device)
        self._edges = torch.from_numpy(stats.HIST_EDGES).to(device)
        self._kth = torch.from_numpy(accumulator.kth.copy()).to(device)
        self.n_tokens = 0

    def add(self, token: torch.Tensor, feature: torch.Tensor, stored: torch.Tensor,
            n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of ``n_tokens`` tokens' entries (each one's token within the batch, feature and
        stored value, in token order). Returns its candidates for the top-K lists, on the device:
        (feature, stored value (16-bit ones as int16 bits), token within the shard)."""
        # 16-bit values are handled as int16 bits: devices implement few operations on uint16
        raw = stored.view(torch.int16) if stored.element_size() == 2 else stored
        values = raw.view(_DECODED[self.value_dtype]).float()
        if self._bins is not None:
            bins = self._bins[raw.long() & 0xFFFF]
        else:  # float32: as numpy's searchsorted, which compares in float64
            bins = torch.searchsorted(self._edges, values.double(), right=True) - 1
        v64 = values.double()
        # each batch summed alone, then added: the same order of additions as the host's
        self.sum += torch.zeros_like(self.sum).index_add_(0, feature, v64)
        self.sum_sq += torch.zeros_like(self.sum_sq).index_add_(0, feature, v64 * v64)
        d_sae = self.hist.shape[0]
        self.hist += torch.bincount(feature * stats.N_BINS + bins, minlength=d_sae * stats.N_BINS).view_as(self.hist)
        # per feature, the highest bin with at least K entries at or above it (-1: fewer than K in all)
        at_or_above = self.hist.flip(1).cumsum(1).flip(1)
        floor = (at_or_above >= self.top_k).sum(1) - 1
        # the host's K-th values rise as it compacts: a copy taken now prunes less, never wrongly
        self._kth.copy_(torch.from_numpy(self.accumulator.kth.copy()))
        keep = ((bins >= floor[feature]) & (values > self._kth[feature])).nonzero().squeeze(1)
        candidates = feature[keep], raw[keep], token[keep] + self.n_tokens
        self.n_tokens += n_tokens
        return candidates

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The shard's sums, sums of squares, histogram and token count, on the host."""
        return self.sum.cpu().numpy(), self.sum_sq.cpu().numpy(), self.hist.cpu().numpy(), self.n_tokens
