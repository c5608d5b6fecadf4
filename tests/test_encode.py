"""The device-side conversions of the sparse encoder: feature ids to the store's index dtype by
casts every device implements, and values rounded to the storage form of their dtype."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.encode import to_index, to_storage


def test_feature_ids_convert_exactly_to_both_index_dtypes():
    ids = torch.arange(0, 1 << 16)
    np.testing.assert_array_equal(to_index(ids, np.dtype("<u2")).numpy(), np.arange(1 << 16, dtype=np.uint16))
    wide = torch.tensor([0, 65_535, 65_536, 1_000_000, 2**31 - 1])
    np.testing.assert_array_equal(to_index(wide, np.dtype("<u4")).numpy(), wide.numpy().astype(np.uint32))


def test_bfloat16_values_travel_as_their_bits():
    values = torch.tensor([1.617, -0.003, 3.0e4, 1e-8])
    bits = to_storage(values, "bfloat16").numpy()
    assert bits.dtype == np.uint16
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(decoded, values.to(torch.bfloat16).float().numpy())
