"""The values a notebook passes to the Python API: a float, a bool or a string where a whole number
belongs would otherwise be taken for another one (5.7 for feature 5, True for row 1, a negative
context for the end of a window), silently, or fail deep inside numpy. Each is refused with a
ConfigError that names the argument and what to give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ablation import StorePrompts, check_feature_ids, resolve_positions
from pipeline.dashboard_data import DashboardSettings
from store.errors import ConfigError, TokenRangeError
from store.sweeps import read_sweep


@pytest.fixture(scope="module")
def fs(reference_store):
    return reference_store


def sae_of(fs) -> str:
    return fs.saes[0]


CALLS = {
    "feature 5.7": (lambda fs, s: fs.top_activations(s, 5.7), r"feature=5\.7: give a feature id of .*, a whole number "
                                                              r"from 0 to \d+\."),
    "feature True": (lambda fs, s: fs.histogram(s, True), r"feature=True: give a feature id"),
    "feature '5'": (lambda fs, s: fs.quantile_samples(s, "5"), r"feature='5': give a feature id"),
    "row 1.5": (lambda fs, s: fs.prompt_features(1.5, s), r"row=1\.5: give a dataset row \(the arguments are row, then "
                                                          r"sae\), a whole number\."),
    "row and sae swapped": (lambda fs, s: fs.prompt_features(s, 0), r"row='.*': give a dataset row \(the arguments"),
    "reversed token range": (lambda fs, s: fs.csr(s, 10, 0), r"token range start=10, stop=0 is not a range of the "
                                                             r"store's [\d,]+ tokens: give whole numbers with 0 <= start"),
    "token range 1.5": (lambda fs, s: fs.token_ids(1.5, 10), r"token range start=1\.5, stop=10 is not a range"),
    "0 bins": (lambda fs, s: fs.histogram(s, 1, 0), r"bins=0: give how many equal-width bins .*at least 1\."),
    "2.5 bins": (lambda fs, s: fs.histogram(s, 1, 2.5), r"bins=2\.5: give how many equal-width bins"),
    "edges with nan": (lambda fs, s: fs.histogram(s, 1, [0.0, np.nan, 2.0]), r"give the bins' edges as at least two "
                                                                             r"finite numbers, increasing"),
    "edges descending": (lambda fs, s: fs.histogram(s, 1, [2.0, 1.0]), r"bins' edges as at least two finite"),
    "min_activation nan": (lambda fs, s: fs.top_activations(s, 1, min_activation=float("nan")),
                           r"min_activation=nan: give the activation to keep those above, a finite number\."),
    "context of floats": (lambda fs, s: fs.top_activations(s, 1, context=(1.0, 2.0)), r"context=\(1\.0, 2\.0\): give "
                                                                                      r"the tokens of context"),
    "context 5": (lambda fs, s: fs.top_activations(s, 1, context=5), r"context=5: give the tokens of context"),
    "seed -1": (lambda fs, s: fs.quantile_samples(s, 1, seed=-1), r"seed=-1: give the random draw's seed, a whole "
                                                                  r"number of at least 0\."),
    "sae None": (lambda fs, s: fs.density(None), r"sae=None: give an SAE's name \(a string\)"),
    "sweep name with a path": (lambda fs, s: read_sweep(fs.location, "../shards"), r"sweep name '\.\./shards'"),
    "store rows 1.5": (lambda fs, s: StorePrompts.from_store(fs, [1.5]), r"rows=\[1\.5\]: give dataset rows of the "
                                                                        r"store, a non-empty list of whole numbers\."),
    "no store rows": (lambda fs, s: StorePrompts.from_store(fs, []), r"rows=\[\]: give dataset rows"),
    "feature ids [True]": (lambda fs, s: check_feature_ids([True], 10), r"features=\[True\]: give feature ids"),
    "feature ids 5": (lambda fs, s: check_feature_ids(5, 10), r"features=5: give feature ids"),
    "position 1.5": (lambda fs, s: resolve_positions(1.5, 2, 5, None), r"position=1\.5: give the position ablated"),
    "positions as floats": (lambda fs, s: resolve_positions(torch.tensor([0.5, 1.5]), 2, 5, None),
                            r"position=tensor\(\[0\.5000, 1\.5000\]\): give the position ablated"),
    "dashboard context (-1, 5)": (lambda fs, s: DashboardSettings(context=(-1, 5)),
                                  r"context=\(-1, 5\) must be two whole numbers of at least 0"),
    "dashboard n_top 1.5": (lambda fs, s: DashboardSettings(n_top=1.5), r"n_top=1\.5 must be a whole number"),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_a_value_of_the_wrong_kind_is_refused(fs, case):
    call, message = CALLS[case]
    with pytest.raises(ConfigError, match=message):
        call(fs, sae_of(fs))


def test_the_right_kinds_still_answer(fs):
    """numpy integers and integer arrays are whole numbers; a token range error is still an IndexError."""
    s = sae_of(fs)
    assert fs.top_activations(s, np.int64(1), k=2).equals(fs.top_activations(s, 1, k=2))
    assert list(check_feature_ids(np.array([3, 1]), 10)) == [1, 3]
    assert resolve_positions(torch.tensor([0, 1]), 2, 5, None).tolist() == [0, 1]
    assert len(fs.histogram(s, 1, [0.0, 0.5, 100.0])) == 2
    with pytest.raises(IndexError):
        fs.csr(s, 0, fs.n_tokens + 1)
    assert issubclass(TokenRangeError, IndexError)


def test_an_edited_sae_record_changes_nothing_the_store_reads(fs):
    s = sae_of(fs)
    record = fs.sae_record(s)
    record["d_sae"] = 3
    assert fs.d_sae(s) == fs.sae_record(s)["d_sae"] != 3


def test_store_rows_longer_than_a_window_are_refused_naming_rows_that_fit(fs):
    tokens_per_row = fs.provenance()["row"].value_counts().sort_index()
    context = fs.run["context_size"]
    long, fit = tokens_per_row.index[tokens_per_row > context], tokens_per_row.index[tokens_per_row <= context]
    assert len(long) and len(fit)  # the test data has both
    shown = ", ".join(map(str, fit[:10])) + (", ..." if len(fit) > 10 else "")
    with pytest.raises(ConfigError) as refused:
        StorePrompts.from_store(fs, [int(fit[0]), int(long[0])])
    assert str(refused.value) == (
        f"dataset rows [{long[0]}] span several {context}-token windows of the store; a prompt must be one window. "
        f"Rows that fit in one: {shown} ({len(fit)} of the {len(tokens_per_row)} rows it holds).")
    assert StorePrompts.from_store(fs, [int(fit[0])]).rows.tolist() == [fit[0]]
