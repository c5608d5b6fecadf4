"""Every architecture sae_lens loads, each on a tiny instance built here: gated SAEs; BatchTopK and
Matryoshka SAEs (sae_lens saves them as JumpReLU); TopK with decoder-norm rescaling and with sparse
(COO) output; SAEs that normalise activations at run time; and transcoders. Extraction equals
sae_lens's own computation, and ablation sweeps equal notebook 000's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, StandardSAE, TopKSAE
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                           MatryoshkaBatchTopKTrainingSAEConfig, TemporalSAE, TemporalSAEConfig, TopKTrainingSAE,
                           TopKTrainingSAEConfig)
from sae_lens.saes.sae import SAEMetadata

from conftest import D_MODEL, make_model, make_sae
from pipeline.ablation import ablation_sweep
from pipeline.encode import SparseEncoder
from pipeline.metrics import LogitDiff
from pipeline.saes import SAESource, load_sae, read_sae_config
from store.errors import ConfigError
from test_ablation import as_grid, assert_close, naive_live, naive_sweep
from test_transcoders import make_transcoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

D_SAE = 64


def randomize(sae, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


def metadata(hook: str) -> SAEMetadata:
    return SAEMetadata(hook_name=hook, prepend_bos=True, model_name="tiny")


def gated(hook: str, seed: int = 0):
    return randomize(GatedSAE(GatedSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=metadata(hook))), seed)


def batch_topk_training(hook: str, seed: int = 0, matryoshka: bool = False):
    """A BatchTopK (or Matryoshka BatchTopK) training SAE whose learnt threshold is set."""
    if matryoshka:
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=6, matryoshka_widths=[16, D_SAE],
                                                   metadata=metadata(hook))
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=6, metadata=metadata(hook)))
    randomize(sae, seed)
    sae.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    return sae


def saved_as_inference(training_sae, path):
    """What sae_lens writes after training (``save_inference_model``), loaded back by latentstore."""
    training_sae.save_inference_model(path)
    return load_sae(SAESource.parse(str(path)))


def sparse_topk(hook: str, seed: int = 0):
    """TopK whose encode gives a sparse COO tensor, with decoder-norm rescaling (training class)."""
    cfg = TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=7, use_sparse_activations=True,
                                rescale_acts_by_decoder_norm=True, metadata=metadata(hook))
    return randomize(TopKTrainingSAE(cfg), seed)


def kinds(tmp_path) -> dict:
    """name -> (hook, SAE) for every kind, each at its own hook."""
    return {
        "gated": ("blocks.0.hook_resid_pre", gated("blocks.0.hook_resid_pre", 1)),
        "batchtopk": ("blocks.0.hook_resid_mid",
                      saved_as_inference(batch_topk_training("blocks.0.hook_resid_mid", 2), tmp_path / "btk")),
        "matryoshka": ("blocks.0.hook_attn_out", saved_as_inference(
            batch_topk_training("blocks.0.hook_attn_out", 3, matryoshka=True), tmp_path / "mat")),
        "topk_rescaled": ("blocks.0.hook_resid_post", make_sae("topk", "blocks.0.hook_resid_post", d_sae=D_SAE, seed=4,
                                                               k=7, rescale_acts_by_decoder_norm=True)),
        "topk_sparse": ("blocks.1.hook_attn_out", sparse_topk("blocks.1.hook_attn_out", 5)),
        "layer_norm": ("blocks.1.hook_resid_pre", make_sae("standard", "blocks.1.hook_resid_pre", d_sae=D_SAE, seed=6,
                                                           normalize_activations="layer_norm")),
        "constant_norm_rescale": ("blocks.1.hook_resid_mid", make_sae(
            "jumprelu", "blocks.1.hook_resid_mid", d_sae=D_SAE, seed=7, normalize_activations="constant_norm_rescale")),
        "expected_average_only_in": ("blocks.2.hook_resid_pre", make_sae(
            "topk", "blocks.2.hook_resid_pre", d_sae=D_SAE, seed=8, k=7, normalize_activations="expected_average_only_in")),
        "transcoder": ("blocks.0.ln2.hook_normalized", make_transcoder(
            "transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", seed=9)),
        "skip_transcoder": ("blocks.1.ln2.hook_normalized", make_transcoder(
            "skip_transcoder", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", seed=10)),
        "jumprelu_transcoder": ("blocks.2.ln2.hook_normalized", make_transcoder(
            "jumprelu_transcoder", "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", seed=11)),
        "jumprelu_skip_transcoder": ("blocks.1.hook_resid_post", make_transcoder(
            "jumprelu_skip_transcoder", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", seed=12)),
    }


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory):
    return kinds(tmp_path_factory.mktemp("kinds"))


def reference(model, saes: dict, windows: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per window: SAEs as run_with_cache_with_saes(..., use_error_term=True) gives them at
    hook_sae_acts_post; transcoders as tc.encode(cache[input hook])."""
    plain = [sae for sae in saes.values() if not hasattr(sae.cfg, "d_out")]
    out = {hook: [] for hook in saes}
    with torch.no_grad():
        for window in windows:
            _, cache = model.run_with_cache_with_saes(window[None], saes=plain, use_error_term=True)
            for hook, sae in saes.items():
                acts = sae.encode(cache[hook]) if hasattr(sae.cfg, "d_out") else cache[f"{hook}.hook_sae_acts_post"]
                out[hook].append(acts[0].to_dense().float().numpy())
    return {hook: np.concatenate(parts) for hook, parts in out.items()}


