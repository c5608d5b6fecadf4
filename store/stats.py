"""Per-feature statistics: computed per shard by the workers, merged exactly by the driver.

For every SAE and feature: the count of tokens where it fires, the sum and sum of
squares of its activations, its maximum, its top-K activations with the token each
came from, and a histogram over fixed bin edges that are the same for every
shard, SAE and run. All are computed from the stored values (after rounding to the
value dtype), so they agree exactly with what queries read back. Merging adds
counts, sums and histograms, takes maxima, and keeps the K best of the union of
top-K lists; the result equals one pass over the whole store (sums up to float64
rounding). Ties in top-K are broken by the earlier token (lower token index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from store import checked, codecs, format as fmt

DEFAULT_TOP_K = 100
COMPACT_AT = 1 << 18  # top-K candidates an Accumulator gathers before it first compacts them
# Log2-spaced edges, 4 bins per octave from 2^-12 to 2^12, with open ends: data-independent,
# so histograms from different shards add exactly. Bin i holds edges[i] <= a < edges[i+1].
HIST_EDGES = np.concatenate([[-np.inf], 2.0 ** (np.arange(-48, 49) / 4), [np.inf]])
N_BINS = len(HIST_EDGES) - 1


@dataclass
class FeatureStats:
    """Statistics of one SAE's features over some tokens. Token indices are relative to those tokens."""

    count: np.ndarray  # int64 [d_sae]
    sum: np.ndarray  # float64 [d_sae]
    sum_sq: np.ndarray  # float64 [d_sae]
    max: np.ndarray  # float32 [d_sae]; 0 where a feature never fires
    top_value: np.ndarray  # float32 [d_sae, K], descending; NaN padding
    top_token: np.ndarray  # int64 [d_sae, K]; -1 padding
    hist: np.ndarray  # int64 [d_sae, N_BINS]

    @property
    def d_sae(self) -> int:
        return len(self.count)

    @property
    def top_k(self) -> int:
        return self.top_value.shape[1]


def descending_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the values' descending order (floats of any sign)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    ascending = np.where(bits & 0x80000000, ~bits, bits | 0x80000000)
    return ~ascending


