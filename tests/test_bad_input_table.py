"""Bad input across the whole tool, as one table: each case, the error type and the message.

Every case runs through the public entry points (`validate`/`run_extract`, `FeatureStore`,
the sweep job's `validate`, `read_sweep`, the `latentstore` command). After each, no store
that was not already complete looks complete: extraction refuses before writing anything,
and a store that existed before is unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zarr

from jobs.cli import main
from pipeline.dataset import DatasetSpec
from store import FeatureStore
from store import format as fmt
from store.errors import (ConfigError, FormatVersionError, StoreConflictError, StoreCorruptError,
                          StoreFullError, StoreIncompleteError, StoreNotFoundError, StoreWriteError)
from tests.conftest import make_sae
from tests.stores import config

pytestmark = pytest.mark.ray

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def good_store(assets, ray_cluster, tmp_path_factory) -> str:
    """A small complete store that query and sweep cases point at (copied before any damage)."""
    from jobs.extract import run_extract

    cfg = config(assets, tmp_path_factory.mktemp("good") / "good.zarr", saes=(str(assets["sae_dirs"][HOOK]),),
                 max_tokens=300)
    run_extract(cfg)
    return cfg.store.path


# -- how to make each bad input ---------------------------------------------------------------


def _sae_dir(tmp: Path, name: str, **kwargs) -> str:
    path = tmp / name
    make_sae("standard", **kwargs).save_model(path)
    return str(path)


def _truncated_sae(assets, tmp: Path) -> str:
    path = tmp / "truncated-sae"
    shutil.copytree(assets["sae_dirs"][HOOK], path)
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return str(path)


def _pickled_sae(assets, tmp: Path) -> str:
    import torch

    path = tmp / "pickled-sae"
    shutil.copytree(assets["sae_dirs"][HOOK], path)
    (path / "sae_weights.safetensors").unlink()
    torch.save({"W_enc": torch.zeros(2, 2)}, path / "sae_weights.pt")
    return str(path)


def _pickle_as_model(assets, tmp: Path) -> str:
    import torch

    path = tmp / "pickled-model"
    shutil.copytree(assets["model_dir"], path)
    (path / "model.safetensors").unlink()
    torch.save({"W_E": torch.zeros(2, 2)}, path / "pytorch_model.bin")
    return str(path)


def _with_config(source: Path, tmp: Path, name: str, file: str, text: str) -> str:
    """A copy of a model or SAE directory whose config file holds ``text``."""
    path = tmp / name
    shutil.copytree(source, path)
    (path / file).write_text(text)
    return str(path)


def _file(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _empty_parquet(tmp: Path) -> str:
    import datasets

    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp / "empty.parquet"))
    return str(tmp / "empty.parquet")


def _store_of_another_model(assets, tmp: Path) -> str:
    """A store begun by a run whose model differs (another config), at the path this run asks for."""
    from jobs.extract import validate
    from store.writer import StoreWriter

    cfg = config(assets, tmp / "store.zarr")
    run = validate(cfg).run_metadata()
    run["model"]["name"] = "gpt2-small"
    run["model"]["config"]["d_model"] = 768
    StoreWriter(cfg.store.path).begin(run, {"n_shards": 8, "n_rows": 37}, overwrite=False)
    return cfg.store.path


def _newer_format_store(assets, tmp: Path, source: str | None = None) -> str:
    path = tmp / ("store.zarr" if source is None else "newer.zarr")  # a copy of a complete store: not checked
    if source is None:
        from jobs.extract import validate
        from store.writer import StoreWriter

        cfg = config(assets, path)
        StoreWriter(cfg.store.path).begin(validate(cfg).run_metadata(), {"n_shards": 8, "n_rows": 37}, overwrite=False)
    else:
        shutil.copytree(source, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][fmt.ATTRS_KEY]["encoding-version"] = f"{fmt.MAJOR + 1}.0"
    (path / "zarr.json").write_text(json.dumps(meta))
    return str(path)


def _copy(store: str, tmp: Path) -> str:
    shutil.copytree(store, tmp / "copy.zarr")
    return str(tmp / "copy.zarr")


def _unknown_codec(store: str, tmp: Path) -> str:
    path = _copy(store, tmp)
    meta = Path(path) / fmt.shard_path(0) / fmt.SAES_GROUP / HOOK / fmt.VALUES / "zarr.json"
    meta.write_text(meta.read_text().replace('"blosc"', '"lz-future"'))
    return path


def _saved_dataset(tmp: Path) -> str:
    import datasets

    datasets.Dataset.from_dict({"text": ["the cat sat"]}).save_to_disk(str(tmp / "saved"))
    return str(tmp / "saved")


def _hub_down(name: str) -> str:
    """``name``, with TransformerLens's config download failing as it does offline (huggingface_hub's
    error, an OSError and a ValueError at once). Undone after the case."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformer_lens import loading

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("We couldn't connect\nCheck your internet connection")

    PATCHES.append((loading, "get_pretrained_model_config", loading.get_pretrained_model_config))
    loading.get_pretrained_model_config = offline
    return name


def _jsonl(tmp: Path, name: str, rows: list[dict]) -> str:
    (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp / name)


MOUNTS: list[Path] = []  # tmpfs mounts made by a case, unmounted after it
PATCHES: list[tuple] = []  # (object, attribute, original) set by a case, restored after it


def _mount(tmp: Path, name: str, options: str) -> str:
    """An empty tmpfs mounted at tmp/name (root only: skips the case elsewhere)."""
    path = tmp / name
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    MOUNTS.append(path)
    return str(path)


@pytest.fixture(autouse=True)
def _undo():
    yield
    while MOUNTS:
        subprocess.run(["umount", str(MOUNTS.pop())], check=False)
    while PATCHES:
        setattr(*PATCHES.pop())


class FakeRay:
    """What ``jobs.ray_session.call`` needs of Ray, with a task that failed in a worker with ``cause``."""

    class exceptions:
        class RayTaskError(Exception):
            pass

    def __init__(self, cause: BaseException):
        self.cause = cause

    def get(self, ref):
        error = self.exceptions.RayTaskError("a worker failed")
        error.cause = self.cause
        raise error


def _worker_disk_full(assets, tmp, store):
    """A worker's write met ENOSPC: the driver's error names the store and says a rerun resumes."""
    import errno

    from jobs.ray_session import call

    call(FakeRay(OSError(errno.ENOSPC, "No space left on device")), None, "writing shard 3",
         location=str(tmp / "store.zarr"))


class Answer(Exception):
    """An HTTP answer, raised so that the table can match it: ``STATUS: BODY``."""


