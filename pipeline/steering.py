"""Steering: generate with ``magnitude * W_dec[feature]`` added at the SAE's output hook.

As notebook 004 steers Gemma with a Gemma Scope decoder direction: the direction is added
to the hook's activation at every position of every forward, the prompt's and each
generated token's alike. The SAE itself is not spliced in; only its decoder row is used.
An SAE's output hook is the hook it reads; a transcoder's is the hook its decoder writes
(``metadata.hook_name_out``), e.g. the MLP's output for an MLP transcoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.saes import model_hook_problems, output_hook
from store.arguments import finite_number, is_finite_number, is_whole, whole_number
from store.errors import ConfigError


def steering_vector(sae, feature: int, magnitude: float) -> torch.Tensor:
    """``magnitude * W_dec[feature]``, ``[d_in]``."""
    d_sae = sae.cfg.d_sae
    magnitude = finite_number("magnitude", magnitude, "how many units of the direction to add (such as 40)")
    whole_number("feature", feature, what=f"a feature id of this SAE (0..{d_sae - 1})")
    if not 0 <= feature < d_sae:
        raise ConfigError(f"feature {feature} is not a feature of this SAE, which has ids 0..{d_sae - 1}.")
    return magnitude * sae.W_dec[feature].detach()


def steering_hook(model, sae, feature: int, magnitude: float) -> tuple[str, Callable]:
    """``(hook name, hook function)`` adding the steering vector at the SAE's output hook, for
    ``model.hooks`` or ``run_with_hooks``."""
    problems = model_hook_problems(sae, model.hook_dict)
    if problems:
        raise ConfigError(problems)
    hook = output_hook(sae)
    vector = steering_vector(sae, feature, magnitude)

    def add(activation: torch.Tensor, hook) -> torch.Tensor:
        # hook_z activations are [batch, pos, n_heads, d_head]; the SAE sees them flattened.
        return activation + vector.to(activation).reshape(activation.shape[2:])

    return hook, add


def check_generation(max_new_tokens: object, do_sample: bool, temperature: object = None) -> None:
    """``steer``'s generation settings, refused where they cannot work (the command line checks
    them too, before it loads anything), each named as both take it; a ``temperature`` of None is
    steer's default."""
    if not is_whole(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} (--max-new-tokens): give how many tokens to generate, "
                          "a whole number of at least 1.")
    if do_sample and temperature is not None and not (is_finite_number(temperature) and temperature > 0):
        raise ConfigError(f"temperature={temperature!r} (--temperature): sampling needs a temperature above 0 (1 "
                          "samples the model's own distribution, lower ones are greedier; greedy decoding needs "
                          "no sampling: do_sample=False, or leave out --sample).")


def steer(model, sae, prompt: str | torch.Tensor, feature: int, magnitude: float, *,
          max_new_tokens: int = 50, do_sample: bool = False, temperature: float = 1.0,
          seed: int | None = None, **generate_kwargs) -> str | torch.Tensor:
    """``model.generate`` with the feature's decoder direction added at the SAE's output hook.

    Greedy by default, so that a run can be repeated; ``do_sample=True`` with ``seed`` samples
    reproducibly. A string prompt gives a string back; token ids give token ids back.
    """
    check_generation(max_new_tokens, do_sample, temperature)
    if isinstance(prompt, str) and model.tokenizer is None:
        raise ConfigError("a text prompt needs the model's tokenizer, and this model has none; pass token ids.")
    if isinstance(prompt, str):
        n_prompt = model.to_tokens(prompt, truncate=False).shape[-1]  # to_tokens cuts at n_ctx by default
    elif (isinstance(prompt, torch.Tensor) and prompt.ndim == 2 and not prompt.is_floating_point()
          and prompt.numel() and 0 <= int(prompt.min()) and int(prompt.max()) < model.cfg.d_vocab):
        n_prompt = prompt.shape[-1]
    else:
        raise ConfigError("prompt: give text, or token ids as an integer tensor [batch, tokens] of ids from 0 to "
                          f"{model.cfg.d_vocab - 1} (model.to_tokens(text) makes one).")
    if n_prompt >= model.cfg.n_ctx:
        raise ConfigError(f"the prompt's {n_prompt} tokens fill the model's context of {model.cfg.n_ctx} tokens, leaving "
                          "none to generate: shorten the prompt.")
    if n_prompt + max_new_tokens > model.cfg.n_ctx:
        raise ConfigError(
            f"the prompt's {n_prompt} tokens and {max_new_tokens} new ones (max_new_tokens, --max-new-tokens) exceed "
            f"the model's context of {model.cfg.n_ctx} tokens: ask for at most {max(model.cfg.n_ctx - n_prompt, 0)} "
            "new tokens, or shorten the prompt.")
    if seed is not None:
        torch.manual_seed(seed)
    with model.hooks(fwd_hooks=[steering_hook(model, sae, feature, magnitude)]):
        return model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, verbose=False, **generate_kwargs)
