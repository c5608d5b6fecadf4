"""Dashboards, exports, `top` and `info` take an SAE's name: two SAEs at one hook each get their own
output, equal to the output of a store that holds that SAE alone, and the shared hook is refused
with both names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.cli import main
from jobs.dashboard import write_dashboard
from jobs.dashboard_serve import open_server
from jobs.export import export_neuronpedia
from jobs.export_delphi import export_delphi
from store import FeatureStore
from store.errors import ConfigError
from tests.conftest import make_sae
from tests.stores import config

pytestmark = pytest.mark.ray
HOOK = "blocks.0.hook_resid_post"
SHARED = r"hook 'blocks.0.hook_resid_post' holds 2 SAEs .*: a, b\. Name one of them"


@pytest.fixture(scope="module")
def stores(assets, ray_cluster, tmp_path_factory) -> tuple[FeatureStore, FeatureStore]:
    """SAEs "a" and "b" (of other widths and weights) at one hook, and a store of "b" alone."""
    from jobs.extract import run_extract

    root = tmp_path_factory.mktemp("named")
    make_sae("standard", HOOK, d_sae=40, seed=11).save_model(root / "sae-a")
    make_sae("standard", HOOK, d_sae=48, seed=12).save_model(root / "sae-b")
    a, b = f"a={root / 'sae-a'}", f"b={root / 'sae-b'}"
    for name, saes in [("both.zarr", (a, b)), ("alone.zarr", (b,))]:
        run_extract(config(assets, root / name, saes=saes, max_tokens=600))
    return FeatureStore.open(str(root / "both.zarr")), FeatureStore.open(str(root / "alone.zarr"))


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data(site: dict[str, bytes], path: str) -> dict:
    """What a dashboard's data file ``data/<path>`` hands the page (``LS.receive(key, data);``)."""
    text = site[f"data/{path}"].decode()
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


def test_each_sae_gets_its_own_exports_and_dashboard_equal_to_the_sae_alone(stores, tmp_path):
    from safetensors.numpy import load_file

    both, alone = stores
    assert both.saes == ["a", "b"] and both.hooks == [HOOK] and alone.saes == ["b"]

    written = export_delphi(both, tmp_path / "delphi")
    assert {p.name for p in (tmp_path / "delphi").iterdir()} == {"a", "b"}
    assert [p.name for p in written["a"]][-1].endswith("_39.safetensors")
    reference = export_delphi(alone, tmp_path / "delphi-alone")["b"]
    assert [p.name for p in written["b"]] == [p.name for p in reference]
    for ours, theirs in zip(written["b"], reference):
        x, y = load_file(str(ours)), load_file(str(theirs))
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    config_b = json.loads((tmp_path / "delphi" / "b" / "config.json").read_text())["latentstore"]
    assert (config_b["sae"], config_b["hook"], config_b["d_sae"]) == ("b", HOOK, 48)

    (ours,) = export_neuronpedia(both, "b", tmp_path / "np", batch_size=64)
    (theirs,) = export_neuronpedia(alone, "b", tmp_path / "np-alone", batch_size=64)
    batch = json.loads(ours.read_text())
    assert batch == json.loads(theirs.read_text())
    assert (batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (0, "resid-post", "b")  # id 0-resid-post__b
    assert len(batch["features"]) == 48 and len(batch["features"][0]["pos_str"]) == 10
    (other,) = export_neuronpedia(both, "a", tmp_path / "np-a", batch_size=64, logits=False)
    assert [len(json.loads(other.read_text())["features"]), json.loads(other.read_text())["sae_id_suffix"]] == [40, "a"]

    write_dashboard(both, "b", tmp_path / "site", max_rows=3)
    write_dashboard(alone, "b", tmp_path / "site-alone", max_rows=3)
    site = files(tmp_path / "site")
    assert site == files(tmp_path / "site-alone")
    meta = data(site, "meta.js")
    assert (meta["sae"], meta["hook"], meta["d_sae"]) == ("b", HOOK, 48)
    feature = meta["busiest"][0][0]
    page = data(site, f"features/0/{feature}.js")
    assert (page["sae"], page["hook"]) == ("b", HOOK)
    top = both.top_activations("b", feature, k=20)
    assert [e["activation"] for e in page["groups"][0]["examples"]] == top["activation"].tolist()

    for call in (lambda: export_delphi(both, tmp_path / "x", [HOOK]),
                 lambda: export_neuronpedia(both, HOOK, tmp_path / "x"),
                 lambda: write_dashboard(both, HOOK, tmp_path / "x")):
        with pytest.raises(ConfigError, match=SHARED):
            call()
    assert not (tmp_path / "x").exists()


def test_the_server_loads_the_named_sae_not_another_at_its_hook(stores, tmp_path):
    both, _ = stores
    for name, d_sae in [("a", 40), ("b", 48)]:
        server = open_server(both, name, tmp_path, port=0)
        server.server_close()
        assert (server.info["sae"], server.info["hook"], server.encoder.d_sae) == (name, HOOK, d_sae)


def test_top_and_info_by_name_and_the_shared_hook_refused_on_the_command_line(stores, tmp_path, capsys):
    both, alone = stores
    feature = int(both.feature_stats("b")["count"].idxmax())
    top = ["--feature", str(feature), "-k", "3"]
    assert main(["top", both.location, "--sae", "b", *top]) == 0
    printed = capsys.readouterr().out
    assert main(["top", alone.location, "--hook", HOOK, *top]) == 0  # the one SAE at its hook
    assert capsys.readouterr().out == printed
    assert f"b ({HOOK})  feature {feature}" in printed
    for _, example in both.top_activations("b", feature, k=3, context=(12, 4)).iterrows():
        assert f"{example['activation']:8.3f}  row {example['row']:>6} pos {example['pos']:>5}" in printed

    assert main(["info", both.location]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, d_sae in [("a", 40), ("b", 48)]:
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        assert f"d_sae {d_sae}" in lines[at] and lines[at + 1].split() == ["hook", HOOK]

    out = str(tmp_path / "out")
    for argv in (["top", both.location, "--hook", HOOK],
                 ["dashboard", both.location, "--sae", HOOK, "--out", out],
                 ["export", "neuronpedia", both.location, "--hook", HOOK, "--out", out],
                 ["export", "delphi", both.location, "--sae", HOOK, "--out", out]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"holds 2 SAEs in store {both.location}: a, b. Name one of them" in err and "Traceback" not in err
    assert main(["top", both.location, "--sae", "c"]) == 2
    assert "no SAE named 'c'" in capsys.readouterr().err
