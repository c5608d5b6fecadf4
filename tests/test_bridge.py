"""Hugging Face model directories load through TransformerLens's TransformerBridge (sae_lens's
SAETransformerBridge), and extraction, queries and sweeps on them equal sae_lens's own bridge
computations. The model is a tiny GPT-2 built here with transformers and save_pretrained."""

from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from conftest import D_MODEL, N_CTX, WORDS, make_sae, make_tokenizer
from pipeline.models import BRIDGE, HOOKED, hook_names, hook_point, load_model, load_model_config, model_format
from store.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

SAES = {  # hook -> (architecture, extra config, the bridge's own name for the hook)
    "blocks.0.hook_resid_post": ("standard", {}, "blocks.0.hook_out"),
    "blocks.1.hook_resid_pre": ("jumprelu", {}, "blocks.1.hook_in"),
    "blocks.1.hook_mlp_out": ("topk", {"k": 8}, "blocks.1.mlp.hook_out"),
}
ATOL = 5e-6  # float32 matmuls of another batch shape differ by a few ulps (as in test_extract_exact)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 as transformers saves it (config.json, model.safetensors, generation_config.json),
    with the tests' word-level tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS) + 2, n_positions=N_CTX, n_embd=D_MODEL, n_layer=3, n_head=4,
                        n_inner=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def saes():
    return {hook: make_sae(arch, hook, seed=i + 1, **extra) for i, (hook, (arch, extra, _)) in enumerate(SAES.items())}


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_model(str(hf_dir))


@pytest.fixture(scope="module")
def reference(hf_dir):
    """sae_lens's own SAETransformerBridge, loaded its own way."""
    from sae_lens import SAETransformerBridge
    from transformers import AutoTokenizer

    return SAETransformerBridge.boot_transformers(str(hf_dir), device="cpu",
                                                  tokenizer=AutoTokenizer.from_pretrained(str(hf_dir))).eval()


def reference_acts(reference, sae, tokens, **kwargs) -> torch.Tensor:
    """``hook_sae_acts_post`` under ``run_with_cache_with_saes(..., use_error_term=True)``, as sae_lens
    names it on the bridge."""
    with torch.no_grad():
        _, cache = reference.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, **kwargs)
    return cache[reference.get_sae_hook_name(sae)]


# -- loading -------------------------------------------------------------------------------------


def test_a_hugging_face_directory_loads_through_the_bridge(hf_dir, model, assets):
    assert model_format(str(hf_dir)) == BRIDGE
    assert model_format(str(assets["model_dir"])) == HOOKED  # latentstore's own format
    assert model_format("gpt2-small") == HOOKED  # a hub name
    from sae_lens import SAETransformerBridge

    assert isinstance(model, SAETransformerBridge) and not model.training
    assert (model.cfg.n_ctx, model.cfg.d_vocab, model.cfg.d_model, model.cfg.n_layers) == (N_CTX, len(WORDS) + 2,
                                                                                          D_MODEL, 3)
    assert next(model.parameters()).dtype == torch.float32  # the config's dtype
    assert next(load_model(str(hf_dir), dtype="bfloat16").parameters()).dtype == torch.bfloat16

    # Without loading weights, the driver sees the same config and both names of every hook.
    cfg = load_model_config(str(hf_dir))
    assert (cfg.n_ctx, cfg.d_vocab, cfg.dtype) == (N_CTX, len(WORDS) + 2, torch.float32)
    names = set(hook_names(cfg))
    for hook, (_, _, own) in SAES.items():
        assert {hook, own} <= names
        assert hook_point(model, hook) == own
    assert hook_point(model, "blocks.0.hook_resid_post") == "blocks.0.hook_out"

    # The same logits as transformers' own forward (eager attention, as the bridge runs it).
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    tokens = torch.randint(1, len(WORDS) + 2, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_the_bridge_takes_transformer_lens_hook_names(model, saes):
    """Caches, hooks and SAE hooks by TransformerLens's names; sae_lens's own bridge drops them."""
    tokens = torch.randint(1, len(WORDS) + 2, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre", "blocks.1.hook_in"])
    assert cache["blocks.1.hook_resid_pre"].shape == (2, 7, D_MODEL)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_in"], rtol=0, atol=0)

    sae = saes["blocks.1.hook_resid_pre"]
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True,
                                                  names_filter=["blocks.1.hook_resid_pre.hook_sae_acts_post",
                                                                "blocks.1.hook_resid_pre.hook_sae_output"])
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
    assert acts.shape == (2, 7, sae.cfg.d_sae) and (acts != 0).any()
    assert "blocks.1.hook_resid_pre.hook_sae_output" in cache

    # After sae_lens removed the SAE, a hook at that point still runs (its fresh point was misnamed).
    seen = []
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x.shape)),
                                                ("blocks.1.hook_in", lambda x, hook: seen.append(hook.name))])
    assert seen == [(2, 7, D_MODEL), "blocks.1.hook_in"]


