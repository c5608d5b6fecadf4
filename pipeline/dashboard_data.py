"""Per-feature dashboard data, computed from a store and the weights, never from a forward pass.

What SAEDashboard and sae_vis show for a feature, made from what the store already holds:
top examples, example groups over the activation range, the activation histogram, the
density, the features that fire on the same tokens or correlate most with it over the whole
store (SAEDashboard's correlated-features table), and the logit table and histogram of
``W_dec[f] @ W_U`` (the only part that needs weights: the SAE's decoder and the model's
unembedding, no forward pass).

``DashboardBuilder`` works on blocks of features at once: it reads the SAE's activations
from the store once, takes a block's columns as one sparse matrix, and computes every
feature of the block from it, so that a whole SAE costs about one pass over the store. A
block's numbers are arrays made on worker threads (numpy's sorts and bisections let go of the
GIL), two blocks at a time, while the block before them becomes Python objects.
Its numbers are the store queries' numbers (``FeatureStore.top_activations``,
``quantile_samples``, ``histogram``, ``cofiring``), with the same conventions: examples
highest first, ties by earlier token; special tokens left out when asked; the same random
draws for the groups.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from store import FeatureStore
from store.arguments import is_context, is_whole
from store.errors import ConfigError
from store.sampling import METHODS, concatenated_ranges, count_leading, draw_ranks, linspace_rows, many_group_slices

BLOCK_FEATURES = 256  # features computed together: bounds the block's co-firing matrix
# correlated features' sums of products: one dense Gram matrix (float32 BLAS over chunks of tokens,
# summed in float64) when the SAE is this narrow and BLAS would beat the sparse product, whose
# cost grows with L0 squared; scipy's sparse product makes about 1/1000 of BLAS's multiply-adds a second
DENSE_GRAM_MAX_FEATURES = 4096
DENSE_GRAM_SPEEDUP = 500
AHEAD = 2  # blocks whose numbers are made at once, on as many threads


@dataclass(frozen=True)
class DashboardSettings:
    """What goes on a feature's dashboard. Defaults are SAEDashboard's."""

    n_top: int = 20  # top examples
    n_groups: int = 10  # example groups below the top examples
    per_group: int = 5  # examples drawn from each group
    group_method: Literal["interval", "rank"] = "interval"  # SAEDashboard's equal-width intervals, or true quantiles
    n_bins: int = 50  # bins of the activation and logit histograms
    n_logits: int = 10  # rows of each side of the logit table
    n_cofiring: int = 10  # co-firing features listed; 0 skips them (their sparse product grows as L0 squared)
    n_correlated: int = 0  # features listed by Pearson correlation over the whole store (SAEDashboard's 3); 0 skips
    context: tuple[int, int] | None = None  # tokens left and right of the active one; None: its whole window
    exclude_special_tokens: bool = True  # leave BOS, EOS and padding tokens out of examples and histograms
    seed: int = 0  # of the group draws, as in FeatureStore.quantile_samples

    def __post_init__(self) -> None:
        problems = []
        if self.group_method not in METHODS:
            problems.append(f"group_method {self.group_method!r} is not 'interval' or 'rank'.")
        for name in ("n_top", "n_groups", "per_group", "n_bins", "n_logits", "n_cofiring", "n_correlated", "seed"):
            value, least = getattr(self, name), 1 if name == "n_bins" else 0
            if not is_whole(value) or value < least:
                problems.append(f"{name}={value!r} must be a whole number of at least {least}.")
        if self.context is not None and not is_context(self.context):
            # a negative one would slice the window from its end: another token's context, silently
            problems.append(f"context={self.context!r} must be two whole numbers of at least 0 (tokens left and "
                            "right), or None for the whole window.")
        if problems:
            raise ConfigError(problems)


@dataclass(slots=True)
class Example:
    """One activating token and the text around it, all from the store."""

    token_index: int  # in store order
    row: int  # dataset row
    pos: int  # position in the row's tokenization (-1: a BOS latentstore added)
    activation: float
    token_ids: np.ndarray  # the context, within the token's window
    values: np.ndarray  # float32: the feature's activation at each context token
    active: int  # which context token is this example's token


@dataclass(slots=True)
class ExampleGroup:
    """Top examples (``kind="top"``) or examples drawn from one slice of the activations."""

    kind: Literal["top", "interval", "rank"]
    bin_min: float  # smallest activation in the slice (top: the smallest shown)
    bin_max: float  # largest activation in the slice
    bin_contains: float  # fraction of the feature's counted activations in the slice
    examples: list[Example]
    # interval groups only, as SAEDashboard titles them: the interval's bounds [lower, upper] of
    # [0, max], and how many of all the store's tokens have an activation within them, both ends
    # included (the lowest interval, from 0, counts every token where the feature is 0)
    interval: tuple[float, float] | None = None
    n_tokens_within: int = 0


@dataclass
class LogitTable:
    """``W_dec[f] @ W_U``: the tokens whose logits the feature raises and lowers most, and the histogram."""

    top_ids: list[int]
    top_values: list[float]
    bottom_ids: list[int]  # most negative first
    bottom_values: list[float]
    hist_centers: list[float]
    hist_counts: list[int]


@dataclass
class CorrelatedFeatures:
    """The features whose activations correlate most with this one over every token of the store
    (zeros included), as SAEDashboard's feature table defines them: Pearson's r, and the cosine
    similarity of the two activation vectors (SAEDashboard's ``correlated_features_l1``), each with
    SAEDashboard's 1e-6 added to its denominator. Highest r first, ties by lower feature. Features
    that never fire have no correlation (it is undefined) and are never listed."""

    indices: list[int]
    pearson: list[float]
    cosine: list[float]


@dataclass
class FeatureDashboard:
    feature: int
    n_fired: int  # counted activations (special tokens left out when the settings say so)
    frac_nonzero: float  # n_fired / tokens in the store, at full precision
    max: float
    groups: list[ExampleGroup]
    hist_centers: list[float]  # of the activation histogram, over [min, max] of counted activations
    hist_counts: list[int]
    cofiring: list[dict[str, Any]]  # feature, count, fraction, jaccard, as FeatureStore.cofiring
    logits: LogitTable | None = None
    correlated: CorrelatedFeatures | None = None  # when the settings ask for n_correlated
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogitWeights:
    """The SAE's decoder and the model's effective unembedding, as float32 arrays."""

    W_dec: np.ndarray  # [d_sae, d_model]
    W_U: np.ndarray  # [d_model, d_vocab]


def effective_unembed(W_U: Any, ln_final_w: Any | None, normalization_type: str | None) -> Any:
    """``W_U`` as SAEDashboard sees it: with the final layer norm folded in and centred.

    SAEDashboard multiplies by ``model.W_U`` of a model loaded with TransformerLens's
    ``from_pretrained``, which folds ``ln_final``'s scale into ``W_U``, centres it over
    ``d_model`` (an LN centres its input) and over the vocabulary. A local model may hold
    its layer norm unfolded, so the same processing is applied here. Already processed
    weights (``LNPre``/``RMSPre``, centred) come out unchanged."""
    W_U = W_U.detach().float()
    if normalization_type in ("LN", "RMS"):  # ln_final's scale is still a separate weight
        W_U = ln_final_w.detach().float()[:, None] * W_U
        if normalization_type == "LN":
            W_U = W_U - W_U.mean(0, keepdim=True)
    return W_U - W_U.mean(-1, keepdim=True)


def model_unembed(name: str, device: str = "cpu") -> Any:
    """The effective ``W_U`` of a model: read from a local model's weights file (two tensors, no
    model built), or from a hub model loaded as TransformerLens loads it."""
    from pathlib import Path

    from pipeline.models import WEIGHTS_FILE, is_local_model, load_model, load_model_config

    if is_local_model(name):
        from safetensors import safe_open

        cfg = load_model_config(name)
        with safe_open(str(Path(name) / WEIGHTS_FILE), framework="pt") as weights:
            ln_w = weights.get_tensor("ln_final.w") if "ln_final.w" in weights.keys() else None
            return effective_unembed(weights.get_tensor("unembed.W_U"), ln_w, cfg.normalization_type)
    model = load_model(name, device=device)
    return effective_unembed(model.W_U, getattr(model.ln_final, "w", None), model.cfg.normalization_type)


def output_hook(record: dict) -> str:
    """Where an SAE's decoder writes, from its run-record entry: a transcoder's output hook, else the
    hook it reads."""
    return record.get("hook_out") or record["hook"]


def load_decoder(fs: FeatureStore, sae: str, device: str = "cpu") -> Any:
    """The SAE's ``W_dec`` (a float32 tensor ``[d_sae, d_out]``), loaded as recorded in the store;
    ``sae`` is its name, or the hook where it is the only SAE."""
    from pipeline.saes import SAESource, load_sae

    source = fs.sae_record(sae)["source"]  # an unknown name or a shared hook: a ConfigError naming the SAEs
    return load_sae(SAESource.parse(source), device=device).W_dec.detach().float()


def load_logit_weights(fs: FeatureStore, sae: str, device: str = "cpu", W_dec: Any | None = None) -> LogitWeights:
    """Load the SAE (for ``W_dec``, unless given) and the model's unembedding, as recorded in the store.
    The decoder writes at its output hook (a transcoder's differs from the hook it reads), so the
    logit tables exist when that hook is as wide as the residual stream."""
    record = fs.sae_record(sae)
    W_dec = load_decoder(fs, sae, device) if W_dec is None else W_dec
    W_U = model_unembed(fs.run["model"]["name"], device)
    if W_dec.shape[1] != W_U.shape[0]:
        raise ConfigError(
            f"SAE {record['name']}: its decoder writes vectors of size {W_dec.shape[1]} at {output_hook(record)}, "
            f"not the residual stream's {W_U.shape[0]}, so W_dec @ W_U has no meaning for it. Leave the logit "
            "tables out (--no-logits)."
        )
    return LogitWeights(W_dec.cpu().numpy(), W_U.cpu().numpy())


def checked_features(fs: FeatureStore, sae: str, features: range | None) -> range:
    """The features to build (all of the SAE's by default), refused if they run past its width."""
    d_sae = fs.d_sae(sae)
    features = features or range(d_sae)
    if features.stop > d_sae:
        raise ConfigError(f"--features {features.start}:{features.stop} goes past SAE {fs.resolve(sae)}'s {d_sae} "
                          f"features; give a STOP of at most {d_sae}.")
    return features


def window_starts(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The token index where each window starts, as the store's queries draw windows: a window
    starts at a new row, at a BOS (pos -1), or where positions do not follow on."""
    starts = np.ones(len(rows), bool)
    starts[1:] = ((rows[1:] != rows[:-1]) | (positions[1:] == -1)
                  | ((positions[1:] != positions[:-1] + 1) & (positions[:-1] != -1)))
    return np.flatnonzero(starts)


def ranked(column: np.ndarray, tokens: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (tokens, values) of each column ranked highest first, earlier token first on ties.
    ``column`` ascends; values are above 0, so they order as their float32 bits do.

    Values that are bfloat16 (the store's default) have 16-bit keys, so two stable radix passes over
    16-bit keys rank them: by value, then by column (the entries come in column then token order, so
    ties keep the earlier token first); about twice as fast as one sort of packed 64-bit keys. Others
    sort a (column, value) key stably."""
    bits = values.view(np.uint32)
    if not (bits & 0xFFFF).any() and column.max(initial=0) < 2**16:
        by_value = np.argsort(~(bits >> 16).astype(np.uint16), kind="stable")  # highest first
        order = by_value[np.argsort(column.astype(np.uint16)[by_value], kind="stable")]
        return tokens[order].astype(np.int64), values[order]
    key = (column.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - bits.astype(np.uint64))
    order = np.argsort(key, kind="stable")
    return tokens[order].astype(np.int64), values[order]


def dense_gram(rows: sp.csr_matrix, chunk_entries: int = 1 << 24,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``rows.T @ rows`` as a dense float64 ``[features, features]`` array, and each feature's sum
    over the rows (the sums of squares are its diagonal). BLAS's ``ssyrk`` multiplies float32 chunks
    of ``chunk_entries`` dense values, only on and above the diagonal (half the multiply-adds, at
    about GEMM's speed: 1.5 times torch's products of blocks above it, measured), and each chunk's
    products and sums are added in float64. One chunk buffer serves every chunk: fresh pages cost
    as much as the products here. It grows with tokens times features squared (a minute or more for
    millions of tokens), hence the progress bar."""
    from scipy.linalg.blas import sgemv, ssyrk

    n, d = rows.shape
    gram, sums = np.zeros((d, d), order="F"), np.zeros(d)  # in BLAS's order, so that adding its products streams
    step = max(1, chunk_entries // max(1, d))
    buffer, ones = np.empty((min(step, n), d), np.float32), np.ones(min(step, n), np.float32)
    products = np.zeros((d, d), np.float32, order="F")  # BLAS writes its upper triangle only: the rest stays 0
    bar = tqdm(total=n, desc="correlated features (Gram matrix)", unit="token", unit_scale=True, disable=not progress)
    for start in range(0, n, step):
        chunk = rows[start:start + step]
        dense = buffer[:chunk.shape[0]]  # the leading rows of a C-ordered array: contiguous
        chunk.astype(np.float32, copy=False).toarray(out=dense)
        gram += ssyrk(1.0, dense.T, beta=0.0, c=products, trans=0, overwrite_c=1)  # dense.T @ dense
        sums += sgemv(1.0, dense.T, ones[:len(dense)])  # scipy's BLAS too: numpy's has threads of its own, which spin
        bar.update(len(dense))
    bar.close()
    for a in range(0, d, BLOCK_FEATURES):  # the lower triangle from the upper, a block of columns at a time
        gram[a:, a:a + BLOCK_FEATURES] += np.triu(gram[a:a + BLOCK_FEATURES, a:], 1).T
    return gram.T, sums  # symmetric: its transpose is the same matrix in rows (C order)


def pearsons_r(n: float, xy, sx, sx2, sy, sy2):
    """Pearson's r from sums over ``n`` tokens (of x, x^2, y, y^2 and x*y), with SAEDashboard's 1e-6
    added to the denominator; element-wise, so arrays broadcast."""
    return (n * xy - sx * sy) / (np.sqrt(np.maximum((n * sx2 - sx * sx) * (n * sy2 - sy * sy), 0)) + 1e-6)


def most_correlated(features: np.ndarray, row: np.ndarray, other: np.ndarray, xy: np.ndarray, sums: np.ndarray,
                    sums_sq: np.ndarray, n: float, k: int) -> list[CorrelatedFeatures]:
    """The ``k`` highest Pearson's r of each of ``features`` (``features[row]``) among its candidates
    ``other`` with sums of products ``xy``, over ``n`` tokens with these sums and sums of squares by
    feature; ties by lower feature. Those at or above each row's k-th highest r (a partition of the
    row's r, where it has more than k) are then ranked exactly."""
    pearson = pearsons_r(n, xy, sums[features[row]], sums_sq[features[row]], sums[other], sums_sq[other])
    counts = np.bincount(row, minlength=len(features))
    ends = np.cumsum(counts)
    by_row = pearson[np.argsort(row.astype(np.uint16), kind="stable")]  # a radix sort: a block has under 2^16 rows
    kth = np.full(len(features), -np.inf)
    for r in np.flatnonzero(counts > k):  # a few hundred rows at most; a row may hold every feature
        kth[r] = -np.partition(-by_row[ends[r] - counts[r]:ends[r]], k - 1)[k - 1]
    top = np.flatnonzero(pearson >= kth[row])
    order = top[np.lexsort((other[top], -pearson[top], row[top]))]
    row, other, pearson, xy = row[order], other[order], pearson[order], xy[order]
    keep = np.arange(len(row)) - np.searchsorted(row, row) < k
    row, other, pearson, xy = row[keep], other[keep], pearson[keep], xy[keep]
    cosine = xy / (np.sqrt(sums_sq[features[row]] * sums_sq[other]) + 1e-6)
    bounds = np.searchsorted(row, np.arange(len(features) + 1))
    other, pearson, cosine = other.tolist(), pearson.tolist(), cosine.tolist()
    return [CorrelatedFeatures(other[a:b], pearson[a:b], cosine[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class ApartOrder:
    """The features that fire, in the order of how high Pearson's r is with any feature they never
    co-fire with. For such a pair xy = 0, so r = -s_x s_y / (sqrt(v_x v_y) + 1e-6), with sums s and
    v = n sum_sq - s^2: highest for the features with the lowest key s_y / sqrt(v_y), save that the
    1e-6 shifts r by up to a factor 1 + 1e-6 / (sqrt(v_x) sqrt(v_y)) (every feature that fires once
    has the same key, up to rounding). So a feature's candidates are the first of the order that it
    does not co-fire with, and those after them whose key is within that factor; ``most_correlated``
    ranks them by r itself."""

    order: np.ndarray  # the features that fire, by key ascending (then variance, then feature)
    keys: np.ndarray  # their keys, ascending
    place: np.ndarray  # by feature: its place in ``order``; ``len(order)`` for one that never fires
    spread: np.ndarray  # by feature: sqrt(v), 0 for one that never fires
    least_spread: float  # the smallest sqrt(v) > 0 of a feature that fires

    @classmethod
    def of(cls, sums: np.ndarray, sums_sq: np.ndarray, n_tokens: int) -> ApartOrder:
        fires = np.flatnonzero(sums > 0)
        variance = n_tokens * sums_sq[fires] - sums[fires] ** 2
        key = np.where(variance > 0, sums[fires] / np.sqrt(np.maximum(variance, 1e-300)), np.inf)
        by_key = np.lexsort((fires, variance, key))
        place = np.full(len(sums), len(fires))
        place[fires[by_key]] = np.arange(len(fires))
        spread = np.zeros(len(sums))
        spread[fires] = np.sqrt(np.maximum(variance, 0))
        least = spread[spread > 0]
        return cls(fires[by_key], key[by_key], place, spread, float(least.min()) if len(least) else np.inf)

    def candidates(self, features: np.ndarray, row: np.ndarray, other: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, feature) pairs: for each of ``features`` that fires, the first ``k`` features of the
        order that are neither it nor one it co-fires with (``other[i]`` co-fires with
        ``features[row[i]]``), then the others up to its key bound; fewer where the order runs out. A row's i-th free place in the order is i plus the number
        of its taken places p_m (ascending, m from 0) with p_m - m <= i: one search for all rows."""
        n = len(self.order)
        rows = np.flatnonzero(self.place[features] < n)
        span = n + k + 1  # the keys of one row stay below the next row's
        taken = np.sort(np.concatenate([row, rows]) * span + np.concatenate([self.place[other], self.place[features[rows]]]))
        taken_row = taken // span
        starts = np.searchsorted(taken_row, np.arange(len(features) + 1))
        shifted = taken - (np.arange(len(taken)) - starts[taken_row])

        def free(row_of: np.ndarray, i: np.ndarray) -> np.ndarray:  # the place of each row's i-th free feature
            return i + np.searchsorted(shifted, row_of * span + i, side="right") - starts[row_of]

        n_free = n - (starts[rows + 1] - starts[rows])
        kth = free(rows, np.minimum(k, n_free) - 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # a spread of 0: every free feature is a candidate
            shift = 1e-6 / (self.spread[features[rows]] * self.least_spread)
        bound = self.keys[np.clip(kth, 0, max(n - 1, 0))] * (1 + shift + 1e-12)  # 1e-12: the keys' rounding
        within = np.searchsorted(self.keys, bound, side="right")  # the order's places up to the bound
        count = within - (np.searchsorted(taken, rows * span + within) - starts[rows])
        count = np.where(n_free > 0, np.maximum(count, np.minimum(k, n_free)), 0)
        wanted_row = np.repeat(rows, count)
        i = np.arange(len(wanted_row)) - np.repeat(np.cumsum(count) - count, count)
        return wanted_row, self.order[free(wanted_row, i)]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while making many small objects that hold no cycles,
    which it would otherwise scan again and again as they accumulate."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def histogram_edges(lows: np.ndarray, highs: np.ndarray, n_bins: int) -> np.ndarray:
    """``np.histogram(v, n_bins, range=(low, high))``'s bin edges for many ranges at once,
    ``[ranges, n_bins + 1]``: ``np.linspace``'s, an empty range widened to [x - 0.5, x + 0.5] as
    numpy widens it."""
    first, last = lows.astype(np.float64), highs.astype(np.float64)
    flat = first == last
    return linspace_rows(np.where(flat, first - 0.5, first), np.where(flat, last + 0.5, last), n_bins + 1)


def histogram_counts(descending: np.ndarray, bounds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.histogram``'s counts for many features at once: feature ``i``'s values (highest first)
    are ``descending[bounds[i]:bounds[i + 1]]``, all inside [edges[i, 0], edges[i, -1]]. Bins are
    [e_j, e_j+1), the last one closed, which numpy's edge corrections make its bins. Counted by
    bisecting for each edge instead of numpy's pass over every value."""
    n, per_row = np.diff(bounds), edges.shape[1]
    at_least = count_leading(descending, np.repeat(bounds[:-1], per_row), np.repeat(bounds[1:], per_row),
                             edges.ravel(), strict=False).reshape(edges.shape)
    below = n[:, None] - at_least
    below[:, -1] = n  # the last bin holds the maximum
    return np.diff(below, axis=1)


@dataclass
class _BlockNumbers:
    """A block's dashboards as arrays, made off the main thread; ``[features, ...]`` unless noted."""

    block: range
    n_fired: np.ndarray
    maxes: np.ndarray
    n_top: np.ndarray
    top_min: np.ndarray
    first: np.ndarray  # [features, n_groups]: each group's ranks [first, past)
    past: np.ndarray
    n_drawn: np.ndarray  # [features, n_groups]
    group_min: np.ndarray  # [features, n_groups]
    group_max: np.ndarray
    examples: dict[str, np.ndarray]  # per example, feature after feature: its top ones, then each group's
    centers: np.ndarray  # [features, n_bins]
    counts: np.ndarray
    mins: np.ndarray  # smallest counted activation (0 for a dead feature)
    intervals: np.ndarray | None  # interval groups: [features, n_groups, 3] of lower, upper, tokens within
    cofiring: sp.csr_matrix | None
    correlated: list[CorrelatedFeatures] | None
    logits: list[LogitTable] | None


class DashboardBuilder:
    """Dashboard data for one SAE's features, from a store (and the weights for the logit tables).
    ``progress``: a bar for the set-up's one long step, the correlated features' Gram matrix."""

    def __init__(self, fs: FeatureStore, sae: str, weights: LogitWeights | None = None,
                 settings: DashboardSettings = DashboardSettings(), progress: bool = False):
        self.fs, self.sae, self.weights, self.settings = fs, fs.resolve(sae), weights, settings
        self.d_sae = fs.d_sae(self.sae)
        if weights is not None and weights.W_dec.shape[0] != self.d_sae:
            raise ConfigError(f"SAE {self.sae}: the store has {self.d_sae} features but W_dec has "
                              f"{weights.W_dec.shape[0]} rows: the weights are not this run's SAE.")
        self.token_ids = fs.token_ids()
        provenance = fs.provenance()
        self.rows, self.positions = provenance["row"].to_numpy(), provenance["pos"].to_numpy()
        self._window_starts = np.append(window_starts(self.rows, self.positions), len(self.rows))
        # every counted activation (queries count those above 0), feature-major once for all blocks
        counted_rows = fs.csr(self.sae)
        if settings.exclude_special_tokens and fs.special_token_ids:
            special = np.flatnonzero(np.isin(self.token_ids, list(fs.special_token_ids)))
            counted_rows.data[concatenated_ranges(counted_rows.indptr[special], counted_rows.indptr[special + 1])] = 0
        fired = counted_rows.data > 0
        if not fired.all():
            counted_rows.data[~fired] = 0
            counted_rows.eliminate_zeros()
        self._columns = counted_rows.tocsc()  # tokens ascend within each feature
        self._valued = self._gram = None
        if settings.n_correlated:  # sums over every token for Pearson's r, products in float64
            per_token = np.diff(counted_rows.indptr).astype(np.float64)
            if (self.d_sae <= DENSE_GRAM_MAX_FEATURES
                    and len(per_token) * float(self.d_sae) ** 2 < DENSE_GRAM_SPEEDUP * float((per_token ** 2).sum())):
                self._gram, self._sum = dense_gram(counted_rows, progress=progress)
                self._sum_sq = self._gram.diagonal().copy()
            else:  # the sparse products, one block of features at a time
                values = counted_rows.data.astype(np.float64)
                features = counted_rows.indices.astype(np.intp)  # bincount converts other ids slowly
                self._sum = np.bincount(features, values, self.d_sae)
                self._sum_sq = np.bincount(features, values * values, self.d_sae)
                self._apart = ApartOrder.of(self._sum, self._sum_sq, len(self.token_ids))
                self._valued = sp.csr_matrix((values, counted_rows.indices, counted_rows.indptr), counted_rows.shape)
        self._fired = None
        if settings.n_cofiring:  # which features fire on each token, for the co-firing counts
            self._fired = counted_rows
            self._fired.data[:] = 1.0
        self._all_counts = fs.stats(self.sae).count

    def build(self, features: range | None = None, progress: bool = False) -> Iterator[FeatureDashboard]:
        """Each feature's dashboard data, in order."""
        features = range(self.d_sae) if features is None else features
        if not isinstance(features, range):
            raise ConfigError(f"features={features!r}: give a range of feature ids, such as range(0, 256).")
        if features.start < 0 or features.stop > self.d_sae or features.step != 1:
            raise ConfigError(f"features {features.start}:{features.stop} are not a range within "
                              f"0:{self.d_sae} of SAE {self.sae}.")
        blocks = [range(a, min(features.stop, a + BLOCK_FEATURES))
                  for a in range(features.start, features.stop, BLOCK_FEATURES)]
        bar = tqdm(total=len(features), desc=f"dashboards {self.sae}", unit="feature", disable=not progress)
        # blocks' numbers (sorts, bisections, products: numpy and torch let go of the GIL) are made on
        # other threads, AHEAD blocks at a time, while the one before them becomes Python objects and is used
        with ThreadPoolExecutor(AHEAD, thread_name_prefix="dashboard-numbers") as pool:
            ahead = collections.deque(pool.submit(self._numbers, block) for block in blocks[:AHEAD])
            for i, block in enumerate(blocks):
                numbers = ahead.popleft().result()
                if i + AHEAD < len(blocks):
                    ahead.append(pool.submit(self._numbers, blocks[i + AHEAD]))
                with collector_paused():  # a block makes tens of thousands of small objects, none in a cycle
                    dashboards = self._dashboards(numbers)
                yield from dashboards
                bar.update(len(block))
        bar.close()

    # -- one block of features ------------------------------------------------------------------

    def _numbers(self, block: range) -> _BlockNumbers:
        """Every number of the block's dashboards, from one sort of its activations and one pass for
        all its examples."""
        s = self.settings
        everything = self._columns  # the block's columns are one run of its arrays: views, not a copy
        lo, hi = everything.indptr[block.start], everything.indptr[block.stop]
        bounds = everything.indptr[block.start:block.stop + 1].astype(np.int64) - lo
        columns = sp.csc_matrix((everything.data[lo:hi], everything.indices[lo:hi], bounds),
                                shape=(everything.shape[0], len(block)), copy=False)
        n_fired = np.diff(bounds)
        owner = np.repeat(np.arange(len(block)), n_fired)  # the block column of each activation
        ranked_tokens, values = ranked(owner, columns.indices, columns.data)

        def value_at(ranks: np.ndarray) -> np.ndarray:  # 0 where a feature or group is empty
            return values[np.clip(ranks, 0, len(values) - 1)] if len(values) else np.zeros(ranks.shape, np.float32)

        # the ranks each feature shows: its top ranks, then the draws of each non-empty group below them
        n_top = np.minimum(n_fired, s.n_top)
        first, past = many_group_slices(values, bounds, s.n_groups, s.group_method)
        column, group = np.indices(first.shape).reshape(2, -1)
        drawn = draw_ranks(first.ravel(), past.ravel(), s.per_group, s.seed, block.start + column, group)
        n_drawn = np.minimum(past - first, s.per_group)
        who = np.concatenate([np.repeat(np.arange(len(block)), n_top), np.repeat(column, n_drawn.ravel())])
        ranks = np.concatenate([concatenated_ranges(np.zeros_like(n_top), n_top), drawn])
        order = np.argsort(who, kind="stable")
        examples = self._example_arrays(who[order], ranked_tokens[bounds[who[order]] + ranks[order]], columns, owner)

        # the activation histograms' bins, over [min, max] of each feature's counted activations
        maxes, mins = value_at(bounds[:-1]), value_at(bounds[1:] - 1)
        maxes, mins = np.where(n_fired > 0, maxes, 0), np.where(n_fired > 0, mins, 0)
        edges = histogram_edges(mins, maxes, s.n_bins)
        return _BlockNumbers(
            block=block, n_fired=n_fired, maxes=maxes, n_top=n_top,
            top_min=value_at(bounds[:-1] + n_top - 1), first=first, past=past, n_drawn=n_drawn,
            group_min=value_at(bounds[:-1, None] + past - 1), group_max=value_at(bounds[:-1, None] + first),
            examples=examples, centers=(edges[:, :-1] + edges[:, 1:]) / 2,
            counts=histogram_counts(values, bounds, edges), mins=mins,
            intervals=self._intervals(values, bounds, maxes) if s.group_method == "interval" else None,
            cofiring=None if self._fired is None else (self._fired[:, block.start:block.stop].T @ self._fired).tocsr(),
            correlated=self._correlated(block) if self.settings.n_correlated else None,
            logits=self._logits(block),
        )

    def _intervals(self, values: np.ndarray, bounds: np.ndarray, maxes: np.ndarray) -> np.ndarray:
        """Each interval group's bounds and the store's tokens within them, as SAEDashboard counts
        them (``lower <= activation <= upper``; the lowest interval starts at 0, so it also counts
        every token where the feature is 0): ``[features, n_groups, 3]``. The bounds are the
        edges ``many_group_slices`` draws the examples between."""
        n_groups = self.settings.n_groups
        if not n_groups:
            return np.zeros((len(maxes), 0, 3))
        edges = linspace_rows(maxes.astype(np.float64), np.zeros(len(maxes)), n_groups + 1)  # highest first
        lower, upper = edges[:, 1:], edges[:, :-1]
        first = np.repeat(bounds[:-1], n_groups)
        past = np.repeat(bounds[1:], n_groups)
        at_least_lower = count_leading(values, first, past, lower.ravel(), strict=False).reshape(lower.shape)
        above_upper = count_leading(values, first, past, upper.ravel(), strict=True).reshape(upper.shape)
        within = at_least_lower - above_upper
        within[:, -1] = len(self.token_ids) - above_upper[:, -1]  # from 0: the tokens where it is 0 too
        return np.stack([lower, upper, within.astype(np.float64)], axis=-1)

    def _correlated(self, block: range) -> list[CorrelatedFeatures]:
        """Each block feature's ``n_correlated`` most correlated features over the whole store.

        Pearson's r needs the sum of products, which is 0 for two features that never fire on the
        same token. So the candidates are the features that co-fire (one sparse product for the
        block) and the first few of those that do not (``ApartOrder``). With the Gram matrix, every
        feature is a candidate, the whole block at once."""
        k, n = self.settings.n_correlated, float(len(self.token_ids))
        features = np.arange(block.start, block.stop)
        if self._gram is not None:
            row, other, xy = self._gram_candidates(features)
        else:
            # the block's columns, feature-major, are the rows of the block's transpose as they stand
            columns = self._columns
            lo, hi = columns.indptr[block.start], columns.indptr[block.stop]
            transposed = sp.csr_matrix((columns.data[lo:hi].astype(np.float64), columns.indices[lo:hi],
                                        columns.indptr[block.start:block.stop + 1] - lo),
                                       shape=(len(block), columns.shape[0]))
            products = transposed @ self._valued
            row = np.repeat(np.arange(len(block)), np.diff(products.indptr))
            other, xy = products.indices.astype(np.int64), products.data
            fires = self._sum > 0
            cofire = fires[features[row]] & fires[other] & (other != features[row])
            row, other, xy = row[cofire], other[cofire], xy[cofire]
            apart_row, apart = self._apart.candidates(features, row, other, k)
            row, other = np.concatenate([row, apart_row]), np.concatenate([other, apart])
            xy = np.concatenate([xy, np.zeros(len(apart))])
        return most_correlated(features, row, other, xy, self._sum, self._sum_sq, n, k)

    def _gram_candidates(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the Gram matrix's rows: Pearson's r of each block feature with every feature at
        once, and the (row, feature, sum of products) of those at or above each row's
        ``n_correlated``-th highest among the features that fire."""
        k, n = self.settings.n_correlated, float(len(self.token_ids))
        fires = self._sum > 0
        xy = self._gram[features[0]:features[-1] + 1]
        pearson = pearsons_r(n, xy, self._sum[features, None], self._sum_sq[features, None],
                             self._sum[None, :], self._sum_sq[None, :])
        candidate = fires[features, None] & fires[None, :] & (features[:, None] != np.arange(self.d_sae)[None, :])
        scored = np.where(candidate, pearson, -np.inf)
        top = min(k, self.d_sae)
        kth = -np.partition(-scored, top - 1, axis=1)[:, top - 1:top]
        row, other = np.nonzero(candidate & (scored >= kth))
        return row, other, xy[row, other]

    def _example_arrays(self, block_column: np.ndarray, tokens: np.ndarray, columns: sp.csc_matrix,
                        owner: np.ndarray) -> dict[str, np.ndarray]:
        """The example at each token, for that column of ``columns`` (the block's, tokens ascending;
        ``owner`` is the column of each of its entries): its window ``[lo, hi)`` and the column's
        activations over it, ``context[start:start + hi - lo]``."""
        window = np.searchsorted(self._window_starts, tokens, side="right") - 1
        lo, hi = self._window_starts[window], self._window_starts[window + 1]
        if self.settings.context is not None:
            left, right = self.settings.context
            lo, hi = np.maximum(lo, tokens - left), np.minimum(hi, tokens + right + 1)
        # the column's activations inside [lo, hi), found by bisecting (column, token) keys
        n_tokens = len(self.token_ids)
        key = owner.astype(np.int64) * n_tokens + columns.indices
        first = np.searchsorted(key, block_column * n_tokens + lo)
        past = np.searchsorted(key, block_column * n_tokens + hi)
        starts = np.cumsum(hi - lo) - (hi - lo)
        context = np.zeros(int((hi - lo).sum()), np.float32)
        inside = concatenated_ranges(first, past)
        context[np.repeat(starts - lo, past - first) + columns.indices[inside]] = columns.data[inside]
        return {"token": tokens, "row": self.rows[tokens], "pos": self.positions[tokens],
                "activation": context[starts + tokens - lo], "lo": lo, "hi": hi, "start": starts, "context": context}

    def _dashboards(self, numbers: _BlockNumbers) -> list[FeatureDashboard]:
        """The block's dashboards as Python objects, from its numbers."""
        s, d = self.settings, numbers
        e, context = d.examples, d.examples["context"]
        examples = iter([
            Example(t, row, pos, value, self.token_ids[a:b], context[c:c + b - a], t - a)
            for t, row, pos, value, a, b, c in zip(*(e[k].tolist() for k in
                                                     ("token", "row", "pos", "activation", "lo", "hi", "start")))])
        n_tokens, dashboards = max(1, len(self.token_ids)), []
        mins = d.mins.tolist()
        per_feature = zip(d.block, d.n_fired.tolist(), d.maxes.tolist(), d.n_top.tolist(), d.top_min.tolist(),
                          d.first.tolist(), d.past.tolist(), d.n_drawn.tolist(), d.group_min.tolist(),
                          d.group_max.tolist(), d.centers.tolist(), d.counts.tolist())
        intervals = d.intervals.tolist() if d.intervals is not None else [None] * len(d.block)
        for j, (feature, n, top, n_top, top_min, first, past, n_drawn, lows, highs, centers, counts) in enumerate(per_feature):
            made = []
            if n_top:
                made.append(ExampleGroup("top", top_min, top, n_top / n, [next(examples) for _ in range(n_top)]))
            for g, (a, b, m, low, high) in enumerate(zip(first, past, n_drawn, lows, highs)):
                if b > a:
                    made.append(ExampleGroup(s.group_method, low, high, (b - a) / n, [next(examples) for _ in range(m)]))
                    if intervals[j] is not None:
                        lower, upper, within = intervals[j][g]
                        made[-1].interval, made[-1].n_tokens_within = (lower, upper), int(within)
            if n and top == mins[j]:  # one distinct value: one bin at it, not numpy's [v - 0.5, v + 0.5]
                centers, counts = [top], [n]
            dashboards.append(FeatureDashboard(
                feature=feature, n_fired=n, frac_nonzero=n / n_tokens, max=top, groups=made,
                hist_centers=centers if n else [], hist_counts=counts if n else [],
                cofiring=[] if d.cofiring is None else self._cofiring(feature, d.cofiring[j], n),
                logits=None if d.logits is None else d.logits[j],
                correlated=None if d.correlated is None else d.correlated[j],
            ))
        return dashboards

    def _cofiring(self, feature: int, row: sp.csr_matrix, n_fired: int) -> list[dict[str, Any]]:
        others, counts = row.indices, row.data.astype(np.int64)
        keep = (others != feature) & (counts > 0)
        others, counts = others[keep], counts[keep]
        order = np.lexsort((others, -counts))[: self.settings.n_cofiring]
        own = self._all_counts
        return [{"feature": int(others[i]), "count": int(counts[i]), "fraction": counts[i] / max(1, n_fired),
                 "jaccard": counts[i] / max(1, n_fired + int(own[others[i]]) - counts[i])} for i in order]

    def _logits(self, block: range) -> list[LogitTable] | None:
        if self.weights is None:
            return None
        import torch

        k, n_bins = self.settings.n_logits, self.settings.n_bins
        effects = torch.from_numpy(self.weights.W_dec[block.start:block.stop]) @ torch.from_numpy(self.weights.W_U)
        top = effects.topk(min(k, effects.shape[1]), dim=1)
        bottom = (-effects).topk(min(k, effects.shape[1]), dim=1)
        low, high = effects.min(1).values, effects.max(1).values
        width = torch.where(high > low, (high - low) / n_bins, torch.ones_like(high))
        # bin i holds low + i*width <= x < low + (i+1)*width, the last bin closed at high
        bins = ((effects - low[:, None]) / width[:, None]).floor().clamp_(0, n_bins - 1).long()
        counts = torch.zeros(len(block), n_bins, dtype=torch.long).scatter_add_(1, bins, torch.ones_like(bins))
        centers = low[:, None] + (torch.arange(n_bins) + 0.5)[None, :] * width[:, None]
        columns = (top.indices, top.values, bottom.indices, -bottom.values, centers, counts)
        return [LogitTable(*row) for row in zip(*(c.tolist() for c in columns))]
