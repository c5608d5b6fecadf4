"""Checked reads: each block of an array is compared with the crc32 recorded for it, the first time
a read touches it, so that damage raises StoreCorruptError naming the part instead of returning
wrong numbers (whole stores: tests/test_verify.py)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from store.checked import CheckedArray, block_checksums, checksum
from store.errors import StoreCorruptError

DATA = np.arange(100, 110, dtype="<u4")  # blocks of 4: [0, 4), [4, 8), [8, 10)


def stored(tmp_path, chunks: int = 4) -> zarr.Array:
    array = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array("a", shape=DATA.shape, dtype=DATA.dtype,
                                                                             chunks=(chunks,), fill_value=0)
    array[:] = DATA
    return array


def test_a_read_checks_only_the_blocks_it_touches(tmp_path):
    array = stored(tmp_path)
    array[9] = 7  # damage that decodes cleanly, in the last block
    checked = CheckedArray(array, "index/h/parts/0/token", "S.zarr", block_checksums(DATA, 4), block=4)
    np.testing.assert_array_equal(checked[1:6], DATA[1:6])
    assert checked.checked == {0, 1}
    np.testing.assert_array_equal(checked[4:8:2], DATA[4:8:2])
    with pytest.raises(StoreCorruptError, match=r"S\.zarr: index/h/parts/0/token is damaged: the checksum of its "
                                                r"entries 8 to 9 is crc32:\w+, but crc32:\w+ was recorded .*"
                                                r"delete index/ and run `latentstore index S\.zarr`"):
        checked[7:9]
    assert checked.checked == {0, 1}


def test_one_checksum_for_the_whole_array(tmp_path):
    array = stored(tmp_path, chunks=10)
    checked = CheckedArray(array, "shards/000003/row", "S.zarr", [checksum(DATA)])
    np.testing.assert_array_equal(checked[2:3], DATA[2:3])
    array[0] = 7
    np.testing.assert_array_equal(checked[0:1], [7])  # checked once: later reads go straight to zarr
    fresh = CheckedArray(array, "shards/000003/row", "S.zarr", [checksum(DATA)])
    with pytest.raises(StoreCorruptError, match=r"shards/000003/row is damaged: its checksum is .* delete "
                                                r"shards/000003 and rerun the same `latentstore extract`"):
        fresh[5:6]


def test_a_missing_chunk_is_damage_not_zeros(tmp_path):
    array = stored(tmp_path)
    (tmp_path / "s.zarr" / "a" / "c" / "1").unlink()
    checked = CheckedArray(array, "stats/h/count", "S.zarr", block_checksums(DATA, 4), block=4)
    np.testing.assert_array_equal(checked[0:4], DATA[0:4])
    with pytest.raises(StoreCorruptError, match=r"stats/h/count is damaged: the checksum of its entries 4 to 7 .* "
                                                r"rerun the same `latentstore extract` command: it keeps the shards"):
        checked[3:5]


def test_more_entries_than_checksums_is_damage(tmp_path):
    array = stored(tmp_path)
    checked = CheckedArray(array, "index/h/parts/0/values", "S.zarr", block_checksums(DATA[:8], 4), block=4)
    with pytest.raises(StoreCorruptError, match=r"it holds 10 entries, more than the 2 checksummed blocks of 4"):
        checked[6:10]


def test_without_recorded_checksums_reads_are_unchecked(tmp_path):
    """Arrays of stores written before their checksums were recorded (format 1.1) read as they are."""
    array = stored(tmp_path)
    array[9] = 7
    np.testing.assert_array_equal(CheckedArray(array, "stats/h/count", "S.zarr", None)[8:10], [108, 7])