# -- extraction ------------------------------------------------------------------------------------


def test_encoder_equals_sae_lens_bridge(model, reference, saes):
    """The worker's encoder on a right-padded batch: each SAE's nonzeros at the real tokens are exactly
    sae_lens's bridge's hook_sae_acts_post over the same batch."""
    from pipeline.encode import SparseEncoder, concat_batches

    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, len(WORDS) + 2, (4, 11), generator=gen)
    lengths = torch.tensor([11, 7, 3, 9])
    batches = SparseEncoder(model, saes, "float32")(tokens, lengths)
    real = torch.arange(11)[None, :] < lengths[:, None]
    for hook, sae in saes.items():
        expected = reference_acts(reference, sae, tokens)[real].numpy()
        indptr, indices, values = concat_batches([batches[hook]], np.dtype("<u2"), np.dtype("<f4"), int(real.sum()))
        ours = np.zeros_like(expected)
        ours[np.repeat(np.arange(len(expected)), np.diff(indptr)), indices] = values
        assert (expected != 0).sum() > 20, hook  # the SAE fires, so the comparison says something
        np.testing.assert_array_equal(ours != 0, expected != 0, err_msg=hook)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=ATOL, err_msg=hook)


@pytest.fixture(scope="module")
def bridge_store(hf_dir, saes, ray_cluster, tmp_path_factory):
    """A store extracted from the Hugging Face directory by the real command's driver and workers."""
    from jobs.extract import ExtractConfig, run_extract
    from pipeline.dataset import DatasetSpec

    root = tmp_path_factory.mktemp("bridge-store")
    sae_dirs = {}
    for hook, sae in saes.items():
        sae_dirs[hook] = root / f"sae-{hook}"
        sae.save_model(sae_dirs[hook])
    rng = __import__("random").Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(24)]
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = ExtractConfig.build(model=str(hf_dir), saes=tuple(str(d) for d in sae_dirs.values()),
                              dataset=DatasetSpec(str(jsonl)), store=str(root / "s.zarr"), context_size=16,
                              batch_size=5, shard_tokens=200, value_dtype="float32", workers=2, progress=False)
    run_extract(cfg)
    from store import FeatureStore

    return FeatureStore.open(cfg.store.path), texts


