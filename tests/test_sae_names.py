"""SAEs named, several at one hook (format 2.0), and stores of format 1.x read with hooks as names."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dataset import DatasetSpec
from pipeline.models import load_model
from pipeline.saes import SAESource, load_sae
from store import FeatureStore
from store import format as fmt
from store import index as index_mod
from store.errors import ConfigError, FormatVersionError
from store.sweeps import SweepWriter
from store.verify import verify_store
from store.writer import check_conflict
from tests.conftest import make_sae
from tests.stores import config
from tests.test_extract_exact import ATOL, BF16_RTOL

HOOK = "blocks.0.hook_resid_post"
OTHER = "blocks.1.hook_mlp_out"
OLD_STORE = Path(__file__).parent / "data" / "format-1.4.zarr.tar.gz"


def reference(model_dir, sae_dir, fs: FeatureStore) -> np.ndarray:
    """``sae.encode`` of the model's activations at the SAE's hook, window by window over the store's
    tokens (each window opens with the BOS latentstore put there, position -1)."""
    model, sae = load_model(str(model_dir)), load_sae(SAESource.parse(str(sae_dir)))
    tokens, starts = fs.token_ids(), np.flatnonzero(fs.provenance()["pos"].to_numpy() == fmt.BOS_POSITION)
    hook = sae.cfg.metadata.hook_name
    out = []
    with torch.no_grad():
        for a, b in zip(starts, [*starts[1:], len(tokens)]):
            _, cache = model.run_with_cache(torch.from_numpy(tokens[a:b].astype(np.int64))[None], names_filter=[hook])
            out.append(sae.encode(cache[hook][0]).float().numpy())
    return np.concatenate(out)


def assert_equals(ours: np.ndarray, expected: np.ndarray, what: str) -> None:
    np.testing.assert_array_equal(ours != 0, expected != 0, err_msg=f"active features differ: {what}")
    np.testing.assert_allclose(ours, expected, rtol=BF16_RTOL, atol=ATOL, err_msg=what)


@pytest.fixture(scope="module")
def named(assets, ray_cluster, tmp_path_factory):
    """A store of three SAEs: two named ones at one hook (of different widths and kinds), one unnamed."""
    from jobs.extract import run_extract

    tmp = tmp_path_factory.mktemp("named")
    dirs = {"narrow": tmp / "narrow", "wide": tmp / "wide"}
    make_sae("standard", HOOK, d_sae=40, seed=11).save_model(dirs["narrow"])
    make_sae("jumprelu", HOOK, d_sae=120, seed=12).save_model(dirs["wide"])
    dirs[OTHER] = assets["sae_dirs"][OTHER]
    cfg = config(assets, tmp / "named.zarr", saes=(f"narrow={dirs['narrow']}", f"wide={dirs['wide']}", str(dirs[OTHER])),
                 max_tokens=900, shard_tokens=256)
    run_extract(cfg)
    return FeatureStore.open(cfg.store.path), dirs


@pytest.mark.ray
def test_two_saes_at_one_hook_each_equal_their_own_encode(assets, named):
    fs, dirs = named
    assert fs.complete and fs.saes == ["narrow", "wide", OTHER]
    assert fs.hooks == [HOOK, OTHER]
    assert [fs.sae_record(n)["hook"] for n in fs.saes] == [HOOK, HOOK, OTHER]
    assert fs.sae_record("wide")["source"] == str(dirs["wide"])  # the source, without its name
    assert [s["name"] for s in fs.run["saes"]] == fs.saes
    assert (fs.d_sae("narrow"), fs.d_sae("wide")) == (40, 120)
    for name in fs.saes:
        expected = reference(assets["model_dir"], dirs[name], fs)
        assert_equals(fs.csr(name).toarray(), expected, name)
        assert fs.nnz(name) == np.count_nonzero(expected) == fs.attrs["counts"]["nnz"][name]
        np.testing.assert_array_equal(fs.stats(name).count, np.count_nonzero(expected, axis=0))
        assert fs.index(name) is not None  # each SAE has its own index
    report = verify_store(fs.location)  # every checksum, count and index of the named groups holds
    assert report.ok and report.n_shards == len(fs.shards), report.problems


@pytest.mark.ray
def test_queries_take_a_name_or_the_hook_of_a_single_sae(named):
    fs, _ = named
    wide = fs.csr("wide")
    feature = int(np.argmax(np.diff(wide.tocsc().indptr)))  # the densest feature
    top = fs.top_activations("wide", feature, k=5)
    column = wide[:, feature].toarray().ravel()
    np.testing.assert_allclose(top["activation"].to_numpy(), np.sort(column)[::-1][:5])
    # a hook with one SAE stands for it; a hook with two is refused, naming both
    assert fs.resolve(OTHER) == OTHER
    assert fs.density(OTHER).equals(fs.density(fs.saes[2]))
    with pytest.raises(ConfigError, match=r"hook 'blocks\.0\.hook_resid_post' holds 2 SAEs in store .*: narrow, wide\. "
                                          r"Name one of them"):
        fs.top_activations(HOOK, 0)
    with pytest.raises(ConfigError, match=r"has no SAE named 'wid' .*its SAEs: wide"):
        fs.csr("wid")


def _digest(path: Path) -> str:
    """Every file's path and bytes under ``path``: what a refused write must leave unchanged."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def old_store(tmp_path) -> Path:
    """The checked-in store of format 1.4 (one standard SAE, d_sae 16, at HOOK; two short rows)."""
    with tarfile.open(OLD_STORE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "format-1.4.zarr"


def test_a_format_1_4_store_reads_with_its_hooks_as_names(assets, old_store, tmp_path):
    fs = FeatureStore.open(str(old_store))
    assert fs.attrs["encoding-version"] == "1.4" and fs.complete
    assert fs.saes == [HOOK] and fs.hooks == [HOOK]
    assert "name" not in fs.run["saes"][0] and fs.sae_record(HOOK)["name"] == HOOK
    # the same SAE, rebuilt from its seed, encodes the stored tokens as the store holds them
    make_sae("standard", HOOK, d_sae=16, seed=5).save_model(tmp_path / "sae")
    expected = reference(assets["model_dir"], tmp_path / "sae", fs)
    assert_equals(fs.csr(HOOK).toarray(), expected, "format 1.4")
    assert verify_store(str(old_store)).ok
    # its index (1.4's stamped parts) and merged statistics answer as the shards do
    assert fs.index(HOOK) is not None
    for feature in np.flatnonzero(fs.stats(HOOK).count)[:4]:
        tokens, values = fs.index(HOOK).entries(int(feature))
        column = expected[:, feature]
        np.testing.assert_array_equal(np.sort(tokens), np.flatnonzero(column))
        np.testing.assert_allclose(values, np.sort(column[column != 0])[::-1], rtol=BF16_RTOL, atol=ATOL)
    np.testing.assert_array_equal(fs.stats(HOOK).count, np.count_nonzero(expected, axis=0))


def test_a_format_1_4_store_is_never_written(old_store):
    before = _digest(old_store)
    fs = FeatureStore.open(str(old_store))
    read_only = r"written in latentstore format 1\.4, by an older latentstore\. It opens read-only.*extract again into a new store, or into this one with `latentstore extract --overwrite`"
    with pytest.raises(FormatVersionError, match=read_only):  # resuming (latentstore extract)
        check_conflict(str(old_store), fs.run, overwrite=False)
    with pytest.raises(FormatVersionError, match=read_only):  # building its index (latentstore index)
        index_mod.begin(str(old_store), HOOK, fs.stats(HOOK).count, fs.attrs["shards"], fs.value_dtype,
                        index_mod.plan_parts(fs.stats(HOOK).count))
    with pytest.raises(FormatVersionError, match=read_only):  # adding a sweep (latentstore sweep)
        SweepWriter(str(old_store), "s").begin({"x": 1}, np.arange(3), None, 1, overwrite=False)
    assert _digest(old_store) == before


def test_the_commands_refuse_to_write_a_format_1_4_store_before_any_work(old_store, capsys):
    from jobs.cli import main

    for argv in (["index", str(old_store)], ["sweep", "--name", "s", "--store", str(old_store), "--rows", "0:2",
                                             "--metric", "kl"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"latentstore {argv[0]}: error: {old_store} was written in latentstore format 1.4" in err
        assert "It opens read-only" in err and "Traceback" not in err