def sort_by_feature_then_value(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The order that groups entries by feature, highest value first, earlier entry first on ties."""
    key = (features.astype(np.uint64) << np.uint64(32)) | descending_key(values).astype(np.uint64)
    return np.argsort(key, kind="stable")


def arrange_by_feature_then_value(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries, given in pieces of (features, stored values, non-negative tokens), grouped by feature,
    ascending, highest value first, earlier token first on ties: ``(features, stored, tokens)`` so
    arranged, whatever the pieces' order.

    Where the features' span, the values' bits and the tokens' bits fit in 64, each entry packs into
    one integer key, feature then value then token, and one in-place sort of the keys (numpy's
    vectorized sort) arranges them all, with no permutation to gather: in the index build, about
    twice as fast as the two stable radix passes and gathers it replaced. Else a lexicographic sort.
    ``pieces`` is not empty (its first piece gives the dtypes)."""
    dtypes = [a.dtype for a in pieces[0]]
    pieces = [piece for piece in pieces if len(piece[0])]
    if not pieces:
        return tuple(np.zeros(0, dtype) for dtype in dtypes)
    offset = min(int(piece[0].min()) for piece in pieces)  # Python ints: they cannot wrap round
    span_bits = (max(int(piece[0].max()) for piece in pieces) - offset).bit_length()
    token_bits = max(int(piece[2].max()) for piece in pieces).bit_length()
    value_bits = 8 * dtypes[1].itemsize
    if span_bits + value_bits + token_bits > 64:
        features, stored, tokens = (np.concatenate(arrays) for arrays in zip(*pieces))
        order = np.lexsort((tokens, _descending(stored), features))
        return features[order], stored[order], tokens[order]
    # Each piece packs straight into its stretch of the keys, in place: fresh memory costs a page
    # fault per page, about as much as the sort.
    key, at = np.empty(sum(len(piece[0]) for piece in pieces), np.uint64), 0
    for features, stored, tokens in pieces:
        stretch = key[at:at + len(features)]
        at += len(features)
        stretch[:] = features
        stretch -= np.uint64(offset)
        stretch <<= np.uint64(value_bits)
        stretch |= _descending(stored)
        stretch <<= np.uint64(token_bits)
        np.bitwise_or(stretch, tokens, out=stretch, dtype=np.uint64, casting="unsafe")
    key.sort()
    arranged_tokens = np.empty(len(key), dtypes[2])
    np.bitwise_and(key, np.uint64((1 << token_bits) - 1), out=arranged_tokens, dtype=np.uint64, casting="unsafe")
    key >>= np.uint64(token_bits)
    arranged = _descending(key.astype(f"u{value_bits // 8}")).view(dtypes[1])  # its own inverse
    key >>= np.uint64(value_bits)
    key += np.uint64(offset)
    arranged_features = np.empty(len(key), dtypes[0])
    np.copyto(arranged_features, key, casting="unsafe")
    return arranged_features, arranged, arranged_tokens


def _descending(stored: np.ndarray) -> np.ndarray:
    """Unsigned keys of the stored floats' bits (any width) that ascend as the values descend: a
    positive value's magnitude bits flip, a negative's stay. Applied twice, it gives the bits back."""
    bits = stored.view(f"u{stored.dtype.itemsize}")
    sign_shift = bits.dtype.type(8 * bits.itemsize - 1)
    magnitude = bits.dtype.type((1 << int(sign_shift)) - 1)
    return bits ^ (((bits >> sign_shift) - bits.dtype.type(1)) & magnitude)


def compute(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, d_sae: int,
            top_k: int = DEFAULT_TOP_K) -> FeatureStats:
    """Statistics of a CSR block (values as float32)."""
    tokens = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    features = indices.astype(np.int64)
    v64 = values.astype(np.float64)
    count = np.bincount(features, minlength=d_sae).astype(np.int64)
    stats = FeatureStats(
        count=count,
        sum=np.bincount(features, weights=v64, minlength=d_sae),
        sum_sq=np.bincount(features, weights=v64 * v64, minlength=d_sae),
        max=np.zeros(d_sae, np.float32),
        top_value=np.full((d_sae, top_k), np.nan, np.float32),
        top_token=np.full((d_sae, top_k), -1, np.int64),
        hist=np.zeros((d_sae, N_BINS), np.int64),
    )
    order = sort_by_feature_then_value(features, values)
    f_sorted = features[order]
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.arange(len(order)) - starts[f_sorted]  # position within the feature's run
    keep = rank < top_k
    stats.top_value[f_sorted[keep], rank[keep]] = values[order][keep]
    stats.top_token[f_sorted[keep], rank[keep]] = tokens[order][keep]
    fired = count > 0
    stats.max[fired] = stats.top_value[fired, 0]
    stats.hist[:] = _histogram(features, values, d_sae)
    return stats


def _histogram(features: np.ndarray, values: np.ndarray, d_sae: int) -> np.ndarray:
    bins = np.searchsorted(HIST_EDGES, values, side="right") - 1
    flat = np.bincount(features.astype(np.int64) * N_BINS + bins, minlength=d_sae * N_BINS)
    return flat.reshape(d_sae, N_BINS)


def bin_table(value_dtype: str) -> np.ndarray | None:
    """The histogram bin of every 16-bit stored value (None for float32): a lookup replaces a search."""
    if value_dtype == "float32":
        return None
    bits = np.arange(1 << 16, dtype=np.uint16)
    every = fmt.decode_values(bits.view(fmt.storage_dtype(value_dtype)), value_dtype)
    with np.errstate(invalid="ignore"):  # the NaN bit patterns, which no SAE writes
        return (np.searchsorted(HIST_EDGES, every, side="right") - 1).astype(np.uint8)


class Accumulator:
    """One SAE's statistics over consecutive batches of tokens, fed in token order as they are encoded.

    ``result()`` equals ``compute`` over all the batches at once (sums up to float64 rounding), at a
    fraction of its cost: sums and histogram are added per batch (a feature's count is its histogram's
    total), and only the entries that can still reach a feature's top-K are kept and sorted. An entry
    cannot when its histogram bin is below the highest bin with K entries at or above it, or when it
    does not beat the K-th best value already kept (a later token loses a tie)."""

    def __init__(self, d_sae: int, value_dtype: str, top_k: int = DEFAULT_TOP_K):
        self.d_sae, self.value_dtype, self.top_k = d_sae, value_dtype, top_k
        self.n_tokens = 0
        self.sum = np.zeros(d_sae)
        self.sum_sq = np.zeros(d_sae)
        self.hist = np.zeros((d_sae, N_BINS), np.int64)
        self._bins = bin_table(value_dtype)
        self._kth = np.full(d_sae, -np.inf, np.float32)  # what an entry must beat to enter a full top-K
        self._kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # candidates (feature, stored, token)
        self._n_kept = self._compacted = 0

    def add(self, counts: np.ndarray, indices: np.ndarray, stored: np.ndarray) -> None:
        """A batch of ``len(counts)`` tokens: each token's number of entries, then their features and
        stored values, token by token."""
        d_sae = self.d_sae
        if len(indices):
            features = indices.astype(np.intp)
            values = fmt.decode_values(stored, self.value_dtype)
            bins = (np.searchsorted(HIST_EDGES, values, side="right") - 1 if self._bins is None
                    else self._bins[stored.view(np.uint16)])
            v64 = values.astype(np.float64)
            self.sum += np.bincount(features, weights=v64, minlength=d_sae)
            self.sum_sq += np.bincount(features, weights=v64 * v64, minlength=d_sae)
            self.hist += np.bincount(features * N_BINS + bins, minlength=d_sae * N_BINS).reshape(d_sae, N_BINS)
            # Per feature, the highest bin with at least K entries at or above it (-1: fewer than K in all).
            at_or_above = np.cumsum(self.hist[:, ::-1], axis=1)[:, ::-1]
            floor = (at_or_above >= self.top_k).sum(axis=1) - 1
            keep = np.flatnonzero((bins >= floor[features]) & (values > self._kth[features]))
            tokens = np.searchsorted(np.cumsum(counts), keep, side="right") + self.n_tokens
            self.keep(features[keep], stored[keep], tokens)
        self.n_tokens += len(counts)

    @property
    def kth(self) -> np.ndarray:
        """Per feature, what an entry must beat to enter its full top-K list (-inf until full). It
        only rises, so an older copy of it prunes less, never wrongly."""
        return self._kth

    def keep(self, features: np.ndarray, stored: np.ndarray, tokens: np.ndarray) -> None:
        """Candidates for the top-K lists (features, stored values, tokens), in token order; ``add``
        picks them from a batch, or the device that encoded it does (``pipeline.device_stats``)."""
        self._kept.append((features, stored, tokens))
        self._n_kept += len(features)
        if self._n_kept > max(COMPACT_AT, 2 * self._compacted):
            self._compact()

    def add_totals(self, sums: np.ndarray, sums_sq: np.ndarray, hist: np.ndarray, n_tokens: int) -> None:
        """Sums and histogram of ``n_tokens`` tokens accumulated elsewhere, whose candidates went to ``keep``."""
        self.sum += sums
        self.sum_sq += sums_sq
        self.hist += hist
        self.n_tokens += n_tokens

    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Keep each feature's K best candidates (earlier token first on ties); returns them grouped by
        feature, best first, with each one's rank."""
        features, stored, tokens = arrange_by_feature_then_value(
            self._kept or [(np.zeros(0, np.intp), np.zeros(0, fmt.storage_dtype(self.value_dtype)), np.zeros(0, np.int64))])
        runs = np.bincount(features, minlength=self.d_sae)
        rank = np.arange(len(features)) - np.repeat(np.cumsum(runs) - runs, runs)
        best = rank < self.top_k
        features, stored, tokens, rank = features[best], stored[best], tokens[best], rank[best]
        full = rank == self.top_k - 1
        self._kth[features[full]] = fmt.decode_values(stored[full], self.value_dtype)
        self._kept, self._n_kept = [(features, stored, tokens)], len(features)
        self._compacted = self._n_kept
        return features, stored, tokens, rank

    def result(self) -> FeatureStats:
        features, stored, tokens, rank = self._compact()
        stats = FeatureStats(
            count=self.hist.sum(axis=1), sum=self.sum.copy(), sum_sq=self.sum_sq.copy(),
            max=np.zeros(self.d_sae, np.float32),
            top_value=np.full((self.d_sae, self.top_k), np.nan, np.float32),
            top_token=np.full((self.d_sae, self.top_k), -1, np.int64),
            hist=self.hist.copy(),
        )
        stats.top_value[features, rank] = fmt.decode_values(stored, self.value_dtype)
        stats.top_token[features, rank] = tokens
        fired = stats.count > 0
        stats.max[fired] = stats.top_value[fired, 0]
        return stats


def empty(d_sae: int, top_k: int = DEFAULT_TOP_K) -> FeatureStats:
    return compute(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), d_sae, top_k)