def test_store_equals_sae_lens_bridge_and_records_both_hook_names(bridge_store, reference, saes, hf_dir):
    from pipeline.dataset import make_windows
    from pipeline.models import load_local_tokenizer

    fs, texts = bridge_store
    tok = load_local_tokenizer(hf_dir)
    token_lists = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    windows = make_windows(token_lists, range(len(texts)), 16, tok.bos_token_id)
    np.testing.assert_array_equal(fs.token_ids(), windows.flat_tokens())
    for hook, sae in saes.items():
        expected = np.concatenate([
            reference_acts(reference, sae, torch.from_numpy(t[:n].astype(np.int64))[None])[0].numpy()
            for t, n in zip(windows.tokens, windows.lengths)])
        ours = fs.csr(hook).toarray()
        np.testing.assert_array_equal(ours != 0, expected != 0, err_msg=hook)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=ATOL, err_msg=hook)

        # queries: the top activations of the busiest feature are the reference's largest values
        feature = int(np.argmax((expected != 0).sum(0)))
        top = fs.top_activations(hook, feature, k=5, exclude_special_tokens=False)
        column = expected[:, feature]
        np.testing.assert_allclose(np.sort(top["activation"].to_numpy())[::-1], np.sort(column)[::-1][:5],
                                   rtol=1e-5, atol=ATOL)
        np.testing.assert_allclose(column[top["token_index"].to_numpy()], top["activation"].to_numpy(),
                                   rtol=1e-5, atol=ATOL)

    run = fs.run
    assert run["model"]["loader"] == BRIDGE and run["model"]["name"] == str(hf_dir.resolve())
    assert {sae["hook"]: sae["hook_point"] for sae in run["saes"]} == {h: own for h, (_, _, own) in SAES.items()}


# -- sweeps ----------------------------------------------------------------------------------------


def logit_diff(logits, answers):
    final = logits[:, -1, :]
    return final.gather(-1, answers[:, :1])[:, 0] - final.gather(-1, answers[:, 1:])[:, 0]


def zero_feature(acts, hook, feature, pos):
    acts[:, pos, feature] = 0.0
    return acts


def bridge_loop(reference, sae, tokens, metric, features, pos, use_error_term, attention_mask=None):
    """Notebook 000's loop on sae_lens's bridge: one spliced forward per feature, the feature zeroed
    at hook_sae_acts_post by the name sae_lens gives it there."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    name = reference.get_sae_hook_name(sae)
    effects = np.zeros((len(tokens), len(features)))
    with torch.no_grad(), reference.saes(saes=[sae], use_error_term=use_error_term):
        baseline = metric(reference(tokens, **kwargs))
        for i, f in enumerate(features):
            with reference.hooks(fwd_hooks=[(name, partial(zero_feature, feature=int(f), pos=pos))]):
                effects[:, i] = (metric(reference(tokens, **kwargs)) - baseline).numpy()
    return effects


@pytest.mark.parametrize("hook", list(SAES))
@pytest.mark.parametrize("use_error_term", [False, True])
def test_sweep_equals_sae_lens_bridge_loop(model, reference, saes, hook, use_error_term):
    from pipeline.ablation import ablation_sweep

    sae = saes[hook]
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, len(WORDS) + 2, (5, 10), generator=gen)
    answers = torch.randint(0, len(WORDS) + 2, (5, 2), generator=gen)
    metric = partial(logit_diff, answers=answers)
    frame = ablation_sweep(model, sae, tokens, metric, position=-1, use_error_term=use_error_term, batch_size=8)
    live = (reference_acts(reference, sae, tokens)[:, -1] != 0).any(0).nonzero()[:, 0].numpy()
    np.testing.assert_array_equal(np.unique(frame["feature"]), live)
    ours = frame.pivot(index="prompt", columns="feature", values="delta").loc[:, list(live)].to_numpy()
    expected = bridge_loop(reference, sae, tokens, metric, live, -1, use_error_term)
    assert np.abs(expected).max() > 1e-3  # the features matter, so the comparison says something
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sweep_over_store_rows_equals_sae_lens_bridge_loop(bridge_store, model, reference, saes):
    """Prompts that are rows of the bridge's store (left-padded, live features read from the store)."""
    from pipeline.ablation import StorePrompts, ablation_sweep

    fs, texts = bridge_store
    rows = [i for i, t in enumerate(texts) if 3 <= len(t.split()) <= 14][:4]
    prompts = StorePrompts.from_store(fs, rows)
    assert prompts.attention_mask is not None  # rows of different lengths: padding on the left
    hook = "blocks.1.hook_resid_pre"
    answers = torch.tensor([[2, 3], [4, 5], [6, 7], [8, 9]])[:len(rows)]
    metric = partial(logit_diff, answers=answers)
    frame = ablation_sweep(model, saes[hook], prompts, metric, position=-1, use_error_term=True)
    live = np.unique(frame["feature"])
    assert len(live) > 3 and set(frame["row"]) == set(rows)
    ours = frame.pivot(index="prompt", columns="feature", values="delta").loc[:, list(live)].to_numpy()
    expected = bridge_loop(reference, saes[hook], prompts.tokens, metric, live, -1, True, prompts.attention_mask)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# -- bad input -------------------------------------------------------------------------------------


