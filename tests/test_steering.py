"""Steering adds magnitude * W_dec[feature] at the SAE's hook at every position of every forward."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, make_sae
from pipeline.steering import steer
from store.errors import ConfigError

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    sae = make_sae("jumprelu", HOOK, seed=3)
    torch.manual_seed(4)
    return model, sae, torch.randint(1, model.cfg.d_vocab, (1, 6))


def greedy_with_added_direction(model, tokens, vector, n_new):
    """Greedy decoding written out: a full forward per token with the vector added at the hook."""
    def add(activation, hook):
        return activation + vector

    seq = tokens
    with torch.no_grad():
        for _ in range(n_new):
            logits = model.run_with_hooks(seq, fwd_hooks=[(HOOK, add)])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("feature, magnitude", [(5, 0.0), (5, 8.0), (40, -6.0)])
def test_steered_generation_equals_direct_computation(setup, feature, magnitude):
    model, sae, tokens = setup
    steered = steer(model, sae, tokens, feature, magnitude, max_new_tokens=6, stop_at_eos=False,
                    use_past_kv_cache=False)  # the cache reorders float sums; near-ties in a random model flip
    expected = greedy_with_added_direction(model, tokens, magnitude * sae.W_dec[feature].detach(), 6)
    assert torch.equal(steered, expected)


def test_steering_changes_the_text(setup):
    model, sae, tokens = setup
    plain = steer(model, sae, tokens, 5, 0.0, max_new_tokens=8, stop_at_eos=False)
    pushed = steer(model, sae, tokens, 5, 50.0, max_new_tokens=8, stop_at_eos=False)
    assert not torch.equal(plain, pushed)
    assert not model.hook_dict[HOOK].fwd_hooks  # the hook is gone afterwards


def test_errors(setup):
    model, sae, tokens = setup
    with pytest.raises(ConfigError, match="not a feature of this SAE"):
        steer(model, sae, tokens, 96, 1.0)
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        steer(model, sae, "the cat", 1, 1.0)


@pytest.mark.parametrize("change, message", [
    ({"feature": 5.5}, r"feature=5\.5: give a feature id of this SAE \(0\.\.95\), a whole number\."),
    ({"feature": True}, r"feature=True: give a feature id"),
    ({"magnitude": "10"}, r"magnitude='10': give how many units of the direction to add \(such as 40\), a finite"),
    ({"magnitude": float("inf")}, r"magnitude=inf: give how many units"),
    ({"max_new_tokens": 1.5}, r"max_new_tokens=1\.5 \(--max-new-tokens\): give how many tokens to generate, a whole "
                              r"number of at least 1"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 \(--max-new-tokens\): give how many tokens to generate"),
    ({"do_sample": True, "temperature": -1.0}, r"temperature=-1\.0 \(--temperature\): sampling needs a temperature above 0"),
    ({"prompt": torch.tensor([1, 2, 3])}, r"prompt: give text, or token ids as an integer tensor \[batch, tokens\]"),
    ({"prompt": torch.rand(1, 3)}, r"prompt: give text, or token ids as an integer tensor"),
    ({"prompt": torch.tensor([[1, 10_000]])}, r"of ids from 0 to \d+"),
    ({"max_new_tokens": 1000}, r"the prompt's 6 tokens and 1000 new ones \(max_new_tokens, --max-new-tokens\) exceed "
                               r"the model's context of \d+ tokens: ask for at most \d+ new tokens"),
])
def test_steer_refuses_values_of_the_wrong_kind(setup, change, message):
    """Before generating: a float feature would index another feature's row, a 1-D prompt would fail
    inside TransformerLens, and a prompt past the context inside its positional embedding."""
    model, sae, tokens = setup
    args = {"prompt": tokens, "feature": 5, "magnitude": 1.0, **change}
    with pytest.raises(ConfigError, match=message):
        steer(model, sae, args.pop("prompt"), args.pop("feature"), args.pop("magnitude"), **args)


def test_a_prompt_that_fills_the_context_is_refused_for_what_it_is(setup):
    model, sae, _ = setup
    full = torch.ones((1, model.cfg.n_ctx), dtype=torch.long)
    with pytest.raises(ConfigError, match=rf"the prompt's {model.cfg.n_ctx} tokens fill the model's context of "
                                          rf"{model.cfg.n_ctx} tokens, leaving none to generate: shorten the prompt\."):
        steer(model, sae, full, 5, 1.0)
