"""Sweeps, steering, store prompts and typed prompts choose a store's SAE by name: a store whose
three SAEs read one hook (two SAEs and a transcoder, each of another width), each chosen by its
name and equal to that SAE used directly; the shared hook chooses none, and says their names."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import WORDS, make_sae
from jobs.cli import main
from jobs.extract import ExtractConfig, run_extract
from jobs.sweep import SweepConfig, SweepWorker, run_sweep, validate
from pipeline.ablation import StorePrompts, ablation_sweep, mean_activations, resolve_positions
from pipeline.dataset import DatasetSpec
from pipeline.metrics import KLFromClean
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore
from store.errors import ConfigError
from store.sweeps import read_sweep
from test_transcoders import make_transcoder

pytestmark = pytest.mark.ray

HOOK = "blocks.0.hook_resid_post"
ROWS = (2, 10)


@pytest.fixture(scope="module")
def named(assets, ray_cluster, tmp_path_factory) -> dict:
    """A float32 store over 14 short rows (a row is a prompt) of SAEs a (64 features), b (96) and
    the transcoder tc (48), all reading HOOK."""
    root = tmp_path_factory.mktemp("named")
    saes = {"a": make_sae("standard", HOOK, d_sae=64, seed=21), "b": make_sae("jumprelu", HOOK, seed=22),
            "tc": make_transcoder("skip_transcoder", hook_in=HOOK, seed=23)}
    for name, sae in saes.items():
        sae.save_model(root / name)
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(14)]
    (root / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = ExtractConfig.build(model=str(assets["model_dir"]), saes=tuple(f"{n}={root / n}" for n in saes),
                              dataset=DatasetSpec(str(root / "short.jsonl")), store=str(root / "s.zarr"),
                              context_size=16, shard_tokens=384, value_dtype="float32", workers=1, progress=False)
    run_extract(cfg)
    return {"store": cfg.store.path, "location": FeatureStore.open(cfg.store.path).location, "texts": texts,
            "dirs": {name: str(root / name) for name in saes}, "model": load_model(str(assets["model_dir"]))}


def direct_sweep(named, name: str, rows: tuple[int, int] = ROWS):
    """SAE ``name`` swept from its own directory over the rows' tokens, its live features found by a run."""
    model, sae = named["model"], load_sae(SAESource.parse(named["dirs"][name]))
    prompts = StorePrompts.from_store(FeatureStore.open(named["store"]), range(*rows))
    metric = KLFromClean.from_model(model, prompts.tokens, attention_mask=prompts.attention_mask)
    return ablation_sweep(model, sae, prompts.tokens, metric, attention_mask=prompts.attention_mask)


def test_a_sweep_of_b_by_name_is_bs_sweep(named):
    run_sweep(SweepConfig.build(name="b-last", store=named["store"], rows=ROWS, metric="kl", sae_name="b",
                                prompts_per_part=4, workers=1, cpus_per_worker=1, progress=False))
    stored = read_sweep(named["store"], "b-last")
    spec = stored.attrs["sweep"]
    assert (spec["sae"], spec["sae_name"], spec["hook"]) == (named["dirs"]["b"], "b", HOOK)

    expected = direct_sweep(named, "b")
    np.testing.assert_array_equal(stored["prompt"], expected["prompt"])
    np.testing.assert_array_equal(stored["feature"], expected["feature"])
    scale = np.abs(expected["delta"]).max()
    assert scale > 1e-3
    np.testing.assert_allclose(stored["delta"], expected["delta"], rtol=1e-4, atol=1e-4 * scale)

    # the name chose: the store's live features of a, at the same positions, are others
    prompts = StorePrompts.from_store(FeatureStore.open(named["store"]), range(*ROWS))
    positions = resolve_positions(-1, len(prompts.rows), prompts.tokens.shape[1], prompts.attention_mask)
    assert set(prompts.live_features("a", positions)) != set(stored["feature"])


def test_a_transcoder_by_name_reads_its_own_live_features(named):
    job = validate(SweepConfig.build(name="tc", store=named["store"], rows=ROWS, metric="kl", sae_name="tc"))
    assert (job.sae, job.sae_name, job.hook) == (named["dirs"]["tc"], "tc", HOOK)
    live = SweepWorker(job).live_features()
    assert len(live) > 5
    np.testing.assert_array_equal(live, np.unique(direct_sweep(named, "tc")["feature"]))


def test_a_sae_named_in_its_source_is_the_stores_sae_of_that_name(named):
    job = validate(SweepConfig.build(name="x", store=named["store"], rows=ROWS, metric="kl",
                                     sae="b=" + named["dirs"]["b"]))
    assert (job.sae, job.sae_name, job.hook) == (named["dirs"]["b"], "b", HOOK)
    with pytest.raises(ConfigError) as raised:
        validate(SweepConfig.build(name="x", store=named["store"], rows=ROWS, metric="kl",
                                   sae="a=" + named["dirs"]["b"]))
    assert raised.value.problems == [
        f"SweepConfig.sae={'a=' + named['dirs']['b']!r} reads {HOOK!r} with 96 features, but the store's SAE 'a', "
        f"whose live features and means the sweep reads, reads {HOOK!r} with 64. Leave SweepConfig.sae out to "
        "sweep the store's SAE, or give one trained like it."]