def test_a_bridge_directory_without_config_is_refused_before_any_work(hf_dir, tmp_path, assets):
    from jobs.extract import ExtractConfig, validate
    from pipeline.dataset import DatasetSpec

    broken = tmp_path / "no-config"
    shutil.copytree(hf_dir, broken)
    (broken / "config.json").unlink()
    for call in (lambda: load_model_config(str(broken)), lambda: load_model(str(broken))):
        with pytest.raises(ConfigError, match=r"looks like a Hugging Face model directory .* no config\.json.*"
                                              r"model\.save_pretrained\(dir\)"):
            call()
    # a directory without save_pretrained's extra files is still told apart by its weights' names
    (broken / "generation_config.json").unlink()
    with pytest.raises(ConfigError, match="looks like a Hugging Face model directory"):
        load_model_config(str(broken))

    store = tmp_path / "never.zarr"
    cfg = ExtractConfig.build(model=str(broken), saes=(str(tmp_path),), dataset=DatasetSpec(str(assets["jsonl"])),
                              store=str(store), progress=False)
    with pytest.raises(ConfigError, match="no config.json"):
        validate(cfg)
    assert not store.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"needs config.json and model.safetensors; found nothing.*save_pretrained"):
        load_model_config(str(empty))


def test_a_bridge_directory_without_tokenizer_or_with_pickled_weights_is_refused(hf_dir, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(ConfigError, match=r"needs its tokenizer beside it.*tokenizer\.save_pretrained\(dir\)"):
        load_model_config(str(no_tokenizer))

    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"no model.safetensors .* pytorch_model.bin: pickled weights are refused"):
        load_model(str(pickled))


def test_help_says_how_to_pass_a_bridge_model(capsys):
    from jobs.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "save_pretrained" in text and "TransformerBridge" in text and "model_type" in text


def test_encoder_on_the_bridge_takes_a_transcoder_and_two_saes_at_one_hook(model, reference, saes):
    """Named SAEs on a bridge model: a skip transcoder (read at the MLP's input, by the bridge's own
    name for it) and two SAEs at one hook each give exactly their ``encode`` of what sae_lens's bridge
    caches at the hook they read."""
    from pipeline.encode import SparseEncoder, concat_batches
    from test_transcoders import make_transcoder

    hook = "blocks.0.hook_resid_post"
    named = {"tc": make_transcoder("jumprelu_skip_transcoder", seed=7), "a": saes[hook],
             "b": make_sae("topk", hook, d_sae=40, seed=9, k=6)}
    tokens = torch.randint(1, len(WORDS) + 2, (3, 9), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([9, 4, 6])
    batches = SparseEncoder(model, named, "float32")(tokens, lengths)
    real = torch.arange(9)[None, :] < lengths[:, None]
    points = {name: hook_point(model, sae.cfg.metadata.hook_name) for name, sae in named.items()}
    with torch.no_grad():
        _, cache = reference.run_with_cache(tokens, names_filter=list(set(points.values())))
    for name, sae in named.items():
        with torch.no_grad():
            expected = sae.encode(cache[points[name]][real]).numpy()
        indptr, indices, values = concat_batches([batches[name]], np.dtype("<u2"), np.dtype("<f4"), int(real.sum()))
        ours = np.zeros_like(expected)
        ours[np.repeat(np.arange(len(expected)), np.diff(indptr)), indices] = values
        assert (expected != 0).sum() > 10, name  # it fires, so the comparison says something
        np.testing.assert_array_equal(ours != 0, expected != 0, err_msg=name)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=ATOL, err_msg=name)