def test_the_kinds_are_what_they_claim(all_kinds):
    assert isinstance(all_kinds["batchtopk"][1], JumpReLUSAE)
    assert isinstance(all_kinds["matryoshka"][1], JumpReLUSAE)
    assert torch.all(all_kinds["batchtopk"][1].threshold == 0.4)
    assert isinstance(all_kinds["topk_rescaled"][1], TopKSAE)
    assert not torch.allclose(all_kinds["topk_rescaled"][1].W_dec.norm(dim=-1), torch.ones(D_SAE))  # not folded
    assert all_kinds["topk_sparse"][1].encode(torch.randn(3, D_MODEL)).is_sparse
    assert isinstance(all_kinds["layer_norm"][1], StandardSAE)


def test_encoder_equals_sae_lens(model, all_kinds):
    """The extraction encoder over right-padded windows equals sae_lens window by window."""
    saes = {hook: sae for hook, sae in all_kinds.values()}
    torch.manual_seed(21)
    tokens = torch.randint(1, model.cfg.d_vocab, (4, 11))
    lengths = torch.tensor([11, 3, 8, 1])
    found = SparseEncoder(model, saes, "float32")(tokens, lengths)
    expected = reference(model, saes, [tokens[i, :n] for i, n in enumerate(lengths.tolist())])
    for name, (hook, _) in all_kinds.items():
        batch, dense = found[hook], expected[hook]
        ours = np.zeros(dense.shape, np.float32)
        ours[np.repeat(np.arange(len(batch.counts)), batch.counts), batch.indices.astype(np.int64)] = batch.values
        assert (dense != 0).sum() >= 20, name
        np.testing.assert_array_equal(ours != 0, dense != 0, err_msg=name)
        np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=5e-6, err_msg=name)


@pytest.mark.parametrize("name", ["gated", "batchtopk", "matryoshka", "topk_rescaled", "topk_sparse", "layer_norm",
                                  "constant_norm_rescale", "expected_average_only_in"])
@pytest.mark.parametrize("use_error_term", [False, True])
def test_sweep_equals_notebook_loop(model, all_kinds, name, use_error_term):
    hook, sae = all_kinds[name]
    torch.manual_seed(22)
    tokens = torch.randint(1, model.cfg.d_vocab, (5, 10))
    answers = torch.randint(0, model.cfg.d_vocab, (5, 2))
    metric = LogitDiff(answers)
    live = naive_live(model, sae, tokens, -1)
    assert len(live) > 3
    frame = ablation_sweep(model, sae, tokens, metric, use_error_term=use_error_term, batch_size=16)
    np.testing.assert_array_equal(np.unique(frame["feature"]), live)
    expected = naive_sweep(model, sae, tokens, metric, live, -1, use_error_term)
    assert np.abs(expected).max() > 1e-3
    assert_close(as_grid(frame, live), expected)


@pytest.mark.parametrize("name", ["layer_norm", "constant_norm_rescale"])
def test_normalising_sweep_by_attribution_equals_autograd(model, all_kinds, name):
    hook, sae = all_kinds[name]
    torch.manual_seed(23)
    tokens = torch.randint(1, model.cfg.d_vocab, (4, 8))
    metric = LogitDiff(torch.randint(0, model.cfg.d_vocab, (4, 2)))
    attributed = ablation_sweep(model, sae, tokens, metric, method="attribution", verify_top=3)
    exact = ablation_sweep(model, sae, tokens, metric)
    verified = attributed[attributed["method"] == "exact"].merge(exact, on=["prompt", "feature"], suffixes=("", "_x"))
    assert verified["feature"].nunique() == 3
    np.testing.assert_allclose(verified["delta"], verified["delta_x"], rtol=1e-6)

    # Direct: gradient of the metric with respect to hook_sae_acts_post in sae_lens's spliced run,
    # through its decoder's per-token de-normalisation.
    captured = {}

    def keep(acts, hook):
        captured["acts"] = acts.detach().requires_grad_(True)
        return captured["acts"]

    with torch.enable_grad():
        logits = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(hook + ".hook_sae_acts_post", keep)])
        (grad,) = torch.autograd.grad(metric(logits).sum(), captured["acts"])
    direct = (-captured["acts"].detach()[:, -1] * grad[:, -1]).numpy()
    live = np.unique(attributed["feature"])
    ours = attributed.pivot(index="prompt", columns="feature", values="attribution").loc[:, live].to_numpy()
    np.testing.assert_allclose(ours, direct[:, live], rtol=1e-4, atol=1e-6)


