"""Which numcodecs codecs each array gets, chosen by measurement.

Measured on SAE-like data (see docs/FORMAT.md and bench/extract.py): feature
indices compress best as deltas (they ascend within a token) under zstd with
bit-shuffle; bfloat16 values under zstd with byte-shuffle; token-level arrays
(token ids, rows, positions, row pointers) are near-monotone, so deltas again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec
from zarr.codecs import numcodecs as zarr_numcodecs

CHUNK_ELEMENTS = 1 << 20  # ~2-4 MB raw per chunk: big enough to compress, small enough to slice


@dataclass(frozen=True)
class Encoding:
    """Filters and compressor of one array."""

    delta: bool
    shuffle: str  # "shuffle" (bytes) or "bitshuffle"

    def filters(self, dtype: np.dtype) -> list:
        if not self.delta:
            return []
        return [zarr_numcodecs.Delta(dtype=np.dtype(dtype).str)]

    def compressors(self) -> list:
        return [BloscCodec(cname="zstd", clevel=5, shuffle=self.shuffle)]


TOKEN_LEVEL = Encoding(delta=True, shuffle="bitshuffle")
FEATURE_INDICES = Encoding(delta=True, shuffle="bitshuffle")
VALUES = Encoding(delta=False, shuffle="shuffle")


def chunk_shape(n: int) -> tuple[int]:
    return (max(1, min(n, CHUNK_ELEMENTS)),)
