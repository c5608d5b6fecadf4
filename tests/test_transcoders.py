"""Transcoders and skip transcoders: latents are ``encode`` of the input hook's activation; in
sweeps, splices and steering their output replaces the OUTPUT hook's activation. Each
intervention is checked against the same intervention written here with plain TransformerLens
hooks."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from sae_lens import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                      JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig)
from sae_lens.saes.sae import SAEMetadata

from conftest import D_MODEL, make_model, make_sae
from pipeline.ablation import ablation_sweep
from pipeline.encode import SparseEncoder
from pipeline.metrics import LogitDiff
from pipeline.saes import SAESource, load_sae, read_sae_config
from pipeline.splice import splice_eval
from pipeline.steering import steer
from store.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

N_PROMPTS, SEQ = 5, 9
HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
KINDS = {
    "transcoder": (TranscoderConfig, Transcoder),
    "skip_transcoder": (SkipTranscoderConfig, SkipTranscoder),
    "jumprelu_transcoder": (JumpReLUTranscoderConfig, JumpReLUTranscoder),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoderConfig, JumpReLUSkipTranscoder),
}


def make_transcoder(kind: str, hook_in: str = HOOK_IN, hook_out: str | None = HOOK_OUT, d_sae: int = 48,
                    seed: int = 0):
    """A transcoder of ``kind`` with random weights (a random skip matrix, so that the skip path shows)."""
    cfg_cls, tc_cls = KINDS[kind]
    meta = {"hook_name": hook_in, "prepend_bos": True, "model_name": "tiny"}
    if hook_out is not None:
        meta["hook_name_out"] = hook_out
    torch.manual_seed(seed)
    tc = tc_cls(cfg_cls(d_in=D_MODEL, d_sae=d_sae, d_out=D_MODEL, apply_b_dec_to_input=False,
                        metadata=SAEMetadata(**meta)))
    with torch.no_grad():
        for name, p in tc.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return tc


def writes(tc, x: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """What the transcoder writes, as sae_lens's forward computes it: decode, plus x @ W_skip.T."""
    out = acts @ tc.W_dec + tc.b_dec
    return out + x @ tc.W_skip.T if hasattr(tc, "W_skip") else out


def spliced_hooks(tc, use_error_term: bool, edit=None) -> list:
    """The splice written out with plain hooks: capture the input, replace the output."""
    seen = {}

    def capture(x, hook):
        seen["x"] = x

    def replace(original, hook):
        x = seen.pop("x")
        acts = tc.encode(x)
        out = writes(tc, x, acts if edit is None else edit(acts.clone()))
        if use_error_term:
            out = out + (original - writes(tc, x, acts))
        return out

    return [(tc.cfg.metadata.hook_name, capture), (tc.cfg.metadata.hook_name_out, replace)]


def zero_feature(acts, feature, pos):
    if pos is None:
        acts[:, :, feature] = 0
    else:
        acts[:, pos, feature] = 0
    return acts


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tokens(model):
    torch.manual_seed(11)
    return torch.randint(1, model.cfg.d_vocab, (N_PROMPTS, SEQ))


@pytest.fixture(scope="module")
def answers(model):
    torch.manual_seed(12)
    return torch.randint(0, model.cfg.d_vocab, (N_PROMPTS, 2))


def assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1e-6, float(np.abs(expected).max()))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * scale)


# -- latents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_latents_are_encode_of_the_input_hook(model, tokens, kind):
    tc = make_transcoder(kind, seed=1)
    lengths = torch.tensor([SEQ, 4, 7, SEQ, 1])  # right-padded windows: padding is never encoded
    batch = SparseEncoder(model, {HOOK_IN: tc}, "float32")(tokens, lengths)[HOOK_IN]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK_IN])
        expected = torch.cat([tc.encode(cache[HOOK_IN][i, :n]) for i, n in enumerate(lengths.tolist())])
    ours = np.zeros(expected.shape, np.float32)
    ours[np.repeat(np.arange(len(batch.counts)), batch.counts), batch.indices.astype(np.int64)] = batch.values
    assert expected.count_nonzero() > 20
    np.testing.assert_array_equal(ours != 0, expected.numpy() != 0)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_description_records_both_hooks(tmp_path):
    make_transcoder("jumprelu_skip_transcoder").save_model(tmp_path / "tc")
    described = read_sae_config(SAESource.parse(str(tmp_path / "tc")))
    assert (described.hook, described.hook_out, described.d_out) == (HOOK_IN, HOOK_OUT, D_MODEL)
    assert described.architecture == "jumprelu_skip_transcoder"
    plain = make_sae("standard", "blocks.0.hook_resid_post")
    plain.save_model(tmp_path / "sae")
    assert read_sae_config(SAESource.parse(str(tmp_path / "sae"))).hook_out is None
    loaded = load_sae(SAESource.parse(str(tmp_path / "tc")))
    assert torch.equal(loaded.W_skip, make_transcoder("jumprelu_skip_transcoder").W_skip)