def test_temporal_sae_is_refused(tmp_path, model):
    cfg = TemporalSAEConfig(d_in=D_MODEL, d_sae=D_SAE, n_heads=4, bottleneck_factor=8, metadata=metadata("blocks.0.hook_resid_post"))
    TemporalSAE(cfg).save_model(tmp_path / "t")
    for read in (read_sae_config, load_sae):
        with pytest.raises(ConfigError, match="temporal SAEs are not supported: its codes depend on the tokens"):
            read(SAESource.parse(str(tmp_path / "t")))
    with pytest.raises(ConfigError, match="temporal SAEs are not supported"):
        ablation_sweep(model, TemporalSAE(cfg), torch.ones((1, 3), dtype=torch.long), LogitDiff(torch.ones((1, 2), dtype=torch.long)))


# -- one extraction of every kind, through Ray ------------------------------------------------------


@pytest.mark.ray
def test_store_of_every_kind_equals_sae_lens(assets, ray_cluster, tmp_path):
    from jobs.extract import run_extract
    from pipeline.dataset import make_windows
    from pipeline.models import load_model
    from store import FeatureStore
    from tests.stores import config

    directories = []
    for name, (hook, sae) in kinds(tmp_path).items():
        if isinstance(sae, TopKTrainingSAE):  # as sae_lens saves it after training: norms folded
            saved = saved_as_inference(sae, tmp_path / name)
        else:
            sae.save_model(tmp_path / name)
            saved = load_sae(SAESource.parse(str(tmp_path / name)))
        directories.append((hook, saved, str(tmp_path / name)))
    cfg = config(assets, tmp_path / "kinds.zarr", saes=tuple(d for _, _, d in directories), value_dtype="float32",
                 max_tokens=600)
    run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert fs.complete and set(fs.hooks) == {hook for hook, _, _ in directories}

    recorded = {sae["hook"]: sae for sae in fs.run["saes"]}
    assert recorded["blocks.1.ln2.hook_normalized"]["hook_out"] == "blocks.1.hook_mlp_out"
    assert recorded["blocks.1.hook_resid_post"]["hook_out"] == "blocks.2.hook_mlp_out"
    assert recorded["blocks.1.hook_resid_post"]["architecture"] == "jumprelu_skip_transcoder"
    assert "hook_out" not in recorded["blocks.0.hook_resid_pre"]
    assert recorded["blocks.0.hook_resid_mid"]["architecture"] == "jumprelu"  # BatchTopK, as saved

    # dashboards' logit tables: a transcoder's decoder writes its output hook (here the MLP's output,
    # which adds into the residual stream), so its logit effects are W_dec @ W_U
    from pipeline.dashboard_data import load_logit_weights, model_unembed

    skip_tc = next(sae for hook, sae, _ in directories if hook == "blocks.1.ln2.hook_normalized")
    weights = load_logit_weights(fs, "blocks.1.ln2.hook_normalized")
    np.testing.assert_array_equal(weights.W_dec, skip_tc.W_dec.detach().numpy())
    np.testing.assert_array_equal(weights.W_U, model_unembed(str(assets["model_dir"])).numpy())

    model = load_model(str(assets["model_dir"]))
    tok = assets["tokenizer"]
    token_lists = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in assets["texts"]]
    windows = make_windows(token_lists, range(len(token_lists)), 16, tok.bos_token_id, token_limit=600)
    expected = reference(model, {hook: sae for hook, sae, _ in directories},
                         [torch.from_numpy(t[:n]) for t, n in zip(windows.tokens, windows.lengths)])
    for hook, dense in expected.items():
        ours = fs.csr(hook).toarray()
        assert ours.shape == dense.shape and (dense != 0).sum() > 100, hook
        np.testing.assert_array_equal(ours != 0, dense != 0, err_msg=hook)
        np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=5e-6, err_msg=hook)
