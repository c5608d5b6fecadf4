"""ablation_sweep equals notebook 000's loop of one run_with_hooks_with_saes per feature; attribution
equals a direct autograd computation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_model, make_sae
from pipeline.ablation import ablation_sweep, heatmap
from pipeline.metrics import KLFromClean, LogitDiff, TargetLoss
from store.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest on one thread

N_PROMPTS, SEQ = 6, 12
SAES = {  # one per architecture, each at a hook that resumes the forward differently
    "standard": ("blocks.0.hook_resid_post", {}),
    "jumprelu": ("blocks.1.hook_resid_pre", {}),
    "topk": ("blocks.1.hook_mlp_out", {"k": 8}),
}


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    """As notebook 000 writes it."""
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    return answer_logit_diff if per_prompt else answer_logit_diff.mean()


def ablate_sae_feature(sae_acts, hook, pos, feature_id, value=0.0):
    if pos is None:
        sae_acts[:, :, feature_id] = value
    else:
        sae_acts[:, pos, feature_id] = value
    return sae_acts


def naive_sweep(model, sae, tokens, metric, features, pos, use_error_term, value=0.0):
    """Notebook 000's loop: one spliced forward per feature. run_with_hooks_with_saes takes the
    error term from the SAE, so with use_error_term the SAE is attached with it for the loop."""
    hook = sae.cfg.metadata.hook_name
    effects = torch.zeros((len(tokens), len(features)))
    with torch.no_grad(), model.saes(saes=[sae] if use_error_term else [], use_error_term=use_error_term):
        saes = [] if use_error_term else [sae]  # already attached, with the error term
        baseline = metric(model.run_with_saes(tokens, saes=saes))
        for i, feature_id in enumerate(features):
            logits = model.run_with_hooks_with_saes(
                tokens, saes=saes,
                fwd_hooks=[(hook + ".hook_sae_acts_post",
                            partial(ablate_sae_feature, pos=pos, feature_id=int(feature_id), value=value))],
            )
            effects[:, i] = metric(logits) - baseline
    return effects.numpy()


def naive_live(model, sae, tokens, pos):
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    acts = cache[hook + ".hook_sae_acts_post"]
    acts = acts.flatten(0, 1) if pos is None else acts[:, pos, :]
    return (acts != 0).any(0).nonzero()[:, 0].numpy()


def as_grid(frame: pd.DataFrame, features) -> np.ndarray:
    grid = frame.pivot(index="prompt", columns="feature", values="delta")
    return grid.loc[:, list(features)].to_numpy()


def assert_close(ours: np.ndarray, naive: np.ndarray) -> None:
    """Within 1e-4 relative to the sweep's scale (float32 sums differ in order only)."""
    scale = max(1e-6, float(np.abs(naive).max()))
    np.testing.assert_allclose(ours, naive, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tokens(model):
    torch.manual_seed(7)
    return torch.randint(1, model.cfg.d_vocab, (N_PROMPTS, SEQ))


@pytest.fixture(scope="module")
def answers(model):
    torch.manual_seed(8)
    return torch.randint(0, model.cfg.d_vocab, (N_PROMPTS, 2))


@pytest.mark.parametrize("architecture", list(SAES))
@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("pos", [-1, None], ids=["last", "all"])
def test_sweep_equals_notebook_loop(model, tokens, answers, architecture, use_error_term, pos):
    hook, extra = SAES[architecture]
    sae = make_sae(architecture, hook, seed=4, **extra)
    metric = partial(logits_to_ave_logit_diff, answer_tokens=answers, per_prompt=True)
    live = naive_live(model, sae, tokens, pos)
    assert len(live) > 5

    frame = ablation_sweep(model, sae, tokens, metric, position=pos, use_error_term=use_error_term, batch_size=16)

    assert list(frame.columns[:3]) == ["prompt", "feature", "delta"]
    assert len(frame) == N_PROMPTS * len(live)
    np.testing.assert_array_equal(np.unique(frame["feature"]), live)
    assert (frame["method"] == "exact").all()
    naive = naive_sweep(model, sae, tokens, metric, live, pos, use_error_term)
    assert np.abs(naive).max() > 1e-3  # the features matter, so the comparison says something
    assert_close(as_grid(frame, live), naive)


def test_builtin_metric_with_per_prompt_positions_and_scale(model, tokens, answers):
    """Built-in metrics see mixed batches (prompts=); per-prompt positions; a scale factor."""
    hook, _ = SAES["standard"]
    sae = make_sae("standard", hook, seed=5)
    positions = [3, 11, 5, 7, 0, 9]
    features = [1, 5, 17, 40, 77]
    frame = ablation_sweep(model, sae, tokens, LogitDiff(answers), features=features, position=positions,
                           ablation=0.5, batch_size=7)
    expected = np.zeros((N_PROMPTS, len(features)))
    hook_acts = hook + ".hook_sae_acts_post"
    with torch.no_grad():
        base = LogitDiff(answers)(model.run_with_saes(tokens, saes=[sae]))
        for j, f in enumerate(features):
            def halve(acts, hook, f=f):
                acts[torch.arange(N_PROMPTS), torch.tensor(positions), f] *= 0.5
                return acts
            logits = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(hook_acts, halve)])
            expected[:, j] = (LogitDiff(answers)(logits) - base).numpy()
    assert_close(as_grid(frame, features), expected)


