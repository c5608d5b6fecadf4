"""splice_eval equals run_with_saes, the clean forward and a zero-ablation hook computed directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model, make_sae
from pipeline.metrics import LogitDiff
from pipeline.splice import splice_eval, splice_summary
from store.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    saes = [make_sae("standard", HOOKS[0], seed=1), make_sae("topk", HOOKS[1], seed=2, k=8)]
    torch.manual_seed(3)
    tokens = torch.randint(1, model.cfg.d_vocab, (7, 10))
    answers = torch.randint(0, model.cfg.d_vocab, (7, 2))
    return model, saes, tokens, answers


def per_prompt_loss(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(-1)


@pytest.mark.parametrize("use_error_term", [False, True])
def test_splice_numbers_equal_direct_computation(setup, use_error_term):
    model, saes, tokens, answers = setup
    metric = LogitDiff(answers)
    labels = ["a", "b", "a", "c", "b", "a", "c"]
    frame = splice_eval(model, saes, [[HOOKS[0]], HOOKS], tokens, metric, partition=labels,
                        use_error_term=use_error_term, batch_size=3)
    assert len(frame) == 7 * (1 + 2 + 2)

    with torch.no_grad():
        expected = {
            ("clean", ""): model(tokens),
            ("spliced", HOOKS[0]): model.run_with_saes(tokens, saes=[saes[0]], use_error_term=use_error_term),
            ("spliced", "+".join(HOOKS)): model.run_with_saes(tokens, saes=saes, use_error_term=use_error_term),
        }
        for hook in HOOKS:
            expected[("zero", hook)] = model.run_with_hooks(
                tokens, fwd_hooks=[(hook, lambda act, hook: torch.zeros_like(act))])
    for (condition, target), logits in expected.items():
        rows = frame[(frame["condition"] == condition) & (frame["target"] == target)].sort_values("prompt")
        assert list(rows["partition"]) == labels
        np.testing.assert_allclose(rows["metric"], metric(logits).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rows["loss"], per_prompt_loss(logits, tokens).numpy(), rtol=1e-5, atol=1e-5)
    clean = frame[frame["condition"] == "clean"]["metric"].to_numpy()
    zeroed = frame[(frame["condition"] == "zero") & (frame["target"] == HOOKS[0])]["metric"].to_numpy()
    assert np.abs(clean - zeroed).max() > 1e-2  # the conditions really differ

    summary = splice_summary(frame)
    row = summary[(summary["partition"] == "a") & (summary["condition"] == "clean")].iloc[0]
    assert row["n_prompts"] == 3
    np.testing.assert_allclose(row["metric"], clean[[0, 2, 5]].mean(), rtol=1e-6)


def test_plain_metric_sees_all_prompts_in_order(setup):
    model, saes, tokens, answers = setup

    def last_logit_diff(logits):  # notebook style: no prompts=, so it gets every prompt at once
        return logits[:, -1].gather(-1, answers)[:, 0] - logits[:, -1].gather(-1, answers)[:, 1]

    frame = splice_eval(model, saes, [[HOOKS[1]]], tokens, last_logit_diff, batch_size=2)
    with torch.no_grad():
        spliced = last_logit_diff(model.run_with_saes(tokens, saes=[saes[1]]))
    rows = frame[frame["condition"] == "spliced"]
    np.testing.assert_allclose(rows["metric"], spliced.numpy(), rtol=1e-5)
    assert set(frame["partition"]) == {"all"}


def test_two_saes_at_one_hook_by_name(setup):
    """Named, two SAEs of one hook are spliced in separate sets, each as run_with_saes splices it;
    their hook names neither, and one set cannot hold both."""
    model, saes, tokens, answers = setup
    other = make_sae("jumprelu", HOOKS[0], seed=4)
    named = {"a": saes[0], "b": other, "mlp": saes[1]}
    metric = LogitDiff(answers)
    frame = splice_eval(model, named, [["a"], ["b", HOOKS[1]]], tokens, metric)
    assert list(dict.fromkeys(frame["target"])) == ["", "a", "b+mlp", HOOKS[0], HOOKS[1]]
    with torch.no_grad():
        expected = {"a": model.run_with_saes(tokens, saes=[saes[0]]),
                    "b+mlp": model.run_with_saes(tokens, saes=[other, saes[1]])}
    for target, logits in expected.items():
        rows = frame[(frame["condition"] == "spliced") & (frame["target"] == target)]
        np.testing.assert_allclose(rows["metric"], metric(logits).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(frame[frame["target"] == "a"]["metric"], frame[frame["target"] == "b+mlp"]["metric"])

    with pytest.raises(ConfigError) as raised:
        splice_eval(model, named, [[HOOKS[0]], ["a", "b"]], tokens, metric)
    assert raised.value.problems == [
        f"hook {HOOKS[0]!r} is read by 2 of the SAEs given: a, b. Name one of them instead of the hook.",
        f"set a+b: a and another SAE of the set both replace {HOOKS[0]}; splice them in separate sets.",
    ]
    with pytest.raises(ConfigError, match=rf"two SAEs read {HOOKS[0]}: give the SAEs by name, as \{{name: sae\}}"):
        splice_eval(model, [saes[0], other], [["a"]], tokens, metric)


def test_errors_name_the_problem(setup):
    model, saes, tokens, answers = setup
    with pytest.raises(ConfigError, match="no SAE was given for hook 'blocks.2.hook_resid_post'; the SAEs given: "):
        splice_eval(model, saes, [["blocks.2.hook_resid_post"]], tokens, LogitDiff(answers))
    with pytest.raises(ConfigError, match="'blocks.7.hook_resid_post' names none of the SAEs given, and is not a "
                                          "hook of this model"):
        splice_eval(model, saes, [["blocks.7.hook_resid_post"]], tokens, LogitDiff(answers))
    with pytest.raises(ConfigError, match="one value per prompt"):
        splice_eval(model, saes, [[HOOKS[0]]], tokens, lambda logits: logits.mean())
    with pytest.raises(ConfigError, match="far: the SAE reads hook 'blocks.7.hook_resid_post', which this model "
                                          "does not have"):
        splice_eval(model, {"far": make_sae("standard", "blocks.7.hook_resid_post")}, [["far"]], tokens,
                    LogitDiff(answers))