def _nested_json_to_the_server(assets, tmp, store):
    """A body nested 100,000 levels deep, POSTed to the prompt endpoint: answered 400, the server lives on."""
    from jobs.dashboard_serve import PromptServer

    class NoModel:
        name = hook = HOOK
        model_name, max_text_tokens = "tiny", 15

        def __call__(self, text):
            raise AssertionError("the model must not be asked")

    server = PromptServer(("127.0.0.1", 0), tmp, NoModel(), None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answers = []
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"text": 1}'):  # the second: still answering
            request = urllib.request.Request(f"{server.url}/api/prompt", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answers.append(f"{response.status}: {response.read().decode()}")
            except urllib.error.HTTPError as e:
                answers.append(f"{e.code}: {e.read().decode()}")
    finally:
        server.shutdown()
        server.server_close()
    assert answers[1].startswith("400: "), answers
    raise Answer(answers[0])


def _dashboard_over_own_files(assets, tmp, store):
    """--out names a folder of the user's own: refused, and their index.html is untouched."""
    own = tmp / "mine"
    own.mkdir()
    (own / "index.html").write_text("my own page")
    code = main(["dashboard", store, "--hook", HOOK, "--out", str(own), "--no-progress"])
    assert (own / "index.html").read_text() == "my own page" and sorted(p.name for p in own.iterdir()) == ["index.html"]
    raise SystemExit(code)


# -- the table --------------------------------------------------------------------------------
# name: (what runs, given (assets, tmp, good_store) -> callable; error type; message pattern)


def _extract(**changes):
    def run(assets, tmp, store):
        from jobs.extract import validate

        made = {k: (v(assets, tmp) if callable(v) else v) for k, v in changes.items()}
        validate(config(assets, made.pop("store", tmp / "store.zarr"), **made))

    return run


def _run_extract(**changes):
    def run(assets, tmp, store):
        from jobs.extract import run_extract

        made = {k: (v(assets, tmp) if callable(v) else v) for k, v in changes.items()}
        run_extract(config(assets, made.pop("store", tmp / "store.zarr"), **made))

    return run


def _query(action):
    return lambda assets, tmp, store: action(FeatureStore.open(store))


def _sweep(**fields):
    def run(assets, tmp, store):
        from jobs.sweep import SweepConfig, validate

        made = {k: (v(assets, tmp) if callable(v) else v) for k, v in fields.items()}
        validate(SweepConfig.build(**{"name": "s", "store": store, "rows": (0, 4), "metric": "kl", **made}))

    return run


def _cli(*argv, before=None):
    def run(assets, tmp, store):
        if before is not None:
            before(assets, tmp)
        args = [a.format(store=store, tmp=tmp, model=assets["model_dir"], sae=assets["sae_dirs"][HOOK],
                         jsonl=assets["jsonl"]) for a in argv]
        code = main(args)
        raise SystemExit(code)

    return run


# The shard size: dataset rows per shard, or (once shards are planned by tokens) tokens per shard.
from jobs.extract import ExtractConfig  # noqa: E402

SMALL_SHARDS = ("--shard-tokens", "256")  # several shards of the test data

# `latentstore extract` on the test model, SAE and data, into {tmp}/x.zarr unless told otherwise
EXTRACT = ("extract", "--model", "{model}", "--sae", "{sae}", "--dataset", "{jsonl}", "--context-size", "16",
           "--workers", "1", "--no-progress", "--no-index")
SECRET = "hunter2SECRETvalue"


BAD_INPUTS = {
    # extract: refused before any model runs
    "extract: hook the model lacks": (
        _extract(saes=lambda a, t: (_sae_dir(t, "s7", hook="blocks.7.hook_resid_post"),)),
        ConfigError, r"hook 'blocks\.7\.hook_resid_post' is not a hook of model .*Hooks there include"),
    "extract: SAE width differs from the model's": (
        _extract(saes=lambda a, t: (_sae_dir(t, "s16", hook=HOOK, d_in=16),)),
        ConfigError, r"d_in=16, but .* has width 32 at blocks\.0\.hook_resid_post\. Is the SAE for another model"),
    "extract: empty dataset": (
        _extract(dataset=lambda a, t: DatasetSpec(_empty_parquet(t))), ConfigError, r"is empty: there is nothing"),
    "extract: non-UTF-8 text file": (
        _extract(dataset=lambda a, t: DatasetSpec(_file(t, "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))),
        ConfigError, r"row 1 of column 'text' is not valid UTF-8 .*Re-encode the file as UTF-8"),
    "extract: a dataset file that does not exist": (
        _extract(dataset=lambda a, t: DatasetSpec(str(t / "nothere.jsonl"))),
        ConfigError, r"nothere\.jsonl: no such file or folder \(.*/nothere\.jsonl does not exist\)\. Check the path; "
                     r"a hub dataset is named as on the hub"),
    "extract: --split of a dataset file": (
        _extract(dataset=lambda a, t: DatasetSpec(a["jsonl"], split="test")),
        ConfigError, r"is a file, which holds one split: ExtractConfig\.dataset\.split test does not apply\. "
                     r"Leave ExtractConfig\.dataset\.split out\."),
    "extract: --split of a folder that holds one dataset": (
        _extract(dataset=lambda a, t: DatasetSpec(_saved_dataset(t), split="test")),
        ConfigError, r"holds one dataset, not splits .*: ExtractConfig\.dataset\.split test does not apply\. "
                     r"Leave ExtractConfig\.dataset\.split out\."),
    "extract: a model name whose config the hub cannot give": (
        _extract(model=lambda a, t: _hub_down("gpt2-small")),
        ConfigError, r"ExtractConfig\.model\.name 'gpt2-small': could not fetch its config from the Hugging Face hub \(We couldn't "
                     r"connect\)\. Check the connection"),
    "extract: a .jsonl.gz that is not gzip": (
        _extract(dataset=lambda a, t: DatasetSpec(_file(t, "plain.jsonl.gz", b'{"text": "a"}\n'))),
        ConfigError, r"plain\.jsonl\.gz could not be read as json \(BadGzipFile: Not a gzipped file"),
    "extract: cpus_per_worker -1": (
        _extract(cpus_per_worker=-1), ConfigError,
        r"ExtractConfig\.resources\.cpus_per_worker=-1 must be a number of CPU cores above 0, such as 2 or 0\.5\."),
    "extract: unknown dataset file type": (
        _extract(dataset=lambda a, t: DatasetSpec(_file(t, "data.xlsx", b"PK\x03\x04"))),
        ConfigError, r"unknown file type\. Use a \.jsonl"),
    "extract: pickled SAE weights offered": (
        _extract(saes=lambda a, t: (_pickled_sae(a, t),)),
        ConfigError, r"found pickled weights \(sae_weights\.pt\).*Pickles are refused"),
    "extract: truncated SAE safetensors": (
        _run_extract(saes=lambda a, t: (_truncated_sae(a, t),)),
        ConfigError, r"sae_weights\.safetensors is not a readable safetensors file .*truncated"),
    "extract: the model's config.json is not JSON": (
        _extract(model=lambda a, t: _with_config(a["model_dir"], t, "model", "config.json", "{n_layers: 2")),
        ConfigError, r"model: .*model/config\.json is not valid JSON \(Expecting property name"),
    "extract: the SAE's cfg.json holds a list": (
        _extract(saes=lambda a, t: (_with_config(a["sae_dirs"][HOOK], t, "sae", "cfg.json", "[1, 2]"),)),
        ConfigError, r"sae': .*sae/cfg\.json holds a list, not a JSON object of fields"),
    "extract: pickle offered as the model's weights": (
        _run_extract(model=lambda a, t: _pickle_as_model(a, t)),
        ConfigError, r"no model\.safetensors in .* Found pytorch_model\.bin: pickled weights are refused"),
    "extract: store made by another model": (
        _extract(store=lambda a, t: _store_of_another_model(a, t)),
        StoreConflictError, r"(?s)already holds a different run:.*model\.name: store has 'gpt2-small'.*--overwrite"),
    "extract: store from a newer format version": (
        _extract(store=lambda a, t: _newer_format_store(a, t)),
        FormatVersionError, r"written in latentstore format 3\.0.*Upgrade latentstore"),
    "extract: credentials inside the store URL": (
        _extract(store="s3://AKIAEXAMPLE:hunter2@bucket/run.zarr"),
        ConfigError, r"the store URL s3://\*\*\*@bucket/run\.zarr holds credentials"),
    "extract: credentials inside a chained store URL": (
        _extract(store=f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/x.zarr"),
        ConfigError, r"the store URL simplecache::s3://\*\*\*@bucket/x\.zarr holds credentials \(a user name and "
                     r"password\)\. Remove them from the URL"),
    "extract: a secret holding a slash, which ends the URL's host early": (
        _extract(store=f"s3://AKIAEXAMPLE:{SECRET}/x+y@bucket/x.zarr"),
        ConfigError, r"the store URL s3://\*\*\*@bucket/x\.zarr holds credentials"),
    "extract: a signed URL (credentials in the query)": (
        _extract(store=f"filecache::https://host/x.zarr?X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA"),
        ConfigError, r"https://host/x\.zarr\?X-Amz-Signature=\*\*\*&X-Amz-Credential=\*\*\* holds credentials "
                     r"\(the query parameters X-Amz-Credential, X-Amz-Signature\)"),
    "extract: an empty .jsonl file": (
        _extract(dataset=lambda a, t: DatasetSpec(_file(t, "empty.jsonl", b""))),
        ConfigError, r"empty\.jsonl is empty: there is nothing to extract\. Give a file with at least one row"),
    "extract: every row is empty text": (
        _extract(dataset=lambda a, t: DatasetSpec(_jsonl(t, "blank.jsonl", [{"text": ""}] * 3))),
        ConfigError, r"every row of column 'text' is empty text \(3 rows\): there is nothing to extract\. "
                     r"Check that ExtractConfig\.dataset\.text_column names"),
    "extract: --shard-tokens 0": (
        _extract(shard_tokens=0), ConfigError, r"^ExtractConfig\.store\.shard_tokens must be positive, got 0\.$"),
    "extract: --context-size 1 leaves no room after BOS": (
        _extract(context_size=1), ConfigError,
        r"ExtractConfig\.dataset\.context_size=1 leaves no room for text: every window starts with the BOS token\. "
        r"Use ExtractConfig\.dataset\.context_size=2 or more, or ExtractConfig\.dataset\.prepend_bos=False"),
    "extract: a pre-tokenized column of strings": (
        _extract(dataset=lambda a, t: DatasetSpec(_jsonl(t, "tok.jsonl", [{"tokens": "2 3 4"}]), tokens_column="tokens")),
        ConfigError, r"ExtractConfig\.dataset\.tokens_column 'tokens' of ExtractConfig\.dataset\.name .* holds text "
                     r"\(strings\), not lists of token ids\. Pass ExtractConfig\.dataset\.text_column tokens instead"),
    "extract: a pre-tokenized row that is a string among lists": (
        _extract(dataset=lambda a, t: DatasetSpec(_jsonl(t, "mixed.jsonl", [{"tokens": [2, 3]}, {"tokens": "4 5"}]),
                                                  tokens_column="tokens")),
        ConfigError, r"dataset row 1: tokens are a string \('4 5'\), not a list of token ids\. Give each row as a list"),
    "extract: a worker's disk fills up mid-shard": (
        _worker_disk_full, StoreFullError,
        r"cannot write the store: no space left on the device for .*store\.zarr \(the file system mounted at .* "
        r"MiB free\)\. Make room there .* rerun the same command: it resumes, keeping every complete shard"),
    "extract: --store an empty read-only mount point": (
        _extract(store=lambda a, t: _mount(t, "ro", "ro,size=1m")),
        ConfigError, r"ExtractConfig\.store\.path .*/ro: .*/ro is on a read-only file system\. Choose a path on a "
                     r"writable disk"),
    "extract: --store an empty mount point": (
        _extract(store=lambda a, t: _mount(t, "mnt", "size=1m")),
        ConfigError, r"ExtractConfig\.store\.path .*/mnt is a mount point\. .* give a folder inside it, such as "
                     r"ExtractConfig\.store\.path .*/mnt/latentstore\.zarr"),
    "extract: a column that does not exist": (
        _extract(dataset=lambda a, t: DatasetSpec(str(a["jsonl"]), text_column="body")),
        ConfigError, r"has no column 'body'; its columns are: text, label"),
    "extract: several problems at once": (
        _extract(context_size=65, batch_size=0, value_dtype="int8"),
        ConfigError, r"3 problems:\n  - ExtractConfig\.resources\.batch_size must be positive.*\n"
                     r"  - ExtractConfig\.store\.value_dtype='int8'.*\n  - ExtractConfig\.dataset\.context_size=65"),
    # queries
    "query: csr of a hook the store lacks": (
        _query(lambda fs: fs.csr("blocks.2.hook_resid_post")),
        ConfigError, r"has no SAE named 'blocks\.2\.hook_resid_post' \(nor one at a hook of that name\); its SAEs: "
                     r"blocks\.0\.hook_resid_post"),
    "query: token range past the end": (
        _query(lambda fs: fs.csr(HOOK, 0, fs.n_tokens + 1)), IndexError,
        r"token range start=0, stop=301 is not a range of the store's 300 tokens: give whole numbers with "
        r"0 <= start <= stop <= 300"),
    "query: negative token range": (
        _query(lambda fs: fs.token_ids(-5, 3)), IndexError, r"token range start=-5, stop=3 is not a range"),
    "query: feature index out of range": (
        _query(lambda fs: fs.top_activations(HOOK, 96)), ConfigError, r"feature 96 is out of range for .*features 0 to 95"),
    "query: top_activations with a negative k": (
        _query(lambda fs: fs.top_activations(HOOK, 3, k=-3)), ConfigError,
        r"k=-3: give how many examples you want, a whole number of at least 1"),
    "query: negative context": (
        _query(lambda fs: fs.top_activations(HOOK, 3, context=(-2, 4))), ConfigError,
        r"context=\(-2, 4\): give the tokens of context to show"),
    "query: store path that holds no store": (
        lambda a, t, s: FeatureStore.open(str(t)), StoreNotFoundError, r"No latentstore store at .*latentstore extract --store"),
    "query: store from a newer format version": (
        lambda a, t, s: FeatureStore.open(_newer_format_store(a, t, s)), FormatVersionError, r"Upgrade latentstore"),
    "query: an array with an unknown codec": (
        lambda a, t, s: FeatureStore.open(_unknown_codec(s, t)).csr(HOOK), StoreCorruptError,
        r"(?s)shards/000000/saes/blocks\.0\.hook_resid_post/values is damaged.*lz-future.*latentstore verify"),
    # sweeps
    "sweep: empty row range": (_sweep(rows=(5, 5)), ConfigError, r"SweepConfig\.prompts\.rows=\(5, 5\) is empty"),
    "sweep: an SAE the store lacks": (
        _sweep(sae_name="blocks.1.hook_mlp_out"), ConfigError,
        r"SweepConfig\.sae_name='blocks\.1\.hook_mlp_out': store .* has no SAE named 'blocks\.1\.hook_mlp_out'"),
    "sweep: --sae that is not the store's SAE": (
        _sweep(sae=lambda a, t: str(a["sae_dirs"]["blocks.1.hook_mlp_out"])), ConfigError,
        r"SweepConfig\.sae='.*' reads 'blocks\.1\.hook_mlp_out' with 96 features, but the store's SAE "
        r"'blocks\.0\.hook_resid_post', whose live features and means the sweep reads, reads "
        r"'blocks\.0\.hook_resid_post' with 96\. Leave SweepConfig\.sae out"),
    "sweep: --features past the SAE's last": (
        _sweep(features=(7, 999999)), ConfigError,
        rf"features=\(7, 999999\): 999999 is not a feature of the SAE '{HOOK}', whose ids are 0\.\.95\."),
    "sweep: a scale factor of nan": (
        _sweep(ablation=float("nan")), ConfigError, r"ablation\.kind=nan: use zero, mean or a finite scale factor"),
    "sweep: name with a slash": (_sweep(name="a/b"), ConfigError, r"sweep name 'a/b': use letters, digits"),
    "sweep: logit_diff without answers": (
        _sweep(metric="logit_diff"), ConfigError, r"SweepConfig\.ablation\.metric='logit_diff' needs answers"),
    "sweep: prompt file with a broken line": (
        _sweep(rows=None, prompts=lambda a, t: _file(t, "p.jsonl", b'{"prompt": "a"}\n{not json\n'), model="m", sae="s"),
        ConfigError, r"SweepConfig\.prompts\.file .*p\.jsonl: line 2 is not JSON"),
    "sweep: --sae-name that is not the --sae's": (
        _sweep(rows=None, prompts=lambda a, t: _file(t, "p.jsonl", b'{"prompt": "a cat"}\n'),
               model=lambda a, t: str(a["model_dir"]), sae=lambda a, t: str(a["sae_dirs"]["blocks.0.hook_resid_post"]),
               sae_name="blocks.1.hook_mlp_out"),
        ConfigError, r"SweepConfig\.sae_name='blocks\.1\.hook_mlp_out' is not SweepConfig\.sae='.*', which is "
                     r"named 'blocks\.0\.hook_resid_post' and reads 'blocks\.0\.hook_resid_post'"),
    "sweep: reading a sweep that does not exist": (
        lambda a, t, s: __import__("store.sweeps", fromlist=["read_sweep"]).read_sweep(s, "nope"),
        StoreNotFoundError, r"has no sweep 'nope'; it has: none"),
    # the command line: exit status 2 and a one-line message on stderr
    "cli: info on a path with no store": (
        _cli("info", "{tmp}/nothing.zarr"), SystemExit, r"2"),
    "cli: verify on a path with no store": (
        _cli("verify", "{tmp}/nothing.zarr"), SystemExit, r"2"),
    "cli: index of an unfinished store": (
        _cli("index", "{tmp}/unfinished.zarr"), SystemExit, r"2"),
    "cli: extract with --model but no --sae": (
        _cli("extract", "--model", "{model}", "--store", "{tmp}/x.zarr"), SystemExit, r"2"),
    "cli: export neuronpedia of an unfinished store": (
        _cli("export", "neuronpedia", "{tmp}/unfinished.zarr", "--sae", HOOK, "--out", "{tmp}/np"), SystemExit, r"2"),
    "cli: export delphi of an unfinished store": (
        _cli("export", "delphi", "{tmp}/unfinished.zarr", "--out", "{tmp}/delphi"), SystemExit, r"2"),
    "cli: dashboard of an unfinished store": (
        _cli("dashboard", "{tmp}/unfinished.zarr", "--sae", HOOK, "--out", "{tmp}/site"), SystemExit, r"2"),
    "cli: export delphi --out inside the store": (
        _cli("export", "delphi", "{store}", "--out", "{store}/shards"), SystemExit, r"2"),
    "cli: export neuronpedia --out empty": (
        _cli("export", "neuronpedia", "{store}", "--sae", HOOK, "--out", ""), SystemExit, r"2"),
    "cli: export delphi --out empty": (
        _cli("export", "delphi", "{store}", "--out", ""), SystemExit, r"2"),
    "cli: dashboard --out empty": (
        _cli("dashboard", "{store}", "--sae", HOOK, "--out", ""), SystemExit, r"2"),
    "cli: export neuronpedia --model-id empty and --sae-set with a newline": (
        _cli("export", "neuronpedia", "{store}", "--sae", HOOK, "--out", "{tmp}/np", "--model-id", "", "--sae-set",
             "a\nb"), SystemExit, r"2"),
    "cli: steer --temperature without --sample": (
        _cli("steer", "--store", "{store}", "--prompt", "the cat", "--feature", "1", "--magnitude", "2",
             "--temperature", "2"), SystemExit, r"2"),
    "cli: steer --store beside both --model and --sae": (
        _cli("steer", "--store", "{store}", "--model", "{model}", "--sae", "{sae}", "--prompt", "the cat", "--feature",
             "1", "--magnitude", "2"), SystemExit, r"2"),
    "cli: steer --sample at temperature 0": (
        _cli("steer", "--store", "{store}", "--prompt", "the cat", "--feature", "1", "--magnitude", "2", "--sample",
             "--temperature", "0"), SystemExit, r"2"),
    "cli: steer past the model's context": (
        _cli("steer", "--store", "{store}", "--prompt", "the cat", "--feature", "1", "--magnitude", "2",
             "--max-new-tokens", "100000"), SystemExit, r"2"),
    "cli: steer --max-new-tokens 0": (
        _cli("steer", "--store", "{store}", "--prompt", "the cat", "--feature", "1", "--magnitude", "2",
             "--max-new-tokens", "0"), SystemExit, r"2"),
    "cli: sweep --prompts that is not UTF-8": (
        _cli("sweep", "--name", "s", "--store", "{tmp}/o.zarr", "--prompts", "{tmp}/latin1.jsonl", "--model", "{model}",
             "--sae", "{sae}", "--metric", "kl", before=lambda a, t: _file(t, "latin1.jsonl", b'{"prompt": "caf\xe9"}\n')),
        SystemExit, r"2"),
    "cli: sweep --prompts that does not exist": (
        _cli("sweep", "--name", "s", "--store", "{tmp}/o.zarr", "--prompts", "{tmp}/nope.jsonl", "--model", "{model}",
             "--sae", "{sae}", "--metric", "kl"), SystemExit, r"2"),
    "cli: sweep --prompts whose third line lacks the answer, after a blank line": (
        _cli("sweep", "--name", "s", "--store", "{tmp}/o.zarr", "--prompts", "{tmp}/p.jsonl", "--model", "{model}",
             "--sae", "{sae}", before=lambda a, t: _file(
                 t, "p.jsonl", b'{"prompt": "a", "answer": " b", "wrong_answer": " c"}\n\n{"prompt": "a"}\n')),
        SystemExit, r"2"),
    "cli: a --max-tokens that is not a whole number": (
        _cli("extract", "--max-tokens", "1.5"), SystemExit, r"2"),
    "cli: info on a chained URL with credentials": (
        _cli("info", f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/x.zarr"), SystemExit, r"2"),
    "cli: extract to a chained URL with credentials": (
        _cli(*EXTRACT, "--store", f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/x.zarr"), SystemExit, r"2"),
    "cli: extract of an empty .jsonl file": (
        _cli(*EXTRACT[:5], "--dataset", "{tmp}/empty.jsonl", *EXTRACT[7:], "--store", "{tmp}/x.zarr",
             before=lambda a, t: _file(t, "empty.jsonl", b"")), SystemExit, r"2"),
    "cli: extract with --shard-tokens 0": (
        _cli(*EXTRACT, "--shard-tokens", "0", "--store", "{tmp}/x.zarr"), SystemExit, r"2"),
    "cli: extract with --context-size 1": (
        _cli(*EXTRACT[:7], "--context-size", "1", *EXTRACT[9:], "--store", "{tmp}/x.zarr"), SystemExit, r"2"),
    "cli: extract of a dataset whose every row is empty": (
        _cli(*EXTRACT[:5], "--dataset", "{tmp}/blank.jsonl", *EXTRACT[7:], "--store", "{tmp}/x.zarr",
             before=lambda a, t: _jsonl(t, "blank.jsonl", [{"text": ""}] * 4)), SystemExit, r"2"),
    "cli: extract to an empty read-only mount point": (
        _cli(*EXTRACT, "--store", "{tmp}/ro", before=lambda a, t: _mount(t, "ro", "ro,size=1m")), SystemExit, r"2"),
    "cli: top of a feature past the end": (_cli("top", "{store}", "--feature", "99999"), SystemExit, r"2"),
    "cli: top of feature -1": (_cli("top", "{store}", "--feature", "-1"), SystemExit, r"2"),
    "cli: top -k -3": (_cli("top", "{store}", "--feature", "3", "-k", "-3"), SystemExit, r"2"),
    "cli: dashboard --out an existing file": (
        _cli("dashboard", "{store}", "--hook", HOOK, "--out", "{tmp}/site.txt", "--no-progress",
             before=lambda a, t: _file(t, "site.txt", b"notes")), SystemExit, r"2"),
    "cli: dashboard --out a folder holding the user's own index.html": (
        _dashboard_over_own_files, SystemExit, r"2"),
    "cli: export neuronpedia --out an existing file": (
        _cli("export", "neuronpedia", "{store}", "--hook", HOOK, "--out", "{tmp}/np.txt", "--no-progress",
             before=lambda a, t: _file(t, "np.txt", b"notes")), SystemExit, r"2"),
    "cli: export delphi --out a folder that cannot be made": (
        _cli("export", "delphi", "{store}", "--out", "/proc/latentstore-test/cache"), SystemExit, r"2"),
    "cli: dashboard --max-rows -1": (
        _cli("dashboard", "{store}", "--hook", HOOK, "--out", "{tmp}/site", "--max-rows", "-1"), SystemExit, r"2"),
    "cli: index --workers 0": (_cli("index", "{store}", "--workers", "0"), SystemExit, r"2"),
    "cli: steer a model TransformerLens does not know": (
        _cli("steer", "--model", "nosuchmodel", "--sae", "{tmp}/sae", "--prompt", "the cat", "--feature", "1",
             "--magnitude", "2"), SystemExit, r"2"),
    "cli: dashboard --serve on port 99999": (
        _cli("dashboard", "{store}", "--hook", HOOK, "--out", "{tmp}/site", "--serve", "--port", "99999"),
        SystemExit, r"2"),
    "cli: info on a zarr group that is not a latentstore store": (
        _cli("info", "{tmp}/other.zarr", before=lambda a, t: zarr.open_group(str(t / "other.zarr"), mode="w")),
        SystemExit, r"2"),
    "cli: top of a file": (
        _cli("top", "{tmp}/notes.txt", before=lambda a, t: _file(t, "notes.txt", b"notes")), SystemExit, r"2"),
    "cli: sweep --ablation nan": (
        _cli("sweep", "--name", "s", "--store", "{store}", "--rows", "0:4", "--metric", "kl", "--ablation", "nan"),
        SystemExit, r"2"),
    "cli: steer --magnitude inf": (
        _cli("steer", "--store", "{store}", "--prompt", "the cat", "--feature", "1", "--magnitude", "inf"),
        SystemExit, r"2"),
    "cli: sweep --features -1:4 (a value argparse takes for a flag)": (
        _cli("sweep", "--name", "s", "--store", "{store}", "--rows", "0:4", "--metric", "kl", "--features", "-1:4"),
        SystemExit, r"2"),
    "cli: sweep --features with an empty item": (
        _cli("sweep", "--name", "s", "--store", "{store}", "--rows", "0:4", "--metric", "kl", "--features", "1,,2"),
        SystemExit, r"2"),
    "cli: sweep --features empty": (
        _cli("sweep", "--name", "s", "--store", "{store}", "--rows", "0:4", "--metric", "kl", "--features", ""),
        SystemExit, r"2"),
    "cli: steer a model URL with credentials": (
        _cli("steer", "--model", f"https://u:{SECRET}@h.invalid/m", "--sae", "{sae}", "--prompt", "the cat",
             "--feature", "1", "--magnitude", "2"), SystemExit, r"2"),
    "cli: export neuronpedia --dataset with a token": (
        _cli("export", "neuronpedia", "{store}", "--hook", HOOK, "--out", "{tmp}/np", "--no-progress",
             "--dataset", f"https://h.invalid/d?token={SECRET}"), SystemExit, r"2"),
    "cli: index of a file": (
        _cli("index", "{tmp}/notes.txt", before=lambda a, t: _file(t, "notes.txt", b"notes")), SystemExit, r"2"),
    "dashboard: JSON nested 100,000 levels deep sent to /api/prompt": (
        _nested_json_to_the_server, Answer,
        r'^400: \{"error": "the body is JSON nested too deeply to read; send \{\\"text\\": \\"...\\"\}\."\}$'),
}

CLI_STDERR = {
    "cli: export neuronpedia --model-id empty and --sae-set with a newline":
        "latentstore export neuronpedia: error: --model-id '', --sae-set 'a\\nb': give a name of printable "
        "characters, or leave the flag out for its default.",
    "cli: steer --temperature without --sample": "latentstore steer: error: --temperature 2.0 applies to sampling: add "
                                                 "--sample, or leave --temperature out for greedy decoding.",
    "cli: steer --store beside both --model and --sae": "latentstore steer: error: --store only supplies the --model or "
                                                        "--sae left out, and both are given: leave --store (and "
                                                        "--sae-name) out, or one of --model and --sae.",
    "cli: sweep --features with an empty item": "latentstore sweep: error: argument --features: '1,,2': give feature "
                                                "ids separated by commas, e.g. 12,408,9031 (or leave --features out "
                                                "for every live feature)",
    "cli: sweep --features empty": "latentstore sweep: error: argument --features: '': give feature ids separated by "
                                   "commas, e.g. 12,408,9031 (or leave --features out for every live feature)",
    "cli: export neuronpedia --out empty": "latentstore export neuronpedia: error: --out is empty; give a folder for "
                                           "the Neuronpedia export (`.` for this one, if that is meant).",
    "cli: export delphi --out empty": "latentstore export delphi: error: --out is empty; give a folder for delphi's "
                                      "latent cache (`.` for this one, if that is meant).",
    "cli: dashboard --out empty": "latentstore dashboard: error: --out is empty; give a folder for the site (`.` for "
                                  "this one, if that is meant).",
    "cli: info on a path with no store": "latentstore info: error: No latentstore store at",
    "cli: verify on a path with no store": "latentstore verify: error: No latentstore store at",
    "cli: index of an unfinished store":
        "latentstore index: error: {tmp}/unfinished.zarr is still being written (or its extraction stopped part-way): "
        "it holds 0 complete shards, 0 tokens so far. Finish it by rerunning the same `latentstore extract` command, "
        "then index it.",
    "cli: export neuronpedia of an unfinished store": "latentstore export neuronpedia: error: {tmp}/unfinished.zarr is "
                                                       "still being written",
    "cli: export delphi of an unfinished store": "latentstore export delphi: error: {tmp}/unfinished.zarr is still "
                                                 "being written",
    "cli: dashboard of an unfinished store": "then build its dashboard.",
    "cli: export delphi --out inside the store": "shards is inside the zarr store {store}; give a folder outside it",
    "cli: steer --sample at temperature 0": "temperature=0.0 (--temperature): sampling needs a temperature above 0",
    "cli: steer --max-new-tokens 0": "latentstore steer: error: max_new_tokens=0 (--max-new-tokens): give how many "
                                    "tokens to generate, a whole number of at least 1.",
    "cli: steer past the model's context": "tokens and 100000 new ones (max_new_tokens, --max-new-tokens) exceed the "
                                           "model's context of",
    "cli: sweep --prompts that is not UTF-8": "latin1.jsonl: line 1 is not UTF-8 text (invalid continuation byte at "
                                              "byte 15). Save the file as UTF-8.",
    "cli: sweep --prompts that does not exist": "nope.jsonl cannot be read (No such file or directory): give a .jsonl",
    "cli: sweep --prompts whose third line lacks the answer, after a blank line":
        "p.jsonl: line 3 has no text field answer, wrong_answer, which --metric logit_diff needs.",
    "cli: extract with --model but no --sae": "latentstore extract: error: give --sae, --dataset as well, or none of",
    "cli: a --max-tokens that is not a whole number": "'1.5' is not a whole number",
    "cli: info on a chained URL with credentials":
        "latentstore info: error: the store URL simplecache::s3://***@bucket/x.zarr holds credentials",
    "cli: extract to a chained URL with credentials":
        "latentstore extract: error: the store URL simplecache::s3://***@bucket/x.zarr holds credentials",
    "cli: extract of an empty .jsonl file": "empty.jsonl is empty: there is nothing to extract.",
    "cli: extract with --shard-tokens 0": "latentstore extract: error: --shard-tokens must be positive, got 0.",
    "cli: extract with --context-size 1": "latentstore extract: error: --context-size 1 leaves no room for text",
    "cli: extract of a dataset whose every row is empty": "every row of column 'text' is empty text (4 rows)",
    "cli: extract to an empty read-only mount point": "/ro is on a read-only file system. Choose a path on a writable",
    "cli: top of a feature past the end":
        "latentstore top: error: feature 99999 is out of range for blocks.0.hook_resid_post: it has features 0 to 95.",
    "cli: top of feature -1":
        "latentstore top: error: feature -1 is out of range for blocks.0.hook_resid_post: it has features 0 to 95.",
    "cli: top -k -3": "latentstore top: error: k=-3: give how many examples you want, a whole number of at least 1",
    "cli: dashboard --out an existing file": "site.txt is a file; give a folder for the site.",
    "cli: export neuronpedia --out an existing file": "np.txt is a file; give a folder for the Neuronpedia export.",
    "cli: export delphi --out a folder that cannot be made":
        "--out /proc/latentstore-test/cache cannot be made",  # ("... (No such file ...)", or "/proc is not writable")
    "cli: dashboard --serve on port 99999": "argument --port: 99999 is not a port number: give 0 to 65535",
    "cli: dashboard --max-rows -1": "--max-rows -1: give how many dataset rows get a prompt page, 0 or more.",
    "cli: index --workers 0": "--workers 0: give how many tasks build parts at once, at least 1",
    "cli: steer a model TransformerLens does not know":
        "latentstore steer: error: --model 'nosuchmodel' is neither a local model directory nor a TransformerLens",
    "cli: info on a zarr group that is not a latentstore store":
        "other.zarr is not a latentstore store: something else is there (its root has no latentstore attributes)",
    "cli: sweep --ablation nan": "argument --ablation: 'nan': use zero, mean or a finite scale factor such as 0.5",
    "cli: steer --magnitude inf": "argument --magnitude: 'inf' is not a finite number",
    "cli: sweep --features -1:4 (a value argparse takes for a flag)":
        "argument --features: expected one argument (a value that starts with '-' goes after '=', as in "
        "--features=VALUE)",
    "cli: steer a model URL with credentials":
        "latentstore steer: error: --model https://***@h.invalid/m holds credentials (a user name and password). "
        "Remove them from the URL",
    "cli: export neuronpedia --dataset with a token":
        "latentstore export neuronpedia: error: --dataset https://h.invalid/d?token=*** holds credentials",
    "cli: index of a file": "latentstore index: error: {tmp}/notes.txt is a file, not a latentstore store (a store "
                            "is a folder). Give the store's folder.",
    "cli: dashboard --out a folder holding the user's own index.html":
        "holds files that are not a latentstore dashboard (index.html); writing the site there would overwrite them",
}
# Extract cases whose store the case itself made (as a resumable or foreign store) before the refusal.
MADE_BY_THE_CASE = {"extract: store made by another model", "extract: store from a newer format version"}


def test_the_table_is_big_enough():
    areas = {name.split(":")[0] for name in BAD_INPUTS}
    assert len(BAD_INPUTS) >= 20 and areas == {"extract", "query", "sweep", "cli", "dashboard"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(assets, good_store, tmp_path, capsys, case):
    action, error, message = BAD_INPUTS[case]
    if "unfinished store" in case:
        _unfinished(assets, tmp_path)
    good_before = (Path(good_store) / "zarr.json").read_text()
    with pytest.raises(error, match=message):
        action(assets, tmp_path, good_store)
    if case in CLI_STDERR:
        err = capsys.readouterr().err
        assert CLI_STDERR[case].format(tmp=tmp_path, store=good_store) in err and "Traceback" not in err, err
        assert SECRET not in err
    # nothing looks complete that was not, nor is being written: no new store, and the good store is unchanged
    for candidate in (tmp_path / "store.zarr", tmp_path / "x.zarr"):
        if (candidate / "zarr.json").exists():
            attrs = json.loads((candidate / "zarr.json").read_text())["attributes"].get(fmt.ATTRS_KEY, {})
            assert attrs.get("status") != fmt.STATUS_COMPLETE, candidate
            assert case in MADE_BY_THE_CASE or "unfinished store" in case, (case, attrs.get("status"))
    assert (Path(good_store) / "zarr.json").read_text() == good_before


def _unfinished(assets, tmp: Path) -> None:
    from jobs.extract import validate
    from store.writer import StoreWriter

    cfg = config(assets, tmp / "unfinished.zarr")
    StoreWriter(cfg.store.path).begin(validate(cfg).run_metadata(), {"n_shards": 8, "n_rows": 37}, overwrite=False)


def test_stderr_of_a_store_error_names_the_command(good_store, tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentstore info: error: No latentstore store at") and "Traceback" not in err


# -- no secret anywhere, for every URL form the store accepts -----------------------------------


def _url_forms() -> list[str]:
    """Credentials in every form a store URL can carry them: user info and query strings, for every
    protocol fsspec knows, alone and as a link of a chain; and a secret holding a slash."""
    from fsspec.registry import known_implementations

    from store.location import NOT_USERINFO

    forms = []
    for protocol in sorted(known_implementations):
        if protocol not in NOT_USERINFO:
            forms.append(f"{protocol}://AKIAEXAMPLE:{SECRET}@bucket/x.zarr")
        forms.append(f"{protocol}://bucket/x.zarr?token={SECRET}")
    forms += [
        f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/x.zarr",
        f"blockcache::simplecache::gs://AKIAEXAMPLE:{SECRET}@bucket/x.zarr",
        f"filecache::s3://bucket/x.zarr::s3://AKIAEXAMPLE:{SECRET}@other/y",
        f"s3://AKIAEXAMPLE:{SECRET}/with/slashes@bucket/x.zarr",
        f"S3://AKIAEXAMPLE:{SECRET}@bucket/x.zarr",
        f"s3://{SECRET}@bucket/x.zarr",
        f"https://user:{SECRET}@host:8443/x.zarr",
        f"https://host/x.zarr?X-Amz-Algorithm=AWS4&X-Amz-Signature={SECRET}",
        f"https://acct.blob.core.windows.net/c/x.zarr?sv=2024&sig={SECRET}",
        f"gs://bucket/x.zarr?access_token={SECRET}",
        f"simplecache::https://host/x.zarr?password={SECRET}",
        f"sftp://user:{SECRET}@host/x.zarr",
        f"abfs://container:{SECRET}@acct.dfs.core.windows.net/x.zarr",
        f"s3://AKIAEXAMPLE%3A{SECRET}%40bucket/x.zarr",  # percent-escaped
        f"s3://AKIAEXAMPLE:{SECRET}/bucket/x.zarr",  # the @ left out: a bucket name with a ':'
        f"simplecache::gs://AKIAEXAMPLE:{SECRET}/x.zarr",
        f"s3://bucket/x.zarr?to%6Ben={SECRET}",
    ]
    return forms


ENTRY_POINTS = {
    "normalize": lambda url: __import__("store.location", fromlist=["normalize"]).normalize(url),
    "FeatureStore.open": lambda url: FeatureStore.open(url),
    "StoreWriter": lambda url: __import__("store.writer", fromlist=["StoreWriter"]).StoreWriter(url),
    "check_writable": lambda url: __import__("store.location", fromlist=["check_writable"]).check_writable(url),
    "has_content": lambda url: __import__("store.location", fromlist=["has_content"]).has_content(url),
    "read_sweep": lambda url: __import__("store.sweeps", fromlist=["read_sweep"]).read_sweep(url, "s"),
    "verify_store": lambda url: __import__("store.verify", fromlist=["verify_store"]).verify_store(url),
}
COMMANDS = [("info", "{url}"), ("top", "{url}"), ("verify", "{url}"), ("index", "{url}"),
            ("export", "neuronpedia", "{url}", "--hook", HOOK, "--out", "{tmp}/out"),
            ("dashboard", "{url}", "--hook", HOOK, "--out", "{tmp}/site"),
            ("sweep", "--name", "s", "--store", "{url}", "--rows", "0:4"),
            ("steer", "--store", "{url}", "--prompt", "the cat", "--feature", "1", "--magnitude", "2"),
            EXTRACT + ("--store", "{url}")]


def _all_text(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts += [str(error), repr(error), *getattr(error, "__notes__", [])]
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("url", _url_forms())
def test_no_credential_appears_anywhere(assets, url, tmp_path, monkeypatch, capsys, caplog, no_network):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would make its folder here
    secret_parts = [SECRET, "AKIAEXAMPLE"] if "AKIAEXAMPLE" in url else [SECRET]
    from jobs.extract import run_extract
    from jobs.index import run_index
    from jobs.sweep import SweepConfig, run_sweep

    jobs = {"run_extract": lambda url: run_extract(config(assets, url)), "run_index": run_index,
            "run_sweep": lambda url: run_sweep(SweepConfig.build(name="s", store=url, rows=(0, 4), metric="kl"))}
    for name, entry in {**ENTRY_POINTS, **jobs}.items():
        with pytest.raises(ConfigError, match=r"holds credentials") as refused:
            entry(url)
        assert not any(s in _all_text(refused.value) for s in secret_parts), (name, _all_text(refused.value))
    for command in COMMANDS:
        argv = [a.format(url=url, tmp=tmp_path, model=assets["model_dir"], sae=assets["sae_dirs"][HOOK],
                         jsonl=assets["jsonl"]) for a in command]
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert "holds credentials" in out.err and "***" in out.err, (argv, out.err)
        assert not any(s in out.out + out.err for s in secret_parts), (argv, out)
    with pytest.raises(SystemExit, match="2"):  # a URL where argparse wants something else: quoted, masked
        main(["export", url])
    err = capsys.readouterr().err
    assert "invalid choice" in err and not any(s in err for s in secret_parts), err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(s in logged for s in secret_parts), logged
    written = [p for p in tmp_path.rglob("*")]
    assert written == [], written  # no store, no lease, no folder: nothing that could hold it as an attribute


OTHER_URL_COMMANDS = [("export", "neuronpedia", "{tmp}/s.zarr", "--out", "{url}"),
                      ("export", "delphi", "{tmp}/s.zarr", "--out", "{url}"),
                      ("dashboard", "{tmp}/s.zarr", "--out", "{url}"),
                      EXTRACT + ("--store", "{tmp}/x.zarr", "--dataset", "{url}"),
                      EXTRACT + ("--store", "{tmp}/x.zarr", "--model", "{url}"),
                      EXTRACT + ("--store", "{tmp}/x.zarr", "--sae", "{url}")]


@pytest.mark.parametrize("url", _url_forms())
def test_no_credential_from_an_output_dataset_model_or_sae_url(assets, url, tmp_path, monkeypatch, capsys,
                                                                no_network):
    """The other URLs a command takes: where an export or the dashboard is written (--out: local folders
    only, so any URL is refused), and the dataset, model and SAE sources that a store's metadata
    records as given. Each is refused, shown masked, before anything reads it; no folder is named
    after it."""
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would make its folder here
    secret_parts = [SECRET, "AKIAEXAMPLE"] if "AKIAEXAMPLE" in url else [SECRET]
    for command in OTHER_URL_COMMANDS:
        argv = [a.format(url=url, tmp=tmp_path, model=assets["model_dir"], sae=assets["sae_dirs"][HOOK],
                         jsonl=assets["jsonl"]) for a in command]
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        expected = "is a URL, but" if "--out" in command else "holds credentials"
        assert expected in out.err and "***" in out.err, (argv, out.err)
        assert not any(s in out.out + out.err for s in secret_parts), (argv, out)
    named = [p for p in tmp_path.rglob("*") if any(s in str(p) for s in secret_parts)]
    assert named == [], named


@pytest.mark.parametrize("url", ["s3://bucket/model@v2.zarr", "abfs://container@acct.dfs.core.windows.net/x.zarr",
                                 "sftp://user@host/x.zarr", "https://host:8080/runs/a@b.zarr",
                                 "s3://bucket/x.zarr?versionId=3", "github://org:repo@sha/x.zarr",
                                 "simplecache::s3://bucket/x.zarr", "memory://x/y.zarr", "s3://bucket/a%40b.zarr",
                                 "https://host:8080/x.zarr", "memory://a:b/x.zarr"])
def test_urls_without_credentials_are_accepted(url):
    from store.location import normalize

    assert normalize(url) == url


# -- the terminal gets no control character from dataset text ------------------------------------

# Dataset words holding escape sequences and control characters: a colour, a window title, C1 CSI, DEL,
# NUL, tab, carriage return. Split on spaces only, so that each word is one token, control characters and all.
HOSTILE_WORDS = ["\x1b[31mred", "\x1b]0;TITLE\x07", "\x9bcsi\x7f", "nul\x00", "\ttab\rcr", "the", "cat", "sat"]


def _hostile_model(assets, tmp: Path) -> Path:
    """The test model with a tokenizer whose tokens are the hostile words (ids within its vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp / "hostile-model"
    shutil.copytree(assets["model_dir"], path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(HOSTILE_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(str(path))
    return path


def test_top_prints_no_control_character(assets, ray_cluster, tmp_path, capsys):
    """Dataset text holding escape sequences and other control characters, extracted and shown by
    `latentstore top`: shown escaped; the only control character in the output is the newline that
    `latentstore top` prints itself."""
    import random
    import re

    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(HOSTILE_WORDS) for _ in range(12))} for _ in range(12)]
    data = _jsonl(tmp_path, "hostile.jsonl", rows)
    store = str(tmp_path / "hostile.zarr")
    argv = ["extract", "--model", str(_hostile_model(assets, tmp_path)), "--sae", str(assets["sae_dirs"][HOOK]),
            "--dataset", data, "--store", store, "--context-size", "16", "--workers", "1", "--no-progress",
            "--no-index"]
    assert main(argv) == 0
    capsys.readouterr()
    fs = FeatureStore.open(store)
    busy = [int(f) for f in fs.feature_stats(HOOK)["count"].nlargest(4).index]
    argv = ["top", store, "-k", "8", "--include-special-tokens"] + [a for f in busy for a in ("--feature", str(f))]
    assert main(argv) == 0
    assert main(["top", store]) == 0  # the features it picks itself
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[31mred" in out and "\\x1b]0;TITLE\\x07" in out and "\\x9bcsi\\x7f" in out, out
    assert re.findall(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", out) == []


def test_terminal_text_escapes_every_control_character():
    from jobs.cli import terminal_text

    controls = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
    shown = terminal_text(controls)
    assert all(not (c < " " or "\x7f" <= c <= "\x9f") for c in shown) and shown.count("⏎") == 1
    assert terminal_text("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
    assert terminal_text("plain «text» é 中") == "plain «text» é 中"
    # Trojan-source bidi controls and invisible characters are shown; joiners, which scripts need, stay
    assert terminal_text("abc\u202edef\u2066\u200b\ufeff") == "abc\\u202edef\\u2066\\u200b\\ufeff"
    assert terminal_text("क्\u200dष") == "क्\u200dष"


def test_info_escapes_each_value_so_a_newline_in_a_name_starts_no_line():
    from jobs.cli import format_info

    info = {"location": "s.zarr", "status": "complete", "format_version": "2.1", "model": "m\nfake line",
            "dataset": "d\x1b[32m", "split": None, "context_size": 8, "prepend_bos": True,
            "value_dtype": "bfloat16", "n_tokens": 10, "n_shards": 1,
            "saes": [{"name": "a\u202eb", "architecture": "standard", "d_sae": 4, "nnz": 3, "mean_l0": 0.3,
                      "hook": "blocks.0.hook_resid_post", "source": "dir\rx"}]}
    lines = format_info(info).split("\n")
    assert lines[1:3] == ["model        m⏎fake line", "dataset      d\\x1b[32m"]
    assert lines[-3].startswith("  a\\u202eb ") and lines[-2:] == ["    hook blocks.0.hook_resid_post",
                                                                   "    from dir\\rx"]


# -- the disk fills up mid-shard: a clear error, and a rerun resumes once there is room --------------


def test_disk_full_mid_shard_then_resume(assets, ray_cluster, good_store, tmp_path, capsys):
    """A real file system that fills up while workers write shards (a tmpfs too small for the store)."""
    disk = Path(_mount(tmp_path, "disk", "size=512k"))  # room for the first shard (~360k), not the second
    store = disk / "runs" / "full.zarr"
    argv = [a.format(model=assets["model_dir"], sae=assets["sae_dirs"][HOOK], jsonl=assets["jsonl"]) for a in EXTRACT]
    argv += [*SMALL_SHARDS, "--store", str(store)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"latentstore extract: error: cannot write the store: no space left on the device for {store} " \
           f"(the file system mounted at {disk}, " in err, err
    assert "rerun the same command: it resumes, keeping every complete shard" in err and "Traceback" not in err
    assert "  (while writing shard " in err  # in a worker, mid-shard
    partial = FeatureStore.open(str(store))
    assert not partial.complete  # a store being written, as after any interruption: a rerun resumes it
    kept = [s.shard_id for s in partial.shards]
    assert kept, "the disk filled up before any shard was complete: give the tmpfs more room"

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert main(argv) == 0
    fs = FeatureStore.open(str(store))
    assert fs.complete and [s.shard_id for s in fs.shards][: len(kept)] == kept
    from store.verify import verify_store

    assert verify_store(str(store)).ok


def test_top_of_a_store_being_written_says_so(good_store, tmp_path, capsys):
    """`top` may look at a store while its run goes (or after it stopped part-way), but says that what
    it prints comes from the shards written so far; exports and the dashboard refuse (the table)."""
    store = _copy(good_store, tmp_path)
    root = Path(store) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"][fmt.ATTRS_KEY]["status"] = fmt.STATUS_WRITING  # as a killed run leaves it
    root.write_text(json.dumps(meta))
    fs = FeatureStore.open(store)
    assert not fs.complete and len(fs.shards) >= 1
    assert main(["top", store, "--hook", HOOK, "--feature", "1", "-k", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == (f"note: {store} is still being written (or its extraction stopped part-way): these come from its "
                   f"{len(fs.shards)} complete shards, {fs.n_tokens:,} tokens so far.\n")
    assert "feature 1" in out


def test_a_broken_dataset_file_is_reported_once(assets, tmp_path):
    """The datasets library logs its own error for a file it cannot parse, which latentstore reports in
    its own words: the user sees that one line, not the library's twice before it (a fresh process:
    under pytest, logging goes to pytest's handlers)."""
    bad = _file(tmp_path, "bad.jsonl", b'{"text": "a b c"}\n{bad json\n')
    argv = [a.format(model=assets["model_dir"], sae=assets["sae_dirs"][HOOK], jsonl=bad) for a in EXTRACT]
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *argv, "--store", str(tmp_path / "x.zarr")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = done.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(f"latentstore extract: error: --dataset {bad} could not be read as "
                                               "json (ArrowInvalid: JSON parse error:"), err


def test_the_lines_that_name_the_output_folder_escape_it(good_store, tmp_path, capsys):
    """A --out holding an escape sequence is shown escaped where the commands say what they wrote."""
    out = tmp_path / "bad\x1b[31mname"
    assert main(["export", "delphi", good_store, "--out", str(out), "--sae", HOOK]) == 0
    assert main(["export", "neuronpedia", good_store, "--sae", HOOK, "--out", str(out / "np"), "--no-logits",
                 "--features", "0:2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"to {tmp_path}/bad\\x1b[31mname/{HOOK}" in printed and f"to {tmp_path}/bad\\x1b[31mname/np" in printed
    assert "\x1b" not in printed