def merge(parts: list[tuple[FeatureStats, int]]) -> FeatureStats:
    """Merge statistics of consecutive token ranges, given each with its first token's index."""
    first, _ = parts[0]
    d_sae, top_k = first.d_sae, first.top_k
    merged = FeatureStats(
        count=np.zeros(d_sae, np.int64), sum=np.zeros(d_sae), sum_sq=np.zeros(d_sae),
        max=np.zeros(d_sae, np.float32), top_value=np.full((d_sae, top_k), np.nan, np.float32),
        top_token=np.full((d_sae, top_k), -1, np.int64), hist=np.zeros((d_sae, N_BINS), np.int64),
    )
    candidates_v, candidates_t = [], []
    for stats, offset in parts:
        merged.count += stats.count
        merged.sum += stats.sum
        merged.sum_sq += stats.sum_sq
        merged.hist += stats.hist
        np.maximum(merged.max, stats.max, out=merged.max)
        candidates_v.append(stats.top_value)
        candidates_t.append(np.where(stats.top_token >= 0, stats.top_token + offset, -1))
    values = np.concatenate(candidates_v, axis=1)  # [d_sae, K * n_parts]
    tokens = np.concatenate(candidates_t, axis=1)
    # Best first: by value descending, then token ascending; padding (token -1) last.
    key_tok = np.where(tokens >= 0, tokens, np.iinfo(np.int64).max)
    key_val = np.where(tokens >= 0, descending_key(np.nan_to_num(values)), np.iinfo(np.uint32).max)
    order = np.lexsort((key_tok, key_val), axis=1)[:, :top_k]
    merged.top_value = np.take_along_axis(values, order, axis=1)
    merged.top_token = np.take_along_axis(tokens, order, axis=1)
    return merged


