"""Shared fixtures: a tiny model with a tokenizer, SAEs of three architectures, small datasets,
and one local Ray cluster for the whole session."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

D_MODEL, N_CTX = 32, 64
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "fox", "and", "then", "it", "was"]


def make_tokenizer(path: Path):
    """A word-level tokenizer built in the test, loadable with AutoTokenizer (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]")
    fast.save_pretrained(str(path))
    return fast


def make_model(seed: int = 0, d_vocab: int = len(WORDS) + 2):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=3, d_model=D_MODEL, n_ctx=N_CTX, d_head=8, n_heads=4, d_vocab=d_vocab,
                                  act_fn="gelu", d_mlp=64, normalization_type="LN", seed=seed)
    return HookedSAETransformer(cfg)


def make_sae(architecture: str, hook: str, d_in: int = D_MODEL, d_sae: int = 96, seed: int = 0, **extra):
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (StandardSAEConfig, StandardSAE), "jumprelu": (JumpReLUSAEConfig, JumpReLUSAE),
               "topk": (TopKSAEConfig, TopKSAE)}
    cfg_cls, sae_cls = classes[architecture]
    torch.manual_seed(seed)
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, prepend_bos=True, model_name="tiny"),
                  **extra)
    sae = sae_cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """A saved model with tokenizer, three saved SAEs at different hooks, and datasets on disk."""
    from pipeline.models import save_model

    root = tmp_path_factory.mktemp("assets")
    tokenizer = make_tokenizer(root / "tok")
    model = make_model()
    model.tokenizer = tokenizer
    save_model(model, root / "model", tokenizer)
    saes = {
        "blocks.0.hook_resid_post": make_sae("standard", "blocks.0.hook_resid_post", seed=1),
        "blocks.1.hook_resid_pre": make_sae("jumprelu", "blocks.1.hook_resid_pre", seed=2),
        "blocks.1.hook_mlp_out": make_sae("topk", "blocks.1.hook_mlp_out", seed=3, k=8),
    }
    sae_dirs = {}
    for hook, sae in saes.items():
        sae_dirs[hook] = root / f"sae-{hook}"
        sae.save_model(sae_dirs[hook])
    rng = __import__("random").Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 150))) for _ in range(37)]
    texts[5] = ""  # an empty row makes no window
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(texts)))
    return {"root": root, "model_dir": root / "model", "sae_dirs": sae_dirs, "texts": texts, "jsonl": jsonl,
            "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the session (for each test process under pytest-xdist), with more
    logical CPUs than actors take (stack.md)."""
    import ray

    ray.init(num_cpus=6, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_store(assets, ray_cluster, tmp_path_factory):
    """The session's one complete store of ``tests.stores.config`` (read-only: copy it to change it)."""
    from tests.stores import shared_store

    return shared_store(assets, tmp_path_factory)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, above all on a shared machine (modules ask for it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test: what a test checks must be said before any request."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