def test_mean_ablation_with_given_means_and_kl(model, tokens):
    hook, _ = SAES["jumprelu"]
    sae = make_sae("jumprelu", hook, seed=6)
    means = np.random.default_rng(0).uniform(0, 1, sae.cfg.d_sae).astype(np.float32)
    metric = KLFromClean.from_model(model, tokens)
    features = [0, 3, 50, 95]
    frame = ablation_sweep(model, sae, tokens, metric, features=features, ablation="mean", means=means)
    expected = np.zeros((N_PROMPTS, len(features)))
    with torch.no_grad():
        base = metric(model.run_with_saes(tokens, saes=[sae]))
        for j, f in enumerate(features):
            hook_fn = partial(ablate_sae_feature, pos=-1, feature_id=f, value=float(means[f]))
            logits = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(hook + ".hook_sae_acts_post", hook_fn)])
            expected[:, j] = (metric(logits) - base).numpy()
    assert (expected != 0).all()  # mean ablation changes features that were not firing too
    assert_close(as_grid(frame, features), expected)


def test_attribution_equals_autograd(model, tokens, answers):
    hook, extra = SAES["topk"]
    sae = make_sae("topk", hook, seed=4, **extra)
    metric = TargetLoss(answers[:, 0])
    frame = ablation_sweep(model, sae, tokens, metric, method="attribution")
    assert (frame["method"] == "attribution").all()

    # Direct: gradient of the metric with respect to hook_sae_acts_post in the spliced run.
    captured = {}

    def keep(acts, hook):
        acts = acts.detach().requires_grad_(True)
        captured["acts"] = acts
        return acts

    with torch.enable_grad():
        logits = model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(hook + ".hook_sae_acts_post", keep)])
        (grad,) = torch.autograd.grad(metric(logits).sum(), captured["acts"])
    acts = captured["acts"].detach()[:, -1]
    direct = (-acts * grad[:, -1]).numpy()  # zero ablation: change = -a
    live = np.unique(frame["feature"])
    ours = frame.pivot(index="prompt", columns="feature", values="attribution").loc[:, live].to_numpy()
    np.testing.assert_allclose(ours, direct[:, live], rtol=1e-4, atol=1e-6)


def test_verify_top_recomputes_exactly(model, tokens, answers):
    hook, _ = SAES["standard"]
    sae = make_sae("standard", hook, seed=4)
    metric = LogitDiff(answers)
    attributed = ablation_sweep(model, sae, tokens, metric, method="attribution", verify_top=3)
    exact = ablation_sweep(model, sae, tokens, metric)
    verified = attributed[attributed["method"] == "exact"]
    assert verified["feature"].nunique() == 3
    top = attributed.groupby("feature")["attribution"].apply(lambda s: s.abs().max()).nlargest(3).index
    assert set(verified["feature"]) == set(top)
    merged = verified.merge(exact, on=["prompt", "feature"], suffixes=("", "_exact"))
    np.testing.assert_allclose(merged["delta"], merged["delta_exact"], rtol=1e-6)
    rest = attributed[attributed["method"] == "attribution"]
    np.testing.assert_array_equal(rest["delta"], rest["attribution"])


def test_errors_name_the_problem(model, tokens, answers):
    metric = LogitDiff(answers)
    with pytest.raises(ConfigError, match="does not have"):
        ablation_sweep(model, make_sae("standard", "blocks.9.hook_resid_post"), tokens, metric)
    sae = make_sae("standard", "blocks.0.hook_resid_post")
    with pytest.raises(ConfigError, match="position 12 is outside prompt 0"):
        ablation_sweep(model, sae, tokens, metric, position=12)
    with pytest.raises(ConfigError, match=r"metric returned \(\)"):
        ablation_sweep(model, sae, tokens, partial(logits_to_ave_logit_diff, answer_tokens=answers))
    with pytest.raises(ConfigError, match="needs each feature's mean"):
        ablation_sweep(model, sae, tokens, metric, ablation="mean")
    with pytest.raises(ConfigError, match="not features of this SAE"):
        ablation_sweep(model, sae, tokens, metric, features=[96])


def test_heatmap_is_prompt_by_feature(model, tokens, answers):
    sae = make_sae("standard", "blocks.0.hook_resid_post", seed=4)
    frame = ablation_sweep(model, sae, tokens, LogitDiff(answers), features=[2, 9, 30])
    fig = heatmap(frame)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (N_PROMPTS, 3)
    np.testing.assert_allclose(z, as_grid(frame, [2, 9, 30]))
