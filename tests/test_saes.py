from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from pipeline import saes
from pipeline.saes import SAESource, load_sae, read_sae_config
from store.errors import ConfigError

D_IN, D_SAE = 8, 32
HOOK = "blocks.1.hook_resid_post"
RELEASE = "gemma-scope-2b-pt-res-canonical"
SAE_ID = "layer_0/width_16k/canonical"

ARCHITECTURES = {
    "standard": lambda meta: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)),
    "jumprelu": lambda meta: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)),
    "topk": lambda meta: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=meta)),
    "gated": lambda meta: GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)),
}


def random_sae(architecture: str, hook: str | None = HOOK):
    meta = SAEMetadata(hook_name=hook, prepend_bos=True) if hook else SAEMetadata()
    sae = ARCHITECTURES[architecture](meta)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Fresh biases and thresholds are zeros; random ones make the comparison mean something.
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return sae


def write_npz(path: Path, d_in: int = D_IN, d_sae: int = D_SAE, **overrides: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32) * 10,  # large, so subtracting it would show
        "threshold": rng.uniform(0.1, 1.0, size=d_sae).astype(np.float32),
        **overrides,
    }
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_disk_round_trip(tmp_path, architecture):
    sae = random_sae(architecture)
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(SAESource.parse(str(tmp_path / "sae")))
    assert type(loaded) is type(sae)
    assert loaded.cfg.metadata.hook_name == HOOK
    original, reloaded = sae.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        torch.testing.assert_close(reloaded[name], original[name], rtol=0, atol=0)
    x = torch.randn(5, 3, D_IN)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


def test_disk_load_honours_dtype(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    loaded = load_sae(SAESource.parse(str(tmp_path / "sae")), dtype="float16")
    assert loaded.W_enc.dtype == torch.float16


def test_npz_encode_matches_gemma_scope_jumprelu(tmp_path):
    # Feature 0's pre-activation equals its threshold exactly: sae_lens's JumpReLU keeps only pre > threshold.
    w_enc = np.random.default_rng(1).normal(size=(D_IN, D_SAE)).astype(np.float32)
    w_enc[:, 0] = 0
    b_enc = np.random.default_rng(2).normal(size=D_SAE).astype(np.float32)
    threshold = np.full(D_SAE, 0.5, dtype=np.float32)
    b_enc[0] = threshold[0]
    arrays = write_npz(tmp_path / "params.npz", W_enc=w_enc, b_enc=b_enc, threshold=threshold)
    sae = load_sae(SAESource.parse(f"{tmp_path / 'params.npz'}@{HOOK}"))

    x = np.random.default_rng(3).normal(size=(6, D_IN)).astype(np.float32)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]  # no b_dec subtracted from the input
    expected = pre * (pre > arrays["threshold"])
    with torch.inference_mode():
        acts = sae.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(acts, expected, rtol=1e-5, atol=1e-5)
    assert (acts[:, 0] == 0).all()
    assert (acts > 0).any()
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.prepend_bos is True
    np.testing.assert_array_equal(sae.b_dec.detach().numpy(), arrays["b_dec"])


def test_npz_hook_z_takes_heads(tmp_path):
    n_heads, d_head = 2, 4
    arrays = write_npz(tmp_path / "params.npz", d_in=n_heads * d_head)
    sae = load_sae(SAESource.parse(f"{tmp_path / 'params.npz'}@blocks.0.attn.hook_z"))
    z = np.random.default_rng(4).normal(size=(3, 5, n_heads, d_head)).astype(np.float32)
    pre = z.reshape(3, 5, n_heads * d_head) @ arrays["W_enc"] + arrays["b_enc"]
    with torch.inference_mode():
        acts = sae.encode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(acts, pre * (pre > arrays["threshold"]), rtol=1e-5, atol=1e-5)


def test_read_config_of_disk_sae_reads_no_weights(tmp_path, monkeypatch):
    random_sae("topk").save_model(tmp_path / "sae")
    monkeypatch.setattr(saes, "load_safetensors", lambda *a, **k: pytest.fail("weights were loaded"))
    description = read_sae_config(SAESource.parse(str(tmp_path / "sae")))
    assert (description.architecture, description.hook) == ("topk", HOOK)
    assert (description.d_in, description.d_sae, description.prepend_bos) == (D_IN, D_SAE, True)
    assert description.source == str(tmp_path / "sae")
    assert description.config["k"] == 4
    assert "device" not in description.config
    json.dumps(description.config)


def test_read_config_of_npz_reads_no_arrays(tmp_path, monkeypatch):
    write_npz(tmp_path / "params.npz")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("arrays were loaded"))
    description = read_sae_config(SAESource.parse(f"{tmp_path / 'params.npz'}@{HOOK}"))
    assert (description.architecture, description.hook) == ("jumprelu", HOOK)
    assert (description.d_in, description.d_sae, description.prepend_bos) == (D_IN, D_SAE, True)
    assert description.config["apply_b_dec_to_input"] is False
    json.dumps(description.config)


def test_read_config_of_gemma_scope_release_offline():
    # sae_lens derives Gemma Scope configs from the release's names, with no download.
    description = read_sae_config(SAESource.parse(f"{RELEASE}/{SAE_ID}"))
    assert (description.architecture, description.hook) == ("jumprelu", "blocks.0.hook_resid_post")
    assert (description.d_in, description.d_sae, description.prepend_bos) == (2304, 16384, True)
    json.dumps(description.config)


def test_unreachable_hub_is_a_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(saes, "load_sae_config_from_huggingface", offline)
    with pytest.raises(ConfigError, match="could not fetch it from the Hugging Face hub.*save_model"):
        read_sae_config(SAESource.parse(f"{RELEASE}/{SAE_ID}"))


