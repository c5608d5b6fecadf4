"""Questions a store answers without running the model, as pandas DataFrames.

Mixed into ``FeatureStore``. Each query reads what it needs from the fastest place
that has it: the merged statistics (top-K, counts, histograms), the feature-major
index, and only when neither can answer, a scan of the token-major shards. The
answers are the same either way.

Conventions, on every query where they apply:
- ``sae`` is an SAE's name (``fs.saes``), or its hook where exactly one SAE sits there;
- ``exclude_special_tokens=True`` leaves out the tokenizer's BOS, EOS and padding
  tokens (they often carry outsized activations that say nothing about a feature);
- ``min_activation=0.0`` keeps activations strictly above it;
- examples are ordered by activation, highest first, and ties by earlier token.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from store.arguments import finite_number, is_context, is_whole, whole_number
from store.errors import ConfigError
from store.sampling import check_method, draw_ranks, group_slices
from store.tokens import TokenDisplay

DEFAULT_CONTEXT = (8, 4)
ACTIVE_MARK = ("«", "»")


class Queries:
    @cached_property
    def token_display(self) -> TokenDisplay:
        """How the ``token`` and ``context`` columns show token ids (``store.tokens``). From the
        store's decoded vocabulary until replaced by one made from the run's tokenizer, as
        ``pipeline.tokens.use_tokenizer(fs)`` does (the commands do it for you)."""
        return TokenDisplay.from_decoded(self.vocab, self.special_token_ids)

    # -- one feature's entries -----------------------------------------------------------------

    def check_feature(self, sae: str, feature: int) -> int:
        """``feature`` as an int, or a ConfigError when ``sae`` has no such feature."""
        d_sae = self.d_sae(sae)
        if not is_whole(feature):  # int() would take 5.7 for 5, True for 1 and "5" for 5
            raise ConfigError(f"feature={feature!r}: give a feature id of {sae}, a whole number from 0 to {d_sae - 1}.")
        if not 0 <= feature < d_sae:
            raise ConfigError(f"feature {feature} is out of range for {sae}: it has features 0 to {d_sae - 1}.")
        return int(feature)

    def _entries(self, sae: str, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """All of a feature's (token index, activation), highest first."""
        index = self.index(sae)
        if index is not None:
            return index.entries(feature)
        return self._scan_feature(sae, feature)

    def _scan_feature(self, sae: str, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """The slow path: read every shard's CSR and pick one feature's column."""
        tokens, values = [], []
        for shard in self.shards:
            m = self.csr(sae, shard.token_start, shard.token_stop)
            column = m[:, feature].tocoo()
            tokens.append(column.row.astype(np.int64) + shard.token_start)
            values.append(column.data)
        t = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        v = np.concatenate(values) if values else np.zeros(0, np.float32)
        order = np.lexsort((t, -v.astype(np.float64)))
        return t[order], v[order]

    def _keep(self, tokens: np.ndarray, values: np.ndarray, exclude_special_tokens: bool,
              min_activation: float) -> np.ndarray:
        keep = values > finite_number("min_activation", min_activation, "the activation to keep those above")
        if exclude_special_tokens and self.special_token_ids:
            keep &= ~np.isin(self._token_table[0][tokens], list(self.special_token_ids))
        return keep

    def _top(self, sae: str, feature: int, k: int, exclude_special_tokens: bool,
             min_activation: float) -> tuple[np.ndarray, np.ndarray]:
        stats = self.stats(sae)
        tokens, values = stats.top_token[feature], stats.top_value[feature]
        filled = tokens >= 0
        tokens, values = tokens[filled], values[filled]
        keep = self._keep(tokens, values, exclude_special_tokens, min_activation)
        complete = stats.count[feature] <= stats.top_k  # the top-K list holds every entry
        if keep.sum() < k and not complete:
            tokens, values = self._entries(sae, feature)
            keep = self._keep(tokens, values, exclude_special_tokens, min_activation)
        return tokens[keep][:k], values[keep][:k]

    # -- examples --------------------------------------------------------------------------------

    def feature_activations(self, sae: str, feature: int, *, exclude_special_tokens: bool = False,
                            min_activation: float = 0.0) -> pd.DataFrame:
        """Every nonzero of one feature, in store order: token_index, row, pos, token, activation."""
        feature = self.check_feature(sae, feature)
        tokens, values = self._entries(sae, feature)
        keep = self._keep(tokens, values, exclude_special_tokens, min_activation)
        order = np.argsort(tokens[keep], kind="stable")
        return self._examples(tokens[keep][order], values[keep][order], context=None)

    def top_activations(self, sae: str, feature: int, k: int = 20, context: tuple[int, int] = DEFAULT_CONTEXT, *,
                        exclude_special_tokens: bool = True, min_activation: float = 0.0) -> pd.DataFrame:
        """The k highest activations: token_index, row, pos, token, activation, and the context around
        each (``context`` tokens left and right, within the same window) with the active token marked."""
        feature = self.check_feature(sae, feature)
        check_examples(k, context)
        tokens, values = self._top(sae, feature, k, exclude_special_tokens, min_activation)
        return self._examples(tokens, values, context)

    def quantile_samples(self, sae: str, feature: int, n_groups: int = 10, per_group: int = 5,
                         method: str = "rank", seed: int = 0, context: tuple[int, int] = DEFAULT_CONTEXT, *,
                         exclude_special_tokens: bool = True, min_activation: float = 0.0) -> pd.DataFrame:
        """Random examples from slices of the feature's nonzero activations, with each group's bounds.

        ``method="rank"``: equal-count slices (true quantiles; group 0 holds the highest);
        ``method="interval"``: SAEDashboard's equal-width intervals of [0, max] (group 0 the highest).
        """
        feature = self.check_feature(sae, feature)
        check_method(method)  # before any work
        check_examples(per_group, context, name="per_group")
        check_examples(n_groups, None, name="n_groups")
        if n_groups > MAX_GROUPS:  # each group is a slice and a draw: a billion would exhaust memory
            raise ConfigError(f"n_groups={n_groups}: give at most {MAX_GROUPS:,} groups (SAEDashboard shows 5 to 10).")
        whole_number("seed", seed, 0, "the random draw's seed")
        tokens, values = self._entries(sae, feature)
        keep = self._keep(tokens, values, exclude_special_tokens, min_activation)
        tokens, values = tokens[keep], values[keep]
        first, past = group_slices(values, n_groups, method)
        groups = np.arange(len(first))
        drawn = draw_ranks(first, past, per_group, seed, np.full(len(first), feature), groups)
        frames = []
        for g, picked in zip(groups, np.split(drawn, np.cumsum(np.minimum(past - first, per_group))[:-1])):
            a, b = int(first[g]), int(past[g])
            if b == a:
                continue
            frame = self._examples(tokens[picked], values[picked], context)
            frame.insert(0, "group", int(g))
            frame.insert(1, "group_min", float(values[b - 1]))
            frame.insert(2, "group_max", float(values[a]))
            frame.insert(3, "group_size", b - a)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else self._examples(tokens[:0], values[:0], context)

    def _examples(self, tokens: np.ndarray, values: np.ndarray, context: tuple[int, int] | None) -> pd.DataFrame:
        ids, rows, pos = self._token_table
        frame = pd.DataFrame({"token_index": tokens, "row": rows[tokens], "pos": pos[tokens],
                              "token_id": ids[tokens], "activation": values.astype(np.float32)})
        if self.vocab is not None:
            frame.insert(4, "token", self.token_display.text(ids[tokens]))
        if context is not None:
            frame["context"] = [self._context(int(t), context) for t in tokens]
        return frame

    def _context(self, token: int, context: tuple[int, int]) -> str:
        ids, rows, pos = self._token_table
        left, right = context
        lo, hi = max(0, token - left), min(len(ids), token + right + 1)
        # stay within the token's window: a window starts where pos restarts or the row changes
        same = (rows[lo:hi] == rows[token]) & _same_window(pos[lo:hi], token - lo)
        words = self.token_display.text(ids[lo:hi])
        return "".join(
            (f"{ACTIVE_MARK[0]}{w}{ACTIVE_MARK[1]}" if lo + j == token else w)
            for j, w in enumerate(words) if same[j]
        )

    # -- distributions ---------------------------------------------------------------------------

    def histogram(self, sae: str, feature: int, bins: int | np.ndarray | str = 50, *,
                  exclude_special_tokens: bool = False, min_activation: float = 0.0) -> pd.DataFrame:
        """Counts of the feature's nonzero activations: bin_start, bin_end, count.

        ``bins``: a number of equal-width bins over [0, max] (SAEDashboard's default is 50), explicit
        edges, or ``"stored"``: the fixed log2 bins kept in the statistics (no scan, all tokens)."""
        feature = self.check_feature(sae, feature)
        if isinstance(bins, str):
            if bins != "stored":
                raise ConfigError(f"bins={bins!r}: give a number of bins, their edges, or 'stored'.")
            from store.stats import HIST_EDGES

            counts = self.stats(sae).hist[feature]
            return pd.DataFrame({"bin_start": HIST_EDGES[:-1], "bin_end": HIST_EDGES[1:], "count": counts})
        bins = _checked_bins(bins)  # before any work
        tokens, values = self._entries(sae, feature)
        values = values[self._keep(tokens, values, exclude_special_tokens, min_activation)]
        if np.ndim(bins) == 0:
            bins = np.linspace(0, float(values.max()) if len(values) else 1.0, bins + 1)
        counts, edges = np.histogram(values, bins=bins)
        return pd.DataFrame({"bin_start": edges[:-1], "bin_end": edges[1:], "count": counts})

    def density(self, sae: str) -> pd.Series:
        """The fraction of tokens where each feature fires, at full precision (count / n_tokens)."""
        count = self.stats(sae).count
        return pd.Series(count / max(1, self.n_tokens), name="density").rename_axis("feature")

    def feature_stats(self, sae: str) -> pd.DataFrame:
        """One line per feature: count, density, max, mean (over tokens where it fires), mean_all
        (over all tokens), std (over tokens where it fires)."""
        s = self.stats(sae)
        fired = np.maximum(s.count, 1)
        mean = s.sum / fired
        return pd.DataFrame({
            "count": s.count,
            "density": s.count / max(1, self.n_tokens),
            "max": s.max,
            "mean": np.where(s.count > 0, mean, 0.0),
            "mean_all": s.sum / max(1, self.n_tokens),
            "std": np.where(s.count > 0, np.sqrt(np.maximum(s.sum_sq / fired - mean**2, 0)), 0.0),
        }).rename_axis("feature")

    # -- relations ---------------------------------------------------------------------------------

    def cofiring(self, sae: str, feature: int, k: int = 10, *, exclude_special_tokens: bool = True) -> pd.DataFrame:
        """The k features that fire most often on the same tokens as this one, over the whole store:
        feature, count (tokens shared), fraction (of this feature's tokens), jaccard."""
        feature = self.check_feature(sae, feature)
        check_examples(k, None)
        tokens, values = self._entries(sae, feature)
        tokens = np.sort(tokens[self._keep(tokens, values, exclude_special_tokens, 0.0)])
        counts = np.zeros(self.d_sae(sae), np.int64)
        for shard in self.shards:
            lo, hi = np.searchsorted(tokens, [shard.token_start, shard.token_stop])
            if lo == hi:
                continue
            m = self.csr(sae, shard.token_start, shard.token_stop)[tokens[lo:hi] - shard.token_start]
            counts += np.bincount(m.indices, minlength=len(counts))
        counts[feature] = 0
        order = np.lexsort((np.arange(len(counts)), -counts))[:k]
        order = order[counts[order] > 0]
        own = self.stats(sae).count
        return pd.DataFrame({
            "feature": order, "count": counts[order],
            "fraction": counts[order] / max(1, len(tokens)),
            "jaccard": counts[order] / np.maximum(1, len(tokens) + own[order] - counts[order]),
        })

    def prompt_features(self, row: int, sae: str, k: int = 10, *, exclude_special_tokens: bool = False,
                        min_activation: float = 0.0) -> pd.DataFrame:
        """For one dataset row, the top k features at each of its tokens:
        token_index, pos, token, rank, feature, activation."""
        check_examples(k, None)
        finite_number("min_activation", min_activation, "the activation to keep those above")
        lo, hi = self._row_tokens(row)
        ids, _, pos = self._token_table
        m = self.csr(sae, lo, hi)
        records = []
        for t in range(hi - lo):
            token = lo + t
            if exclude_special_tokens and ids[token] in self.special_token_ids:
                continue
            a, b = m.indptr[t], m.indptr[t + 1]
            feats, vals = m.indices[a:b], m.data[a:b]
            keep = vals > min_activation
            feats, vals = feats[keep], vals[keep]
            order = np.lexsort((feats, -vals.astype(np.float64)))[:k]
            for rank, j in enumerate(order):
                records.append((token, pos[token], ids[token], rank, feats[j], vals[j]))
        frame = pd.DataFrame(records, columns=["token_index", "pos", "token_id", "rank", "feature", "activation"])
        if self.vocab is not None:
            frame.insert(3, "token", self.token_display.text(frame["token_id"].to_numpy()))
        return frame

    def _row_tokens(self, row: int) -> tuple[int, int]:
        """The store's tokens [lo, hi) of dataset row ``row``."""
        rows = self._token_table[1]
        whole_number("row", row, what="a dataset row (the arguments are row, then sae)")
        lo, hi = np.searchsorted(rows, [row, row + 1])
        if lo == hi:
            raise ConfigError(f"dataset row {row} is not in the store (it holds rows {rows[0]} to {rows[-1]}).")
        return int(lo), int(hi)

    # -- plots -------------------------------------------------------------------------------------

    def plot_histogram(self, sae: str, feature: int, bins: int | np.ndarray | str = 50, **kwargs):
        """A plotly bar chart of ``histogram(...)``."""
        import plotly.graph_objects as go

        h = self.histogram(sae, feature, bins, **kwargs)
        if isinstance(bins, str):
            h = h[h["count"] > 0]
        fig = go.Figure(go.Bar(x=(h["bin_start"] + h["bin_end"]) / 2, y=h["count"],
                               width=h["bin_end"] - h["bin_start"]))
        fig.update_layout(title=f"{sae} feature {feature}: activations", xaxis_title="activation",
                          yaxis_title="tokens", bargap=0.02)
        if isinstance(bins, str):
            fig.update_xaxes(type="log")
        return fig

    def plot_activations(self, row: int, sae: str, feature: int):
        """A plotly bar chart of one feature's activation at each token of a dataset row."""
        import plotly.graph_objects as go

        lo, hi = self._row_tokens(row)
        ids, _, pos = self._token_table
        feature = self.check_feature(sae, feature)
        column = self.csr(sae, lo, hi)[:, feature].toarray().ravel()
        labels = [f"{j}:{text}" for j, text in enumerate(self.token_display.text(ids[lo:hi]))]
        fig = go.Figure(go.Bar(x=labels, y=column, hovertext=[f"pos {p}" for p in pos[lo:hi]]))
        fig.update_layout(title=f"row {row}: {sae} feature {feature}", xaxis_title="token",
                          yaxis_title="activation")
        return fig


MAX_GROUPS = 10_000  # quantile_samples' groups
MAX_BINS = 1_000_000  # a histogram's equal-width bins


def check_examples(k: int, context: tuple[int, int] | None, name: str = "k") -> None:
    """How many examples a query returns, and how much context around each: ``k`` must be a positive
    whole number (a negative one would slice from the end), ``context`` two numbers of tokens >= 0."""
    if not is_whole(k) or k < 1:
        hint = " (on the command line: -k 10)" if name == "k" else ""
        raise ConfigError(f"{name}={k!r}: give how many examples you want, a whole number of at least 1{hint}.")
    if context is not None and not is_context(context):
        raise ConfigError(f"context={context!r}: give the tokens of context to show left and right of "
                          "each example, two whole numbers of at least 0 (on the command line: --context 12 4).")


def _checked_bins(bins) -> int | np.ndarray:
    """A histogram's bins: a number of equal-width bins (at least 1), or their edges (at least two
    finite numbers, increasing)."""
    if np.ndim(bins) == 0:
        bins = whole_number("bins", bins, 1, "how many equal-width bins (or their edges, or 'stored')")
        if bins > MAX_BINS:  # each bin is a count in memory: a billion would exhaust it
            raise ConfigError(f"bins={bins}: give at most {MAX_BINS:,} bins (or their edges, or 'stored').")
        return bins
    edges = np.asarray(bins)
    if (edges.ndim != 1 or len(edges) < 2 or edges.dtype.kind not in "iuf" or not np.isfinite(edges).all()
            or not (np.diff(edges) > 0).all()):
        raise ConfigError(f"bins={bins!r}: give the bins' edges as at least two finite numbers, increasing (or a "
                          "number of bins, or 'stored').")
    return edges


def _same_window(positions: np.ndarray, center: int) -> np.ndarray:
    """Which tokens of a slice share the window of the token at ``center``.

    A window starts at a BOS (pos -1) or where positions do not follow on."""
    starts = np.ones(len(positions), bool)
    starts[1:] = (positions[1:] == -1) | (positions[1:] != positions[:-1] + 1) & (positions[:-1] != -1)
    window = np.cumsum(starts)
    return window == window[center]