# -- on disk -----------------------------------------------------------------------------------

DENSE = ("count", "sum", "sum_sq", "max")
MERGED = (*DENSE, "top_value", "top_token", "hist")  # the arrays of stats/<name>


def element(stats: FeatureStats, value_dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The attributes and arrays (by name) of a shard SAE's ``stats`` subgroup, for its writer.

    Compact, since the shard's own arrays already hold every value: a feature's top-K list
    (feature-major, best first, ``min(count, K)`` entries each) keeps shard-local token indices
    and values in the value dtype; histogram counts are kept only for features with more than
    K entries, the others being exactly the histogram of their complete top-K list."""
    attributes = {**fmt.encoding(fmt.STATS_ENCODING), "top_k": stats.top_k, "hist_edges_log2": [-12, 12, 4]}
    filled = stats.top_token >= 0
    large = stats.count > stats.top_k
    nz = np.nonzero(stats.hist * large[:, None])
    arrays = {
        **{name: getattr(stats, name) for name in DENSE},
        "top_token": stats.top_token[filled].astype("<u4"),
        "top_value": _encode(stats.top_value[filled], value_dtype),
        "hist_feature": nz[0].astype("<u4"),
        "hist_bin": nz[1].astype("u1"),
        "hist_count": stats.hist[nz].astype("<u4"),
    }
    return attributes, arrays


def _encode(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """float32 values that are already rounded to ``value_dtype``, in its storage form (exact)."""
    if value_dtype == "bfloat16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(fmt.storage_dtype(value_dtype))


def read(root: zarr.Group, shard: dict, sae: str, d_sae: int, value_dtype: str, location: str) -> FeatureStats:
    """One shard's statistics of one SAE; ``shard`` is its completion marker, whose checksums (when
    it has them) every array is checked against, so damage is not merged into the store's."""
    within = f"{fmt.SAES_GROUP}/{sae}/{fmt.STATS_GROUP}"  # the marker's checksums are keyed by path in the shard
    base, sums = f"{fmt.shard_path(shard['shard_id'])}/{within}", shard.get("checksums", {})

    def array(name: str) -> np.ndarray:
        return checked.read_whole(root, f"{base}/{name}", location, sums.get(f"{within}/{name}"))

    try:
        top_k = checked.open_node(root, base, location).attrs[fmt.ATTRS_KEY]["top_k"]
    except KeyError:
        raise checked.corrupt(location, base, "the shard's statistics are missing") from None
    stats = FeatureStats(
        **{name: array(name) for name in DENSE},
        top_value=np.full((d_sae, top_k), np.nan, np.float32),
        top_token=np.full((d_sae, top_k), -1, np.int64),
        hist=np.zeros((d_sae, N_BINS), np.int64),
    )
    kept = np.minimum(stats.count, top_k)
    feature = np.repeat(np.arange(d_sae), kept)
    rank = np.arange(len(feature)) - np.repeat(np.cumsum(kept) - kept, kept)
    values = fmt.decode_values(array("top_value"), value_dtype)
    stats.top_value[feature, rank] = values
    stats.top_token[feature, rank] = array("top_token")
    small = stats.count[feature] <= top_k
    stats.hist = _histogram(feature[small], values[small], d_sae)
    stats.hist[array("hist_feature"), array("hist_bin")] = array("hist_count")
    return stats