def test_the_shared_hook_chooses_none_and_the_message_names_them(named, capsys):
    store, location = named["store"], named["location"]
    shared = f"hook {HOOK!r} holds 3 SAEs in store {location}: a, b, tc. Name one of them instead of the hook."
    cases = {
        (("sae_name", HOOK),): f"SweepConfig.sae_name={HOOK!r}: {shared}",
        (("sae", named["dirs"]["b"]),): f"SweepConfig.sae={named['dirs']['b']!r}: {shared} Choose the store's SAE "
                                       "with SweepConfig.sae_name.",
        (): f"store {location} holds several SAEs: choose one with SweepConfig.sae_name (a, b, tc).",
    }
    for given, message in cases.items():
        with pytest.raises(ConfigError) as raised:
            validate(SweepConfig.build(name="x", store=store, rows=ROWS, metric="kl", **dict(given)))
        assert raised.value.problems == [message]

    assert main(["sweep", "--name", "x", "--store", store, "--rows", "2:10", "--metric", "kl", "--hook", HOOK]) == 2
    assert capsys.readouterr().err == f"latentstore sweep: error: --sae-name {HOOK!r}: {shared}\n"
    assert main(["steer", "--store", store, "--hook", HOOK, "--feature", "3", "--magnitude", "20",
                 "--prompt", "the cat"]) == 2
    assert capsys.readouterr().err == f"latentstore steer: error: --sae-name {HOOK!r}: {shared}\n"
    assert main(["steer", "--store", store, "--feature", "3", "--magnitude", "20", "--prompt", "the cat"]) == 2
    assert capsys.readouterr().err == (f"latentstore steer: error: {location} holds 3 SAEs (a, b, tc): choose one "
                                       "with --sae-name NAME.\n")


def test_steering_by_name_steers_with_that_sae(named, capsys):
    from jobs.terminal import terminal_text
    from pipeline.steering import steer

    for name in ("b", "tc"):
        assert main(["steer", "--store", named["store"], "--sae-name", name, "--feature", "3", "--magnitude", "20",
                     "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
        sae = load_sae(SAESource.parse(named["dirs"][name]))
        expected = steer(named["model"], sae, "the cat", 3, 20.0, max_new_tokens=6)
        assert capsys.readouterr().out == terminal_text(expected, keep_newlines=True) + "\n"


def test_store_prompts_read_the_named_saes_data(named):
    fs = FeatureStore.open(named["store"])
    model, sae = named["model"], load_sae(SAESource.parse(named["dirs"]["b"]))
    prompts = StorePrompts.from_store(fs, range(*ROWS))
    metric = KLFromClean.from_model(model, prompts.tokens, attention_mask=prompts.attention_mask)
    with pytest.raises(ConfigError, match=rf"hook '{HOOK}' holds 3 SAEs in store .*: a, b, tc\.") as raised:
        ablation_sweep(model, sae, prompts, metric)
    assert raised.value.__notes__ == [
        "Name the store's SAE that is swept: StorePrompts.from_store(store, rows, sae=NAME)."]
    with pytest.raises(ConfigError, match=rf"the store's SAE 'a' reads {HOOK} with 64 features, but the SAE swept "
                                          rf"reads {HOOK} with 96: the store's live features and means are another "
                                          "SAE's"):
        ablation_sweep(model, sae, StorePrompts.from_store(fs, range(*ROWS), sae="a"), metric)

    means = mean_activations(fs, "b")
    assert means.shape == (96,)
    named_b = StorePrompts.from_store(fs, range(*ROWS), sae="b")
    by_store = ablation_sweep(model, sae, named_b, metric, ablation="mean", features=[1, 5, 9])
    given = ablation_sweep(model, sae, named_b.tokens, metric, ablation="mean", features=[1, 5, 9], means=means,
                           attention_mask=named_b.attention_mask)
    np.testing.assert_array_equal(by_store["delta"], given["delta"])
    assert np.abs(by_store["delta"]).max() > 0


def test_typed_prompts_encode_with_the_named_sae(named):
    from pipeline.prompts import PromptEncoder

    fs = FeatureStore.open(named["store"])
    encoder = PromptEncoder(fs.run, "b", device="cpu")
    assert (encoder.name, encoder.hook, encoder.d_sae) == ("b", HOOK, 96)
    row = 4
    stored = fs.prompt_features(row, "b", k=5)
    by_token = [list(zip(group["feature"], group["activation"])) for _, group in stored.groupby("token_index")]
    typed = encoder(named["texts"][row]).top(5)
    assert [[f for f, _ in token] for token in typed] == [[int(f) for f, _ in token] for token in by_token]
    np.testing.assert_allclose([v for token in typed for _, v in token],
                               [v for token in by_token for _, v in token], rtol=1e-5)
    with pytest.raises(ConfigError, match=rf"the run has no SAE named '{HOOK}'; its SAEs: "):
        PromptEncoder(fs.run, HOOK, device="cpu")