# -- sweeps -------------------------------------------------------------------------------------


def plain_hook_sweep(model, tc, tokens, metric, features, pos, use_error_term) -> np.ndarray:
    """One forward per feature with the feature zeroed in the spliced transcoder, minus the spliced baseline."""
    with torch.no_grad():
        baseline = metric(model.run_with_hooks(tokens, fwd_hooks=spliced_hooks(tc, use_error_term)))
        effects = np.zeros((len(tokens), len(features)))
        for i, f in enumerate(features):
            edit = partial(zero_feature, feature=int(f), pos=pos)
            logits = model.run_with_hooks(tokens, fwd_hooks=spliced_hooks(tc, use_error_term, edit))
            effects[:, i] = (metric(logits) - baseline).numpy()
    return effects


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("pos", [-1, None], ids=["last", "all"])
def test_sweep_equals_plain_hooks(model, tokens, answers, kind, use_error_term, pos):
    tc = make_transcoder(kind, seed=2)
    metric = LogitDiff(answers)
    frame = ablation_sweep(model, tc, tokens, metric, position=pos, use_error_term=use_error_term, batch_size=16)

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK_IN])
        acts = tc.encode(cache[HOOK_IN])
    live = ((acts != 0).flatten(0, 1) if pos is None else acts[:, pos] != 0).any(0).nonzero()[:, 0].numpy()
    assert len(live) > 5
    np.testing.assert_array_equal(np.unique(frame["feature"]), live)
    grid = frame.pivot(index="prompt", columns="feature", values="delta").loc[:, list(live)].to_numpy()
    expected = plain_hook_sweep(model, tc, tokens, metric, live, pos, use_error_term)
    assert np.abs(expected).max() > 1e-3  # the ablations do something
    assert_close(grid, expected)
    clean = metric(model(tokens)).tolist()
    if use_error_term:  # the spliced baseline with its error term is the clean model
        np.testing.assert_allclose(frame.attrs["baseline"], clean, rtol=1e-4, atol=1e-4)
    else:
        assert not np.allclose(frame.attrs["baseline"], clean, atol=1e-3)


def test_attribution_verified_rows_equal_exact(model, tokens, answers):
    tc = make_transcoder("jumprelu_skip_transcoder", seed=3)
    metric = LogitDiff(answers)
    attributed = ablation_sweep(model, tc, tokens, metric, method="attribution", verify_top=4)
    exact = ablation_sweep(model, tc, tokens, metric)
    verified = attributed[attributed["method"] == "exact"].merge(exact, on=["prompt", "feature"],
                                                                 suffixes=("", "_exact"))
    assert verified["feature"].nunique() == 4
    np.testing.assert_allclose(verified["delta"], verified["delta_exact"], rtol=1e-6)
    # the estimate is the gradient at the output hook times the change, written out with autograd
    features = np.unique(attributed["feature"])
    with torch.enable_grad():
        seen = {}

        def capture(x, hook):
            seen["x"] = x

        def replace(original, hook):
            x = seen["x"]
            acts = tc.encode(x).detach().requires_grad_(True)
            seen["acts"] = acts
            return writes(tc, x, acts)

        values = metric(model.run_with_hooks(tokens, fwd_hooks=[(HOOK_IN, capture), (HOOK_OUT, replace)]))
        (grad,) = torch.autograd.grad(values.sum(), seen["acts"])
    acts = seen["acts"].detach()
    expected = (-acts[:, -1, features] * grad[:, -1, features]).numpy()
    got = attributed.pivot(index="prompt", columns="feature", values="attribution").loc[:, list(features)].to_numpy()
    assert_close(got, expected)


# -- splices and steering -----------------------------------------------------------------------


