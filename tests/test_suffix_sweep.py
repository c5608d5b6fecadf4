"""Suffix recompute: an ablation at position p runs only positions p and later, against the spliced
baseline's cached keys and values. Its table equals the full recompute's (every position run) for
every SAE kind, with and without the error term, for every kind of ablation, on left-padded prompts
of different lengths, at each prompt's first and last position and at every position."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.ablation import StorePrompts, ablation_sweep, left_pad
from pipeline.metrics import KLFromClean, NextTokenLoss
from pipeline.resume import Resume
from store.errors import ConfigError
from test_sae_kinds import all_kinds, model  # noqa: F401  (fixtures: a tiny model, every SAE kind on it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

LENGTHS = [12, 9, 5, 12, 7, 3]  # left-padded to 12: padding before all but two prompts
KINDS = ["gated", "batchtopk", "matryoshka", "topk_rescaled", "topk_sparse", "layer_norm", "constant_norm_rescale",
         "expected_average_only_in", "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.fixture(scope="module")
def prompts(model):
    torch.manual_seed(11)
    tokens, mask = left_pad([torch.randint(1, model.cfg.d_vocab, (n,)) for n in LENGTHS], pad_token_id=0)
    return tokens, mask


def positions(name: str, mask: torch.Tensor):
    """Each prompt's first real token, its last, or every position."""
    return {"first": (mask == 0).sum(1), "last": -1, "all": None}[name]


@pytest.fixture
def full_recompute(monkeypatch):
    """Every ablated copy runs every position, as before suffix recompute."""
    def full():
        monkeypatch.setattr(Resume, "suffix_runs", property(lambda self: False))
    return full


def sweep_both(model, sae, tokens, mask, full_recompute, **kwargs):
    suffix = ablation_sweep(model, sae, tokens, attention_mask=mask, batch_size=7, **kwargs)
    full_recompute()
    full = ablation_sweep(model, sae, tokens, attention_mask=mask, batch_size=7, **kwargs)
    return suffix, full


def assert_same_table(suffix, full):
    assert suffix[["prompt", "feature"]].equals(full[["prompt", "feature"]])
    scale = float(np.abs(full["delta"]).max())
    assert scale > 1e-3  # the ablations matter, so the comparison says something
    # float32 noise: the two run the same sums in different groupings (a suffix, a separate last block),
    # so a delta near zero differs by some ulps of the logits (about 1e-7 each) whatever the largest delta
    np.testing.assert_allclose(suffix["delta"], full["delta"], rtol=1e-4, atol=max(1e-5 * scale, 1e-6))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("where", ["first", "last", "all"])
def test_suffix_recompute_equals_full_recompute(model, all_kinds, prompts, full_recompute, kind, use_error_term, where):
    tokens, mask = prompts
    _, sae = all_kinds[kind]
    # the mean next-token loss reads every position's logits, so the baseline's prefix logits count too;
    # an ablation at the last position changes only the last prediction, which the loss does not read
    metric = KLFromClean.from_model(model, tokens, attention_mask=mask) if where == "last" else \
        NextTokenLoss(tokens, mask)
    suffix, full = sweep_both(model, sae, tokens, mask, full_recompute, metric=metric,
                              position=positions(where, mask), use_error_term=use_error_term)
    assert_same_table(suffix, full)


@pytest.mark.parametrize("ablation", ["zero", "mean", 0.5, 2.0])
@pytest.mark.parametrize("where", ["first", "all"])
def test_every_kind_of_ablation(model, all_kinds, prompts, full_recompute, ablation, where):
    tokens, mask = prompts
    _, sae = all_kinds["topk_rescaled"]
    means = np.abs(np.random.default_rng(0).normal(size=sae.cfg.d_sae)).astype(np.float32)
    metric = KLFromClean.from_model(model, tokens, attention_mask=mask)
    suffix, full = sweep_both(model, sae, tokens, mask, full_recompute, metric=metric, position=positions(where, mask),
                              ablation=ablation, means=means if ablation == "mean" else None)
    assert_same_table(suffix, full)


