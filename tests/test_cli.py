"""The `latentstore` command: help that teaches, extract/info/top/index end to end, errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.cli import main
from store import FeatureStore


def test_help_lists_commands_and_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import build_parser; build_parser(); "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    help_text = subprocess.run([sys.executable, "-m", "jobs.cli", "extract", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "latentstore extract --store demo.zarr" in help_text and "ray job submit" in help_text
    assert "--max-tokens" in help_text and "RELEASE/SAE_ID" in help_text


def test_max_tokens_accepts_the_ways_people_write_numbers():
    from jobs.cli import _int

    assert _int("5_000_000") == _int("5e6") == _int("5000000") == 5_000_000


@pytest.mark.ray
def test_extract_info_top_index_from_the_command_line(assets, ray_cluster, tmp_path, capsys):
    store = tmp_path / "cli.zarr"
    argv = ["extract", "--model", str(assets["model_dir"]), "--sae", str(assets["sae_dirs"]["blocks.0.hook_resid_post"]),
            "--dataset", str(assets["jsonl"]), "--store", str(store), "--context-size", "16", "--max-tokens", "2e2",
            "--workers", "1", "--no-progress", "--no-index"]
    assert main(argv) == 0
    assert "wrote 200 tokens" in capsys.readouterr().out
    fs = FeatureStore.open(str(store))
    assert fs.n_tokens == 200 and fs.index("blocks.0.hook_resid_post") is None

    assert main(["index", str(store), "--workers", "1", "--no-progress"]) == 0
    assert FeatureStore.open(str(store)).index("blocks.0.hook_resid_post") is not None
    assert "indexed 1 SAEs" in capsys.readouterr().out

    assert main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_tokens"] == 200 and info["saes"][0]["hook"] == "blocks.0.hook_resid_post"

    feature = int(fs.feature_stats("blocks.0.hook_resid_post")["count"].idxmax())
    assert main(["top", str(store), "--feature", str(feature), "-k", "3"]) == 0
    printed = capsys.readouterr().out
    top = fs.top_activations("blocks.0.hook_resid_post", feature, k=3, context=(12, 4))
    for _, example in top.iterrows():
        assert f"{example['activation']:8.3f}  row {example['row']:>6} pos {example['pos']:>5}" in printed
    assert "«" in printed and f"feature {feature}" in printed


def test_errors_print_a_message_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert "latentstore info: error: No latentstore store at" in err and "latentstore extract --store" in err


def test_usage_errors_are_one_message_and_no_command_shows_the_help(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["extract", "--value-dtype", "int8"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "latentstore extract: error: argument --value-dtype: invalid choice: 'int8' (choose from 'bfloat16', "
        "'float16', 'float32')\n(`latentstore extract --help` lists the options.)\n")
    assert main([]) == 2
    shown = capsys.readouterr().err
    assert shown.startswith("usage: latentstore") and "Run `latentstore COMMAND --help`" in shown


@pytest.mark.ray
def test_output_cut_short_by_its_reader_ends_quietly(reference_store):
    """`latentstore top STORE | head -1`: the reader stops after one line, and the command stops
    without a traceback (as other command-line tools do)."""
    top = subprocess.Popen([sys.executable, "-m", "jobs.cli", "top", reference_store.location, "-k", "2000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = top.stdout.readline() + top.stdout.readline()  # a blank line, a feature's header; far more follows
    top.stdout.close()
    stderr = top.stderr.read().decode()
    assert top.wait(timeout=120) == 1
    assert b"feature" in first and stderr == ""


@pytest.mark.ray
def test_ctrl_c_says_interrupted_and_how_to_resume(ray_cluster, monkeypatch, tmp_path, capsys):
    """Ctrl-C ends a command with one line and status 130 (128 + SIGINT), not a traceback; the
    commands that write a store say that a rerun resumes. A Ray that the caller started (here the
    session's) is the caller's: the command leaves it running; one it started itself, it stops."""
    import jobs.extract
    import jobs.ray_session
    from store import FeatureStore

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.extract, "run_extract", interrupted)
    assert main(["extract", "--store", str(tmp_path / "x.zarr")]) == 130
    assert capsys.readouterr().err == ("latentstore extract: interrupted. Rerun the same command to resume it: what "
                                       "is complete is kept.\n")
    assert ray_cluster.is_initialized()
    stopped = []
    monkeypatch.setattr(jobs.ray_session, "_joined_here", True)
    monkeypatch.setattr(ray_cluster, "shutdown", lambda: stopped.append(True))
    assert main(["extract", "--store", str(tmp_path / "x.zarr")]) == 130
    assert stopped == [True] and jobs.ray_session._joined_here is False
    capsys.readouterr()
    monkeypatch.setattr(FeatureStore, "open", interrupted)
    assert main(["info", str(tmp_path / "x.zarr")]) == 130
    assert capsys.readouterr().err == "latentstore info: interrupted.\n"


def test_extract_given_some_of_model_sae_and_dataset_names_the_rest(tmp_path, capsys):
    from pipeline import default

    assert main(["extract", "--store", str(tmp_path / "x.zarr"), "--dataset", str(tmp_path / "mine.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore extract: error: give --model, --sae as well, or none of "
                          "--model/--sae/--dataset to run the embedded default. The embedded default's are: "
                          f"--model {default.MODEL_DIR} --sae "), err
    assert not (tmp_path / "x.zarr").exists()