@pytest.mark.parametrize("use_error_term", [False, True])
def test_splice_equals_plain_hooks(model, tokens, answers, use_error_term):
    tc = make_transcoder("skip_transcoder", seed=4)
    sae = make_sae("standard", "blocks.0.hook_resid_post", seed=5)
    metric = LogitDiff(answers)
    frame = splice_eval(model, [tc, sae], [[HOOK_IN], [HOOK_IN, "blocks.0.hook_resid_post"]], tokens, metric,
                        use_error_term=use_error_term)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:],
                                                 reduction="none").mean(-1)

    with torch.no_grad():
        alone = model.run_with_hooks(tokens, fwd_hooks=spliced_hooks(tc, use_error_term))
        with model.hooks(fwd_hooks=spliced_hooks(tc, use_error_term)):
            both = model.run_with_saes(tokens, saes=[sae], use_error_term=use_error_term)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(HOOK_OUT, lambda a, hook: torch.zeros_like(a))])
    for condition, target, logits in [("spliced", HOOK_IN, alone),
                                      ("spliced", f"{HOOK_IN}+blocks.0.hook_resid_post", both),
                                      ("zero", HOOK_OUT, zeroed)]:
        rows = frame[(frame["condition"] == condition) & (frame["target"] == target)]
        assert len(rows) == N_PROMPTS, (condition, target)
        np.testing.assert_allclose(rows["metric"], metric(logits).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rows["loss"], loss(logits).numpy(), rtol=1e-5, atol=1e-5)
    if not use_error_term:  # the transcoder changes the model
        clean = frame[frame["condition"] == "clean"]["metric"].to_numpy()
        assert not np.allclose(frame[frame["target"] == HOOK_IN]["metric"], clean, atol=1e-3)


@pytest.mark.parametrize("magnitude", [0.0, 7.0])
def test_steering_adds_at_the_output_hook(model, tokens, magnitude):
    tc = make_transcoder("jumprelu_transcoder", seed=6)
    prompt = tokens[:1, :5]
    steered = steer(model, tc, prompt, 3, magnitude, max_new_tokens=5, stop_at_eos=False, use_past_kv_cache=False)
    vector = magnitude * tc.W_dec[3].detach()
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            logits = model.run_with_hooks(seq, fwd_hooks=[(HOOK_OUT, lambda a, hook: a + vector)])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered, seq)
    assert not model.hook_dict[HOOK_OUT].fwd_hooks


# -- bad input ----------------------------------------------------------------------------------


def test_missing_output_hook_is_refused_before_any_forward(model, tokens, answers, monkeypatch):
    tc = make_transcoder("transcoder", hook_out="blocks.1.hook_mlp_outt")
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    for run in (lambda: ablation_sweep(model, tc, tokens, LogitDiff(answers)),
                lambda: splice_eval(model, [tc], [[HOOK_IN]], tokens, LogitDiff(answers)),
                lambda: steer(model, tc, tokens[:1], 0, 1.0)):
        with pytest.raises(ConfigError, match=r"writes \(metadata.hook_name_out\) hook 'blocks.1.hook_mlp_outt'.*"
                                              r"blocks.1.hook_mlp_out"):
            run()


def test_transcoder_without_output_hook_is_refused(tmp_path):
    make_transcoder("skip_transcoder", hook_out=None).save_model(tmp_path / "tc")
    for read in (read_sae_config, load_sae):
        with pytest.raises(ConfigError, match=r"names no output hook \(metadata.hook_name_out\)"):
            read(SAESource.parse(str(tmp_path / "tc")))


def test_extraction_refuses_a_missing_output_hook_before_any_work(assets, tmp_path, monkeypatch):
    from jobs import extract
    from tests.stores import config

    make_transcoder("transcoder", hook_out="blocks.1.hook_mlp_outt").save_model(tmp_path / "missing")
    narrow = make_transcoder("skip_transcoder")
    narrow.cfg.d_out = 16  # as a transcoder for a model of another width records it
    narrow.save_model(tmp_path / "narrow")
    monkeypatch.setattr(extract, "start_workers", lambda *a, **k: pytest.fail("workers started"))
    monkeypatch.setattr(extract, "connect", lambda *a, **k: pytest.fail("Ray started"))
    cfg = config(assets, tmp_path / "s.zarr", saes=(str(tmp_path / "missing"), str(tmp_path / "narrow")))
    with pytest.raises(ConfigError) as raised:
        extract.run_extract(cfg)
    missing, narrow = str(tmp_path / "missing"), str(tmp_path / "narrow")
    assert raised.value.problems == [
        f"ExtractConfig.saes[0]={missing!r}: it is a transcoder that writes to hook 'blocks.1.hook_mlp_outt' "
        f"(metadata.hook_name_out), which model {assets['model_dir']} does not have. Hooks there include: "
        + raised.value.problems[0].split("Hooks there include: ")[1],
        f"ExtractConfig.saes[1]={narrow!r}: the transcoder writes d_out=16, but {assets['model_dir']} has width 32 "
        "at its output hook blocks.1.hook_mlp_out. Is the transcoder for another model?",
        f"ExtractConfig.saes[0]={missing!r} and ExtractConfig.saes[1]={narrow!r} both read {HOOK_IN}, and an SAE "
        f"without a name is named by its hook. Name each of them, NAME=SOURCE: e.g. --sae a={missing} "
        f"--sae b={narrow}",
    ]
    assert raised.value.for_command_line().problems[1:] == [  # the command line's names
        f"--sae {narrow}: the transcoder writes d_out=16, but {assets['model_dir']} has width 32 at "
        "its output hook blocks.1.hook_mlp_out. Is the transcoder for another model?",
        f"--sae {missing} and --sae {narrow} both read {HOOK_IN}, and an SAE without a name is named by its "
        f"hook. Name each of them, NAME=SOURCE: e.g. --sae a={missing} --sae b={narrow}",
    ]
    assert raised.value.problems[0].split("Hooks there include: ")[1].startswith("blocks.1.hook_mlp_out")
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()


