"""Extraction equals sae_lens's reference computation, window by window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.extract import ExtractConfig, run_extract
from pipeline.dataset import DatasetSpec, make_windows
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore

BF16_RTOL = 2.0**-8  # one bfloat16 rounding step
# The reference runs one window at a time, the workers a batch: float32 matmuls blocked differently
# differ by a few ulps of the pre-activations (magnitude ~5), so a small activation can be off by ~1e-6.
ATOL = 5e-6


def reference(model_dir, sae_dirs, windows_tokens, lengths):
    """What run_with_cache_with_saes(..., use_error_term=True) gives at each hook_sae_acts_post."""
    model = load_model(str(model_dir))
    saes = [load_sae(SAESource.parse(str(d))) for d in sae_dirs]
    out = {sae.cfg.metadata.hook_name: [] for sae in saes}
    for tokens, n in zip(windows_tokens, lengths):
        _, cache = model.run_with_cache_with_saes(torch.from_numpy(tokens[:n])[None], saes=saes, use_error_term=True)
        for sae in saes:
            hook = sae.cfg.metadata.hook_name
            out[hook].append(cache[f"{hook}.hook_sae_acts_post"][0].float().numpy())
    return {hook: np.concatenate(parts) for hook, parts in out.items()}


def assert_matches_reference(fs: FeatureStore, expected: dict[str, np.ndarray], rtol: float) -> None:
    for hook, dense in expected.items():
        ours = fs.csr(hook).toarray()
        assert ours.shape == dense.shape
        np.testing.assert_array_equal(ours != 0, dense != 0, err_msg=f"active features differ at {hook}")
        np.testing.assert_allclose(ours, dense, rtol=rtol, atol=ATOL, err_msg=hook)


@pytest.mark.ray
@pytest.mark.parametrize("value_dtype, rtol", [("bfloat16", BF16_RTOL), ("float32", 1e-5)])
def test_store_equals_run_with_cache_with_saes(assets, ray_cluster, tmp_path, value_dtype, rtol):
    cfg = ExtractConfig.build(
        model=str(assets["model_dir"]),
        saes=tuple(str(d) for d in assets["sae_dirs"].values()),
        dataset=DatasetSpec(str(assets["jsonl"])),
        store=str(tmp_path / "s.zarr"),
        context_size=16,
        batch_size=5,
        shard_tokens=800,
        value_dtype=value_dtype,
        workers=2,
        progress=False,
    )
    counts = run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert fs.complete and set(fs.hooks) == set(assets["sae_dirs"])

    tok = assets["tokenizer"]
    token_lists = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in assets["texts"]]
    windows = make_windows(token_lists, range(len(token_lists)), 16, tok.bos_token_id)
    assert counts["n_tokens"] == fs.n_tokens == windows.n_tokens
    np.testing.assert_array_equal(fs.token_ids(), windows.flat_tokens())
    prov = fs.provenance()
    np.testing.assert_array_equal(prov["row"], windows.rows)
    np.testing.assert_array_equal(prov["pos"], windows.positions)
    assert 5 not in set(prov["row"])  # the empty row makes no window
    # every row token appears once, at its own position, and BOS opens each window
    body = prov[prov["pos"] >= 0]
    assert not body.duplicated().any()
    assert (fs.token_ids()[prov["pos"].to_numpy() == -1] == tok.bos_token_id).all()

    expected = reference(assets["model_dir"], assets["sae_dirs"].values(), windows.tokens, windows.lengths)
    assert_matches_reference(fs, expected, rtol)


@pytest.mark.ray
def test_gemma_scope_npz_sae_equals_reference(assets, ray_cluster, tmp_path):
    """A JumpReLU SAE given as params.npz@HOOK, next to a disk SAE, in one forward."""
    from tests.conftest import make_sae

    sae = make_sae("jumprelu", "blocks.2.hook_resid_pre", seed=5)
    params = {name: p.detach().numpy() for name, p in sae.state_dict().items()}
    npz = tmp_path / "params.npz"
    np.savez(npz, **{k: params[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    texts = [t for t in assets["texts"][:10] if t]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    disk = str(assets["sae_dirs"]["blocks.0.hook_resid_post"])
    cfg = ExtractConfig.build(model=str(assets["model_dir"]), saes=(f"{npz}@blocks.2.hook_resid_pre", disk),
                              dataset=DatasetSpec(str(data)), store=str(tmp_path / "npz.zarr"), context_size=16,
                              value_dtype="float32", workers=1, index=False, progress=False)
    run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert {s["source"] for s in fs.run["saes"]} == {f"{npz}@blocks.2.hook_resid_pre", disk}
    tok = assets["tokenizer"]
    windows = make_windows([np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts],
                           range(len(texts)), 16, tok.bos_token_id)
    model = load_model(str(assets["model_dir"]))
    saes = [load_sae(SAESource.parse(s)) for s in cfg.saes]
    expected = {s.cfg.metadata.hook_name: [] for s in saes}
    for tokens, n in zip(windows.tokens, windows.lengths):
        _, cache = model.run_with_cache_with_saes(torch.from_numpy(tokens[:n])[None], saes=saes, use_error_term=True)
        for hook in expected:
            expected[hook].append(cache[f"{hook}.hook_sae_acts_post"][0].numpy())
    assert_matches_reference(fs, {h: np.concatenate(v) for h, v in expected.items()}, 1e-5)
    assert fs.csr("blocks.2.hook_resid_pre").nnz > 0
