"""Finishing a forward from an SAE's output hook, recomputing only what an edit there changes.

A sweep edits the activation at one hook (the SAE's output, or a transcoder's ``hook_name_out``)
and needs the logits that follow. Nothing upstream of the hook changes, so ``Resume`` starts the
forward inside the model from what the spliced baseline cached:

- ``blocks.L.hook_resid_pre`` starts at block L with the edited activation as the residual;
  ``blocks.L.hook_resid_post`` starts at block L + 1; any other hook of block L starts at L from
  the cached residual and has its value replaced;
- attention is causal, so an edit at position p changes nothing before p. Given ``start_pos``,
  only positions ``start_pos`` and later run, attending to the baseline's cached keys and values
  of the earlier positions (TransformerLens's frozen key-value cache), and only their logits are
  returned: the earlier positions' are the baseline's;
- given ``tail``, only the last positions' logits are computed (a metric that reads the last
  position needs no other; the unembedding is often the largest matrix of a suffix run), and
  the last block runs its attention and MLP for those positions alone: the earlier ones give it
  only their keys and values.

Hooks outside the blocks, shortformer models and TransformerBridge models (whose forward cannot
start inside) run every position from the tokens.
"""

from __future__ import annotations

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities import apply_softcap

from pipeline.models import can_start_at_layer, forward_attention_mask, hook_layer