def test_ablated_copies_run_only_the_changed_positions(model, all_kinds, prompts):
    """At the last position every ablated copy is one token long past the SAE's layer; at every
    position, a copy starts at the first position where its feature fires."""
    tokens, mask = prompts
    hook, sae = all_kinds["layer_norm"]  # blocks.1.hook_resid_pre: the forward starts at block 1
    seen: list[int] = []
    model.add_hook("blocks.2.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]), is_permanent=True)
    try:
        metric = KLFromClean.from_model(model, tokens, attention_mask=mask)
        seen.clear()
        frame = ablation_sweep(model, sae, tokens, metric, attention_mask=mask, batch_size=5)
        assert seen[0] == tokens.shape[1] and set(seen[1:]) == {1}  # the baseline, then one token per copy
        assert len(seen) - 1 == -(-int((frame["delta"] != 0).sum()) // 5)

        seen.clear()
        ablation_sweep(model, sae, tokens, NextTokenLoss(tokens, mask), position=None, attention_mask=mask,
                       batch_size=5)
        assert seen[0] == tokens.shape[1] and max(seen[1:]) <= tokens.shape[1] and min(seen[1:]) < tokens.shape[1]
    finally:
        model.reset_hooks(including_permanent=True)


@pytest.mark.ray
def test_suffix_and_full_recompute_agree_on_a_stores_rows(reference_store, assets, full_recompute):
    from pipeline.models import load_model
    from pipeline.saes import SAESource, load_sae

    fs = reference_store
    model = load_model(str(assets["model_dir"]))
    name = "blocks.1.hook_mlp_out"  # a TopK SAE whose output replaces the MLP's inside block 1
    sae = load_sae(SAESource.parse(str(assets["sae_dirs"][name])))
    row_lengths = fs.provenance()["row"].value_counts().sort_index()
    rows = row_lengths.index[row_lengths <= fs.run["context_size"]][:8].to_numpy()  # a prompt is one window
    assert len(set(row_lengths[rows])) > 1  # of different lengths: left-padded
    store_prompts = StorePrompts.from_store(fs, rows, sae=name)
    metric = NextTokenLoss(store_prompts.tokens, store_prompts.attention_mask)
    suffix = ablation_sweep(model, sae, store_prompts, metric, position=None, ablation="mean", batch_size=16)
    full_recompute()
    full = ablation_sweep(model, sae, store_prompts, metric, position=None, ablation="mean", batch_size=16)
    assert (suffix["row"] == full["row"]).all()
    assert_same_table(suffix, full)


def test_one_baseline_serves_every_feature_block(model, all_kinds, prompts):
    """``baseline=`` shares a prompt batch's spliced baseline among feature blocks: the blocks' tables
    together are the table of one call over all features, and no baseline forward runs again."""
    from pipeline.ablation import spliced_baseline

    tokens, mask = prompts
    _, sae = all_kinds["gated"]
    metric = NextTokenLoss(tokens, mask)
    whole = ablation_sweep(model, sae, tokens, metric, position=None, attention_mask=mask)
    features = np.unique(whole["feature"])
    baseline = spliced_baseline(model, sae, tokens, metric, attention_mask=mask)
    runs: list[int] = []
    model.add_hook("hook_embed", lambda x, hook: runs.append(1), is_permanent=True)  # forwards from the tokens
    try:
        blocks = [ablation_sweep(model, sae, tokens, metric, features=list(block), position=None, attention_mask=mask,
                                 baseline=baseline) for block in np.array_split(features, 3)]
    finally:
        model.reset_hooks(including_permanent=True)
    assert runs == []
    joined = pd.concat(blocks).sort_values(["prompt", "feature"], ignore_index=True)
    assert joined[["prompt", "feature"]].equals(whole[["prompt", "feature"]])
    np.testing.assert_allclose(joined["delta"], whole["delta"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"baseline= was made for other prompts, another SAE or metric"):
        ablation_sweep(model, sae, tokens[:3], metric, attention_mask=mask[:3], baseline=baseline)


def test_a_plain_metric_that_writes_to_its_logits_is_refused(model, all_kinds, prompts):
    """A plain metric (no ``prompts=``) is given one batch, rows swapped in and back; one that writes
    to it would spoil the next rounds, so the sweep refuses its numbers."""
    tokens, mask = prompts
    _, sae = all_kinds["gated"]

    def last_logit(logits):
        return logits[:, -1, 0]

    def last_logit_zeroing_the_first(logits):
        logits[:, 0] = 0.0
        return logits[:, -1, 0]

    honest = ablation_sweep(model, sae, tokens, last_logit, attention_mask=mask)
    assert (honest["delta"] != 0).any()
    with pytest.raises(ConfigError, match=r"the metric changed the logits it was given in place"):
        ablation_sweep(model, sae, tokens, last_logit_zeroing_the_first, attention_mask=mask)


@pytest.mark.parametrize("read", ["last", "third from the end", "each prompt's first"])
def test_a_built_in_metric_reads_its_own_position(model, all_kinds, prompts, full_recompute, read):
    """A built-in metric reading a position counted from the end gets only the last positions'
    logits (the rest never unembedded); one reading positions counted from the start gets the
    baseline's earlier logits joined to the suffix's. Either way the table is the full recompute's."""
    from pipeline.metrics import LogitDiff

    tokens, mask = prompts
    _, sae = all_kinds["transcoder"]
    at = {"last": -1, "third from the end": -3, "each prompt's first": (mask == 0).sum(1)}[read]
    answers = torch.randint(1, model.cfg.d_vocab, (len(tokens), 2), generator=torch.Generator().manual_seed(5))
    suffix, full = sweep_both(model, sae, tokens, mask, full_recompute, metric=LogitDiff(answers, position=at),
                              position=None)
    assert_same_table(suffix, full)


def _last_logit(logits):
    return logits[:, -1, 0] - logits[:, -1, 1]


def _answer_logit_diff(logits, answers):  # notebook 000's logits_to_ave_logit_diff(..., per_prompt=True)
    answer_logits = logits[:, -1, :].gather(dim=-1, index=answers)
    return answer_logits[:, 0] - answer_logits[:, 1]


def _log_prob_of_the_last_three(logits):
    return logits.float().log_softmax(-1)[:, -3:, 2].sum(1)


def _mean_logit(logits):
    return logits[..., 0].mean(1)


def _branching(logits):
    return logits[:, -1, 0] if bool(logits[:, 0, 0].max() > 0) else logits[:, -1, 1]


@pytest.mark.parametrize("metric, read", [(_last_logit, [-1]), (_log_prob_of_the_last_three, [-3, -2, -1]),
                                          (partial(_answer_logit_diff, answers=torch.tensor([[1, 2]] * len(LENGTHS))),
                                           [-1]),
                                          (_mean_logit, None), (_branching, None)])
def test_a_plain_metric_is_traced_for_the_positions_it_reads(model, all_kinds, prompts, full_recompute, metric, read):
    """A plain function of the logits (notebook 000's kind) that reads only the last positions is
    given only those positions' logits, the others never unembedded; one that reads every position,
    or branches on values, gets them all. Either way the table is the full recompute's."""
    from pipeline.metrics import positions_read

    tokens, mask = prompts
    _, sae = all_kinds["gated"]
    got = positions_read(metric, torch.randn(len(tokens), tokens.shape[1], model.cfg.d_vocab))
    assert (got is None) if read is None else got.tolist() == read
    unembedded: list[int] = []  # positions of each forward that reach the unembedding
    model.add_hook("ln_final.hook_normalized", lambda x, hook: unembedded.append(x.shape[1]), is_permanent=True)
    try:
        suffix = ablation_sweep(model, sae, tokens, metric, position=None, attention_mask=mask, batch_size=7)
    finally:
        model.reset_hooks(including_permanent=True)
    assert unembedded[0] == tokens.shape[1]  # the baseline's
    if read is None:
        assert max(unembedded[1:]) == tokens.shape[1]
    else:  # fewer where a copy starts later
        assert max(unembedded[1:]) == len(read)
    full_recompute()
    full = ablation_sweep(model, sae, tokens, metric, position=None, attention_mask=mask, batch_size=7)
    assert_same_table(suffix, full)


def test_the_last_block_runs_only_the_positions_read(model, all_kinds, prompts):
    """Where the metric reads the last position, the earlier positions of a copy give the last block
    only their keys and values: its MLP runs for the last position alone."""
    tokens, mask = prompts
    _, sae = all_kinds["gated"]
    last = model.cfg.n_layers - 1
    mlp_rows: list[int] = []
    model.add_hook(f"blocks.{last}.hook_mlp_out", lambda x, hook: mlp_rows.append(x.shape[1]), is_permanent=True)
    try:
        ablation_sweep(model, sae, tokens, NextTokenLoss(tokens, mask), position=None, attention_mask=mask)
        assert max(mlp_rows[1:]) > 1  # a metric that reads every position: every position runs
        mlp_rows.clear()
        ablation_sweep(model, sae, tokens, _last_logit, position=None, attention_mask=mask)
    finally:
        model.reset_hooks(including_permanent=True)
    assert mlp_rows[0] == tokens.shape[1] and set(mlp_rows[1:]) == {1}


@pytest.mark.parametrize("attention", [{"use_qk_norm": True}, {"clip_qkv": 0.05}])
def test_cached_keys_are_the_attentions_own(prompts, full_recompute, attention):
    """Query-key normalisation (Qwen3, Gemma 3) and clipping change the keys after ``hook_k``; the
    suffix attends to the baseline's keys as the attention caches them, so its table is still the
    full recompute's."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from conftest import make_sae

    tokens, mask = prompts
    torch.manual_seed(3)
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=int(tokens.max()) + 1,
                                  act_fn="gelu", d_mlp=64, normalization_type="LN", seed=3, **attention)
    model = HookedSAETransformer(cfg)
    sae = make_sae("standard", "blocks.0.hook_resid_post")
    metric = NextTokenLoss(tokens, mask)
    suffix, full = sweep_both(model, sae, tokens, mask, full_recompute, metric=metric, position=None)
    assert_same_table(suffix, full)