def merge_shards(location: str, shards: list[dict], sae: str, d_sae: int, value_dtype: str,
                 batch: int = 8) -> FeatureStats:
    """Merge the statistics of a store's shards (markers, in store order), a few shards at a time."""
    from store.location import open_root

    root = open_root(location, mode="r")
    merged, offset, pending = None, 0, []
    for marker in shards:
        pending.append((read(root, marker, sae, d_sae, value_dtype, location), offset))
        offset += marker["n_tokens"]
        if len(pending) == batch:
            merged, pending = merge(([(merged, 0)] if merged is not None else []) + pending), []
    if pending:
        merged = merge(([(merged, 0)] if merged is not None else []) + pending)
    return merged if merged is not None else empty(d_sae)


def write_merged(location: str, sae: str, stats: FeatureStats, n_tokens: int) -> None:
    """The store-wide statistics of one SAE, at ``stats/<name>`` (``sae``: its name)."""
    from store.location import open_root

    root = open_root(location, mode="a")
    parent = root.require_group(fmt.STATS_GROUP)
    if sae in parent:
        del parent[sae]
    arrays = {name: np.ascontiguousarray(getattr(stats, name)) for name in MERGED}
    group = parent.create_group(sae, attributes={fmt.ATTRS_KEY: {
        **fmt.encoding(fmt.STATS_ENCODING), "top_k": stats.top_k, "n_tokens": n_tokens,
        "hist_edges_log2": [-12, 12, 4], "checksums": {name: checked.checksum(a) for name, a in arrays.items()}}})
    rows = 256  # features per chunk: one feature's top-K or histogram is one small read
    for name, data in arrays.items():
        chunks = (1 << 16,) if data.ndim == 1 else (rows, data.shape[1])
        group.create_array(name, data=data, chunks=chunks, compressors=codecs.VALUES.compressors())


def read_merged(location: str, sae: str) -> FeatureStats:
    """The store-wide statistics of one SAE, each array checked against the checksum recorded with
    it (stores of format 1.1 recorded none: read as they are)."""
    from store.location import open_root

    root = open_root(location, mode="r")
    path = f"{fmt.STATS_GROUP}/{sae}"
    try:
        attrs = checked.open_node(root, path, location).attrs.asdict().get(fmt.ATTRS_KEY, {})
    except KeyError:
        raise checked.corrupt(location, path, "the merged statistics are missing from a complete store") from None
    sums = attrs.get("checksums", {})
    return FeatureStats(**{name: checked.read_whole(root, f"{path}/{name}", location, sums.get(name))
                           for name in MERGED})