@pytest.mark.parametrize(
    "kind, text",
    [("pretrained", f"{RELEASE}/{SAE_ID}"), ("npz", "NPZ@blocks.3.hook_mlp_out"), ("disk", "DIR")],
)
def test_parse_round_trips(tmp_path, kind, text):
    write_npz(tmp_path / "params.npz")
    (tmp_path / "sae").mkdir()
    text = text.replace("NPZ", str(tmp_path / "params.npz")).replace("DIR", str(tmp_path / "sae"))
    source = SAESource.parse(text)
    assert source.kind == kind
    assert str(source) == text
    assert SAESource.parse(str(source)) == source


def test_parse_pretrained_splits_at_first_slash():
    source = SAESource.parse(f"{RELEASE}/{SAE_ID}")
    assert (source.location, source.sae_id, source.hook) == (RELEASE, SAE_ID, None)


def test_npz_without_hook(tmp_path):
    write_npz(tmp_path / "params.npz")
    for text in (str(tmp_path / "params.npz"), f"{tmp_path / 'params.npz'}@"):
        with pytest.raises(ConfigError, match=r"needs the hook it reads.*PATH\.npz@HOOK"):
            SAESource.parse(text)


def test_npz_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no file"):
        SAESource.parse(f"{tmp_path / 'absent.npz'}@{HOOK}")


def test_npz_with_wrong_arrays(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32))
    with pytest.raises(ConfigError, match="holds the arrays W_enc, W_dec, b_enc, b_dec, threshold; found W_enc"):
        read_sae_config(SAESource.parse(f"{tmp_path / 'params.npz'}@{HOOK}"))


def test_npz_with_wrong_shapes(tmp_path):
    write_npz(tmp_path / "params.npz", b_dec=np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match=r"shapes do not fit.*b_dec \[3\]"):
        load_sae(SAESource.parse(f"{tmp_path / 'params.npz'}@{HOOK}"))


def test_truncated_npz(tmp_path):
    write_npz(tmp_path / "params.npz")
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="not a readable npz.*truncated"):
        read_sae_config(SAESource.parse(f"{tmp_path / 'params.npz'}@{HOOK}"))


def test_dir_without_cfg_json(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").unlink()
    with pytest.raises(ConfigError, match="needs cfg.json and sae_weights.safetensors.*found sae_weights"):
        read_sae_config(SAESource.parse(str(tmp_path / "sae")))


def test_pickle_only_dir_is_refused(tmp_path):
    sae = random_sae("standard")
    sae.save_model(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").unlink()
    torch.save(sae.state_dict(), tmp_path / "sae" / "sae_weights.pt")
    for action in (load_sae, read_sae_config):
        with pytest.raises(ConfigError, match=r"pickled weights \(sae_weights.pt\).*arbitrary code.*save_file"):
            action(SAESource.parse(str(tmp_path / "sae")))


def test_dir_without_weights(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").unlink()
    with pytest.raises(ConfigError, match="no sae_weights.safetensors"):
        load_sae(SAESource.parse(str(tmp_path / "sae")))


def test_truncated_safetensors(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="not a readable safetensors file.*truncated"):
        load_sae(SAESource.parse(str(tmp_path / "sae")))


def test_weights_that_do_not_match_the_config(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "d_sae": D_SAE * 2}))
    with pytest.raises(ConfigError, match="(?s)does not match the SAE that cfg.json describes.*size mismatch.*save_model"):
        load_sae(SAESource.parse(str(tmp_path / "sae")))


def test_config_without_hook(tmp_path):
    random_sae("standard", hook=None).save_model(tmp_path / "sae")
    source = SAESource.parse(str(tmp_path / "sae"))
    for action in (load_sae, read_sae_config):
        with pytest.raises(ConfigError, match=r"names no hook \(metadata.hook_name\)"):
            action(source)


def test_unknown_architecture(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architecture": "topkk"}))
    with pytest.raises(ConfigError, match="unknown SAE architecture 'topkk'. sae_lens knows: topk"):
        read_sae_config(SAESource.parse(str(tmp_path / "sae")))


def test_unknown_release_lists_the_closest_first():
    with pytest.raises(ConfigError, match=f"'gemma-scope-2b-pt-res-canonicl' is not a sae_lens pretrained release. Releases: {RELEASE}"):
        SAESource.parse(f"gemma-scope-2b-pt-res-canonicl/{SAE_ID}")


def test_unknown_id_in_known_release():
    with pytest.raises(ConfigError, match=f"release '{RELEASE}' has no SAE 'layer_0/width_16k/canonicl'. Its SAE ids: {SAE_ID}"):
        SAESource.parse(f"{RELEASE}/layer_0/width_16k/canonicl")


def test_bad_dtype(tmp_path):
    random_sae("standard").save_model(tmp_path / "sae")
    with pytest.raises(ConfigError, match="dtype 'float8' is not one of float32"):
        load_sae(SAESource.parse(str(tmp_path / "sae")), dtype="float8")


@pytest.mark.parametrize("text", ["", "garbage"])
def test_garbage(text):
    with pytest.raises(ConfigError, match=r"is not an SAE this tool can load. Accepted forms:\n  DIR.*\n  PATH\.npz@HOOK.*\n  RELEASE/SAE_ID"):
        SAESource.parse(text)


@pytest.mark.parametrize("text", ["/no/such/dir", "./no/such/dir"])
def test_missing_directory_says_so(text):
    with pytest.raises(ConfigError, match=rf"--sae {text}: no such directory\. A disk SAE is a directory"):
        SAESource.parse(text)
