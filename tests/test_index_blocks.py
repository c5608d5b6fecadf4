"""An index whose parts were written in different chunk and checksum-block sizes (an index begun by
format 2.0, in blocks of 2^16 entries, and finished by 2.1, in 2^18) reads as one: readers take each
part's block size from its marker and each array's chunks from its metadata, never from the writer's
constant."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from store import format as fmt
from store import index
from store.location import open_root
from tests.test_store_format import write_synthetic


def test_parts_of_other_block_sizes_read_as_the_writer_wrote_them(tmp_path, monkeypatch):
    m = sp.random(600, 40, density=0.4, format="csr", random_state=3, dtype=np.float32)
    m.data = np.round(m.data * 4) / 4 + 0.25  # many ties, all above 0
    write_synthetic(tmp_path / "s.zarr", [m[:250], m[250:]])
    location = str(tmp_path / "s.zarr")
    shards = open_root(location, mode="r").attrs[fmt.ATTRS_KEY]["shards"]
    counts = np.bincount(m.indices, minlength=40)
    parts, _ = index.begin(location, "h", counts, shards, "float32", index.plan_parts(counts, 3))
    for part, block in zip(parts, (16, 1 << 18, 100)):  # blocks far smaller than a part, and larger
        monkeypatch.setattr(index, "CHUNK", block)
        marker = index.build_part(location, "h", part, shards, "<u4")
        assert marker["checksum_block"] == block
    index.finalize(location, "h")
    monkeypatch.undo()  # read with the writer's constant back at 2^18, which fits none of the parts but one

    reader = index.open_index(open_root(location, mode="r"), "h", shards, location)
    assert reader is not None
    columns = m.tocsc()
    for feature in range(40):
        tokens = columns.indices[columns.indptr[feature]:columns.indptr[feature + 1]]
        values = columns.data[columns.indptr[feature]:columns.indptr[feature + 1]]
        order = np.lexsort((tokens, -values))  # highest first, earlier token first on ties
        got_tokens, got_values = reader.entries(feature)
        np.testing.assert_array_equal(got_tokens, tokens[order])
        np.testing.assert_array_equal(got_values, values[order])
        some_tokens, some_values = reader.entries(feature, 3, 9)
        np.testing.assert_array_equal(some_tokens, tokens[order][3:9])
        np.testing.assert_array_equal(some_values, values[order][3:9])
    block_indptr, block_tokens, block_values = reader.feature_block(5, 33)  # across all three parts
    np.testing.assert_array_equal(block_indptr, columns.indptr[5:34] - columns.indptr[5])
    np.testing.assert_array_equal(np.sort(block_tokens), np.sort(columns.indices[columns.indptr[5]:columns.indptr[33]]))
    np.testing.assert_array_equal(np.sort(block_values), np.sort(columns.data[columns.indptr[5]:columns.indptr[33]]))