def test_sweep_worker_takes_a_transcoder(assets, tmp_path):
    """The sweep job's worker, alone: the live features of prompts from a file are the transcoder's."""
    import json

    from jobs.sweep import SweepConfig, SweepWorker, validate
    from pipeline.models import load_model

    make_transcoder("jumprelu_skip_transcoder", seed=7).save_model(tmp_path / "tc")
    lines = [{"prompt": p, "answer": "mat", "wrong_answer": "dog"} for p in ("the cat sat", "a big red fox ran", "it")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = SweepConfig.build(name="tc", store=str(tmp_path / "out.zarr"), prompts=str(tmp_path / "p.jsonl"),
                            model=str(assets["model_dir"]), sae=str(tmp_path / "tc"), position=None)
    job = validate(cfg)
    assert job.hook == HOOK_IN
    worker = SweepWorker(job)
    live = worker.live_features()
    model = load_model(str(assets["model_dir"]))
    tc = load_sae(SAESource.parse(str(tmp_path / "tc")))
    metric = LogitDiff.from_strings(model, ["mat"] * 3, ["dog"] * 3)
    expected = ablation_sweep(model, tc, worker.tokens, metric, position=None, attention_mask=worker.mask)
    assert len(live) > 5
    np.testing.assert_array_equal(live, np.unique(expected["feature"]))


@pytest.mark.ray
def test_dashboard_logits_go_through_the_output_hook(assets, ray_cluster, tmp_path):
    """A transcoder that reads the MLP's hidden layer (d_mlp wide) and writes the MLP's output (as
    wide as the residual stream) has a logit table, ``W_dec @ W_U`` through its output hook; an SAE
    that reads and writes the hidden layer has none, and says so."""
    from jobs.extract import run_extract
    from pipeline.dashboard_data import DashboardBuilder, DashboardSettings, load_logit_weights, model_unembed
    from store import FeatureStore
    from tests.stores import config

    hidden, out = "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"
    torch.manual_seed(3)
    tc = Transcoder(TranscoderConfig(d_in=64, d_sae=40, d_out=D_MODEL, apply_b_dec_to_input=False,
                                     metadata=SAEMetadata(hook_name=hidden, hook_name_out=out, prepend_bos=True)))
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    tc.save_model(tmp_path / "tc")
    make_sae("standard", hidden, d_in=64, d_sae=40, seed=4).save_model(tmp_path / "sae")
    cfg = config(assets, tmp_path / "s.zarr", saes=(f"tc={tmp_path / 'tc'}", f"hidden={tmp_path / 'sae'}"),
                 max_tokens=400)
    run_extract(cfg)
    fs = FeatureStore.open(cfg.store.path)
    assert fs.sae_record("tc")["hook_out"] == out and fs.hooks == [hidden]

    weights = load_logit_weights(fs, "tc")
    expected = (tc.W_dec.detach() @ model_unembed(str(assets["model_dir"]))).numpy()  # [40, d_vocab]
    np.testing.assert_allclose(weights.W_dec @ weights.W_U, expected, rtol=1e-5, atol=1e-5)
    built = [d for d in DashboardBuilder(fs, "tc", weights, DashboardSettings(n_cofiring=0)).build()]
    assert len(built) == 40
    for d in built[:5]:
        assert d.logits.top_ids == np.argsort(-expected[d.feature], kind="stable")[:10].tolist()
    with pytest.raises(ConfigError, match=r"SAE hidden: its decoder writes vectors of size 64 at blocks\.0\.mlp\.hook_post, "
                                          r"not the residual stream's 32"):
        load_logit_weights(fs, "hidden")
