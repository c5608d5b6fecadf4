"""Which numcodecs codecs each array gets, chosen by measurement.

Measured on the embedded default's activations for speed and size together (see
docs/FORMAT.md): feature indices compress best as deltas (they ascend within a
token) under bit-shuffle, and zstd at level 1 keeps all but 1% of level 5's ratio at
4.5x its speed; bfloat16 values under bit-shuffle and lz4 are within 1-3% of zstd's
size at 3x zstd-1's speed. Token-level arrays (token ids, rows, positions, row
pointers) are near-monotone, so deltas again; they are small beside the
activations, so they keep zstd's level 5.
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
    cname: str = "zstd"
    clevel: int = 5

    def filters(self, dtype: np.dtype) -> list:
        if not self.delta:
            return []
        return [zarr_numcodecs.Delta(dtype=np.dtype(dtype).str)]

    def compressors(self) -> list:
        return [BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)]


TOKEN_LEVEL = Encoding(delta=True, shuffle="bitshuffle")
FEATURE_INDICES = Encoding(delta=True, shuffle="bitshuffle", clevel=1)
VALUES = Encoding(delta=False, shuffle="bitshuffle", cname="lz4")


def chunk_shape(n: int) -> tuple[int]:
    return (max(1, min(n, CHUNK_ELEMENTS)),)
