"""The token-sized shard plan: shards of whole windows that, read one by one, give exactly the
dataset's windows, for any shard size and --max-tokens cut (rows longer than a shard, empty rows,
rows shorter than a window, a cut inside a row)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.dataset import make_windows, plan_shards

ROW_TOKENS = np.array([10, 0, 0, 3, 25, 0, 7, 1, 40])  # row 8 spans many shards of 8 tokens


def windows_by_shard(token_lists, shards, context_size, bos_id):
    return [make_windows(token_lists[s.row_start:s.row_stop], range(s.row_start, s.row_stop), context_size, bos_id,
                         s.token_limit, s.window_start, s.n_windows) for s in shards]


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("shard_tokens", [1, 8, 13, 1000])
@pytest.mark.parametrize("max_tokens", [None, 1, 20, 21, 62, 10_000])
def test_shards_read_in_order_are_the_dataset_windows(bos, shard_tokens, max_tokens):
    rng = np.random.default_rng(0)
    token_lists = [rng.integers(5, 100, n) for n in ROW_TOKENS]
    bos_id = 1 if bos else None
    # the row counts arrive in blocks, as the driver counts them
    shards = plan_shards(iter([ROW_TOKENS[:4], ROW_TOKENS[4:]]), 4, bos, shard_tokens, max_tokens)
    whole = make_windows(token_lists, range(len(token_lists)), 4, bos_id, max_tokens)
    parts = windows_by_shard(token_lists, shards, 4, bos_id)

    assert [s.shard_id for s in shards] == list(range(len(shards)))
    assert all(p.n_tokens == s.n_tokens and len(p.lengths) == s.n_windows for p, s in zip(parts, shards))
    for name in ("rows", "positions"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))
    np.testing.assert_array_equal(np.concatenate([p.flat_tokens() for p in parts]), whole.flat_tokens())
    assert sum(s.n_tokens for s in shards) == whole.n_tokens == min(max_tokens or np.inf, whole.n_tokens)
    # consecutive shards share a row exactly when the later one starts inside it; no row is skipped
    assert shards[0].row_start == 0
    assert all(a.row_stop - (b.window_start > 0) == b.row_start for a, b in zip(shards, shards[1:]))
    # a shard holds whole windows, about shard_tokens of them: at most shard_tokens plus one window
    assert all(s.n_tokens <= max(shard_tokens, 1) + 3 + bos for s in shards)
    assert [s.token_limit is not None for s in shards].count(True) <= 1


def test_max_tokens_reads_only_the_counts_it_needs():
    blocks_read = []

    def counted():
        for block in ([5] * 10, [5] * 10, [5] * 10):
            blocks_read.append(block)
            yield np.array(block)

    shards = plan_shards(counted(), 8, False, 16, max_tokens=42)
    assert len(blocks_read) == 1 and sum(s.n_tokens for s in shards) == 42
    cut = shards[-1]
    assert cut.token_limit == 42 - (sum(s.n_tokens for s in shards[:-1])) and cut.n_tokens == cut.token_limit


def test_a_long_row_spans_shards_with_its_positions():
    shards = plan_shards(iter([np.array([100])]), 10, True, 30)
    assert len(shards) == 4 and all((s.row_start, s.row_stop) == (0, 1) for s in shards)
    assert [s.window_start for s in shards] == [0, 3, 6, 9] and [s.n_windows for s in shards] == [3, 3, 3, 3]
    parts = windows_by_shard([np.arange(100)], shards, 10, 1)
    body = np.concatenate([p.positions for p in parts])
    np.testing.assert_array_equal(body[body >= 0], np.arange(100))