class _Appended(Exception):
    """Carries a block's keys and values out of its forward, which stops there."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class _KeysAndValues(TransformerLensKeyValueCacheEntry):
    """A cache entry at which a block stops when its attention appends new keys and values (there
    they are final, as the block caches them), raising them joined to the earlier ones."""

    def append(self, new_keys: torch.Tensor, new_values: torch.Tensor):
        raise _Appended(torch.cat([self.past_keys, new_keys], 1), torch.cat([self.past_values, new_values], 1))


class Resume:
    """Finishes forwards of prompt copies from ``hook``, given what the hook outputs for each row."""

    def __init__(self, model, hook: str, tokens: torch.Tensor, attention_mask: torch.Tensor | None):
        self.model, self.hook = model, hook
        self.tokens = tokens
        # What the full forward computes from the tokens (left padding needs an explicit mask).
        self.attention_mask = forward_attention_mask(model, tokens, attention_mask)
        layer = hook_layer(hook)
        in_blocks = (layer is not None and layer >= 0 and can_start_at_layer(model)
                     and model.cfg.positional_embedding_type != "shortformer")
        if in_blocks and hook == f"blocks.{layer}.hook_resid_pre":
            self.mode, self.start = "residual", layer
        elif in_blocks and hook == f"blocks.{layer}.hook_resid_post":
            self.mode, self.start = "residual", layer + 1
        elif in_blocks:
            self.mode, self.start = "replace", layer
        else:
            self.mode, self.start = "tokens", None
        self.residual: torch.Tensor | None = None  # the baseline's residual into block ``start`` ("replace")
        self.keys: dict[int, torch.Tensor] = {}  # the baseline's keys and values of each block from ``start``
        self.values: dict[int, torch.Tensor] = {}
        self._kv: TransformerLensKeyValueCache | None = None  # filled by the baseline's forward

    @property
    def suffix_runs(self) -> bool:
        """Whether a forward can start at a position: it starts inside the blocks, and its blocks
        cache their keys and values as TransformerLens's key-value cache takes them."""
        return self.mode != "tokens" and self.start < self.model.cfg.n_layers

    @property
    def cache_names(self) -> list[str]:
        """What the baseline's forward must cache for ``remember``, besides ``baseline_kwargs``."""
        return [f"blocks.{self.start}.hook_resid_pre"] if self.mode == "replace" else []

    def baseline_kwargs(self) -> dict:
        """Keyword arguments of the baseline's forward over ``tokens``: the attention mask, and,
        where forwards start at a position, a TransformerLens key-value cache that it fills. The
        cache holds each block's keys and values as its attention uses them (after any
        normalisation or clipping of the keys, which ``hook_k`` does not show)."""
        if not self.suffix_runs:
            return {"attention_mask": self.attention_mask}
        self._kv = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.tokens.device, len(self.tokens))
        # A forward that fills a cache needs an explicit mask; all ones is what it uses without one.
        mask = torch.ones_like(self.tokens) if self.attention_mask is None else self.attention_mask
        return {"attention_mask": mask, "past_kv_cache": self._kv}

    def remember(self, cache) -> None:
        """Keep what later forwards start from: the baseline's cache (``cache_names``) and the keys
        and values its forward left in ``baseline_kwargs``'s key-value cache."""
        if self.mode == "replace":
            self.residual = cache[f"blocks.{self.start}.hook_resid_pre"]
        if self.suffix_runs:
            for layer in range(self.start, self.model.cfg.n_layers):
                self.keys[layer], self.values[layer] = self._kv[layer].past_keys, self._kv[layer].past_values
            self._kv = None

    def __call__(self, hook_out: torch.Tensor, prompts: torch.Tensor, start_pos: int = 0,
                 tail: int | None = None) -> torch.Tensor:
        """Logits ``[batch, seq - start_pos, vocab]`` of copies of ``prompts`` from position ``start_pos``
        on, whose hook outputs ``hook_out`` there (``[batch, seq - start_pos, ...]``; before it, the
        baseline's). ``start_pos`` > 0 needs ``suffix_runs`` and ``remember``. With ``tail``, only the
        last ``tail`` positions' logits ``[batch, tail, vocab]`` (the others are never unembedded)."""
        mask = None if self.attention_mask is None else self.attention_mask[prompts]
        kwargs = {"attention_mask": mask}
        if start_pos:
            kwargs["past_kv_cache"] = self._past(prompts, start_pos, mask, hook_out.device)
        unembed_tail = tail is not None and self.mode != "tokens"  # a forward from the tokens unembeds it all
        last = self.model.cfg.n_layers - 1
        # The last block runs apart where the baseline's keys and values are kept and the edit is not inside it.
        split_last = unembed_tail and self.suffix_runs and (self.mode == "residual" or self.start < last)
        if unembed_tail:
            kwargs["stop_at_layer"] = last if split_last else last + 1
        if self.mode == "residual":
            out = self.model(hook_out, start_at_layer=self.start, **kwargs)
        else:
            start = (self.residual[prompts, start_pos:] if self.mode == "replace" else self.tokens[prompts])

            def replace(activation: torch.Tensor, hook) -> torch.Tensor:
                return hook_out.reshape(activation.shape).to(activation.dtype)

            out = self.model.run_with_hooks(start, start_at_layer=self.start, fwd_hooks=[(self.hook, replace)],
                                            **kwargs)
        if split_last:
            out = self._last_block(out, prompts, start_pos, tail, mask)
        if unembed_tail:
            return self._unembed(out[:, -tail:])
        return out if tail is None else out[:, -tail:]

    def _last_block(self, residual: torch.Tensor, prompts: torch.Tensor, start_pos: int, tail: int,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """The last block's output at the last ``tail`` positions of ``residual`` (its input from
        ``start_pos`` on). Only those positions' logits are read, so the earlier ones give the
        block just their keys and values; its attention and MLP run for the tail alone."""
        layer = self.model.cfg.n_layers - 1
        block = self.model.blocks[layer]
        keys, values = self.keys[layer][prompts, :start_pos], self.values[layer][prompts, :start_pos]
        head = residual.shape[1] - tail
        if head:
            try:
                block(residual[:, :head], past_kv_cache_entry=_KeysAndValues(keys, values),
                      attention_mask=None if mask is None else mask[:, :start_pos + head])
            except _Appended as appended:
                keys, values = appended.keys, appended.values
        entry = TransformerLensKeyValueCacheEntry(keys, values, frozen=True)
        return block(residual[:, head:], past_kv_cache_entry=entry, attention_mask=mask)

    def _past(self, prompts: torch.Tensor, start_pos: int, mask: torch.Tensor | None,
              device: torch.device) -> TransformerLensKeyValueCache:
        """The baseline's keys and values of the positions before ``start_pos``, frozen: each block
        attends to them and to the suffix's own, and the cache does not grow."""
        entries = [None] * self.start + [
            TransformerLensKeyValueCacheEntry(self.keys[layer][prompts, :start_pos],
                                              self.values[layer][prompts, :start_pos], frozen=True)
            for layer in range(self.start, self.model.cfg.n_layers)]
        prefix_mask = (torch.ones((len(prompts), start_pos), dtype=torch.long, device=device)
                       if mask is None else mask[:, :start_pos])
        return TransformerLensKeyValueCache(entries, prefix_mask, frozen=True)

    def _unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """What the forward does after its last block, here for the positions kept only."""
        model = self.model
        if model.cfg.normalization_type is not None:
            residual = model.ln_final(residual)
        return apply_softcap(model.unembed(residual), model.cfg.output_logits_soft_cap)
