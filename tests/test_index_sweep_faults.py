"""Faults in the index build and in sweeps, on the session's real Ray cluster.

For each job: workers SIGKILLed in the middle of their work, and the driver SIGKILLed part-way
and the same command run again. Each ends with a result equal to an uninterrupted run's. Readers
that open the store meanwhile see no index (queries scan the shards) or a complete one, answering
as brute force does; and of a sweep, only complete parts.

The faults come from tests/fault_injection.py: a targeted part stops for good either before its
completion marker (a torn part) or after it (a finished part whose worker dies before returning),
and says which process holds it. Each sweep worker started imports sae_lens (seconds of CPU), so
the sweeps have one worker, killed once; tests/test_sweep_job.py checks without Ray that a worker
given a finished part again keeps it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import jobs.sweep
import store.index
from conftest import WORDS
from jobs.index import run_index
from jobs.sweep import SweepConfig, run_sweep
from store import FeatureStore
from store import format as fmt
from store.errors import StoreIncompleteError, StoreNotFoundError
from store.sweeps import read_sweep
from tests import fault_injection
from tests.fault_injection import calls, fault_dir
from tests.test_store_format import write_synthetic_complete

pytestmark = pytest.mark.ray

REPO = Path(__file__).parent.parent
HOOK = "blocks.0.hook_resid_post"
INDEX_WORKERS = 3  # index tasks at once, and parts of the one SAE


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A complete store without an index: one SAE's activations (random, over six shards) written
    through the store's API, with its merged statistics. The index build does not care where
    activations come from, and this needs no model."""
    path = tmp_path_factory.mktemp("faults") / "plain.zarr"
    write_synthetic_complete(path, [sp.random(40, 64, density=0.3, format="csr", random_state=i, dtype=np.float32)
                                    for i in range(6)])
    return path


def copy_store(plain: Path, path: Path) -> Path:
    shutil.copytree(plain, path)
    return path


def plan(directory: Path, before: list[str], after: list[str]) -> Path:
    directory.mkdir(parents=True)
    (directory / "plan.json").write_text(json.dumps({"stall_before_marker": before, "stall_after_marker": after}))
    return directory


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


POLL_S = 0.5  # between a reader's views: each costs CPU that the workers, on two cores, need more


def wait_for(condition, timeout: float, what: str, poll=None, running=None) -> None:
    """Until ``condition()``; ``poll()`` runs meanwhile; ``running()`` raises if the job ended early."""
    deadline, polled = time.time() + timeout, 0.0
    while not condition():
        if running is not None:
            running()
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if poll is not None and time.time() > polled + POLL_S:
            poll()
            polled = time.time()
        time.sleep(0.1)


def wait_for_stalls(faults: Path, targets: list[str], timeout: float, poll=None, running=None) -> dict[str, int]:
    """The pid holding each target, once every target has stalled."""
    flags = {t: fault_injection.Fault(faults).flag(t) for t in targets}
    wait_for(lambda: all(f.exists() for f in flags.values()), timeout, f"stalls at {targets}", poll, running)
    return {t: json.loads(f.read_text())["pid"] for t, f in flags.items()}


class Background:
    """A job run in a thread of this process, which is then its driver."""

    def __init__(self, function, *args, **kwargs):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, function, args, kwargs) -> None:
        try:
            function(*args, **kwargs)
        except BaseException as e:  # handed to the test by running() and join()
            self.error = e

    def running(self) -> None:
        if not self.thread.is_alive():
            raise AssertionError(f"the job ended early: {self.error!r}")

    def join(self, timeout: float, poll=None) -> None:
        wait_for(lambda: not self.thread.is_alive(), timeout, "the job to finish", poll)
        if self.error is not None:
            raise self.error


class Driver:
    """A driver in its own process, joined to the session's cluster, for the test to kill."""

    def __init__(self, ray_cluster, log: Path, *args: str):
        env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_injection", *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the driver exited early:\n{self.log.read_text()[-4000:]}")

    def kill(self, stalled: dict[str, int]) -> None:
        """SIGKILL, then wait until Ray has ended the dead driver's workers, the stalled ones too:
        none of them may write beside the rerun."""
        self.proc.kill()
        self.proc.wait()
        wait_for(lambda: not any(alive(pid) for pid in stalled.values()), 60, "Ray to end the dead driver's workers")


@pytest.fixture
def start_driver(ray_cluster, tmp_path):
    """Starts drivers; one that a failing test left running is killed, and so is any worker still
    stalled, rather than hold the session's cluster."""
    drivers = []

    def start(*args: str) -> Driver:
        drivers.append(Driver(ray_cluster, tmp_path / f"driver-{len(drivers)}.log", *args))
        return drivers[-1]

    yield start
    for driver in drivers:
        if driver.proc.poll() is None:
            driver.proc.kill()
            driver.proc.wait()
    stalled_workers(tmp_path)


@pytest.fixture(autouse=True)
def no_stalled_worker_outlives_its_test(tmp_path):
    yield
    stalled_workers(tmp_path)


def stalled_workers(tmp_path: Path) -> None:
    """SIGKILL the Ray workers that this test's faults stalled, if any is still there."""
    for flag in tmp_path.glob("*.faults/*/stalled-*.json"):
        pid = json.loads(flag.read_text())["pid"]
        try:
            ours = Path(f"/proc/{pid}/cmdline").read_text().startswith("ray::")  # a Ray worker, not a reused pid
        except FileNotFoundError:
            continue
        if ours and alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- the index ----------------------------------------------------------------------------------


def index_contents(path: Path) -> dict:
    """All that a complete index holds, by path: each SAE's pointers and parts, every part's arrays
    and checksums."""
    root = zarr.open_group(str(path / fmt.INDEX_GROUP), mode="r")
    out = {}
    for hook in sorted(root.group_keys()):
        attrs = root[hook].attrs[fmt.ATTRS_KEY]
        assert attrs["complete"]
        out[f"{hook}/parts"] = attrs["parts"]
        out[f"{hook}/indptr"] = root[hook][fmt.INDPTR][:]
        for part_id, _, _ in attrs["parts"]:
            part = root[f"{hook}/{fmt.PARTS_GROUP}/{part_id}"]
            out[f"{hook}/{part_id}/checksums"] = part[fmt.MARKER_GROUP].attrs[fmt.ATTRS_KEY]["chunk_checksums"]
            for name in ("token", fmt.VALUES):
                out[f"{hook}/{part_id}/{name}"] = part[name][:]
    return out


def assert_same_index(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


@pytest.fixture(scope="module")
def fresh_index(plain, ray_cluster, tmp_path_factory) -> dict:
    path = copy_store(plain, tmp_path_factory.mktemp("fresh") / "fresh.zarr")
    run_index(str(path), workers=INDEX_WORKERS, min_parts=INDEX_WORKERS, progress=False)
    contents = index_contents(path)
    assert len(contents["h/parts"]) == INDEX_WORKERS
    return contents


class IndexViews:
    """Opens the store again and again while its index is built. Every view has no index or a
    complete one, and a query reads each of the busiest features as brute force does."""

    def __init__(self, path: Path, plain: Path):
        self.path, self.views, self.seen = path, 0, set()
        csc = FeatureStore.open(str(plain)).csr("h").tocsc()
        self.expected = {}
        for feature in np.argsort(-np.diff(csc.indptr), kind="stable")[:4]:
            column = slice(csc.indptr[feature], csc.indptr[feature + 1])
            self.expected[int(feature)] = csc.indices[column], csc.data[column]

    def __call__(self) -> None:
        fs = FeatureStore.open(str(self.path))
        self.seen.add(fs.index("h") is not None)
        for feature, (tokens, values) in self.expected.items():
            got = fs.feature_activations("h", feature)
            np.testing.assert_array_equal(got["token_index"], tokens)
            np.testing.assert_array_equal(got["activation"], values)
        self.views += 1


def part_dir(path: Path, part_id: int) -> Path:
    return path / fmt.INDEX_GROUP / "h" / fmt.PARTS_GROUP / str(part_id)


def test_index_worker_killed_mid_part(plain, fresh_index, tmp_path, monkeypatch):
    """Two index tasks' workers SIGKILLed: one with its part torn (arrays written, no marker), one
    with its part complete but not yet reported. The build finishes by itself, redoes only the torn
    part, and equals a fresh build; a reader meanwhile never sees a partial index."""
    path = copy_store(plain, tmp_path / "kill.zarr")
    faults = plan(fault_dir(str(path), "index"), before=["h/1"], after=["h/2"])
    monkeypatch.setattr(store.index, "build_part", fault_injection.build_part)
    views = IndexViews(path, plain)
    job = Background(run_index, str(path), workers=INDEX_WORKERS, min_parts=INDEX_WORKERS, progress=False)
    stalled = wait_for_stalls(faults, ["h/1", "h/2"], 120, views, job.running)

    assert (part_dir(path, 1) / "token").exists() and (part_dir(path, 1) / fmt.VALUES).exists()
    assert not (part_dir(path, 1) / fmt.MARKER_GROUP).exists()
    finished_marker = part_dir(path, 2) / fmt.MARKER_GROUP / "zarr.json"
    written = finished_marker.stat().st_mtime_ns
    views()
    assert views.seen == {False}  # no index yet: queries scanned the shards
    for pid in stalled.values():
        os.kill(pid, signal.SIGKILL)
    job.join(120, poll=views)
    views()

    assert views.seen == {False, True}
    assert_same_index(index_contents(path), fresh_index)
    assert finished_marker.stat().st_mtime_ns == written  # its retry kept the finished part
    log = calls(faults)
    assert Counter(c["target"] for c in log) == {"h/0": 1, "h/1": 2, "h/2": 2}
    retry = [c for c in log if c["target"] == "h/1"][1]
    assert retry["pid"] != stalled["h/1"]


def test_index_driver_killed_then_rerun_resumes(plain, fresh_index, start_driver, tmp_path, monkeypatch):
    """`latentstore index` killed with one part torn and one finished but unreported: the rerun
    builds only the torn part, keeps the others, and the index equals a fresh build."""
    path = copy_store(plain, tmp_path / "driver.zarr")
    faults = plan(fault_dir(str(path), "index"), before=["h/0"], after=["h/1"])
    driver = start_driver("index", str(path), str(INDEX_WORKERS))
    stalled = wait_for_stalls(faults, ["h/0", "h/1"], 120, running=driver.running)
    markers = {i: part_dir(path, i) / fmt.MARKER_GROUP / "zarr.json" for i in (1, 2)}
    wait_for(lambda: all(m.exists() for m in markers.values()), 60, "the other parts", running=driver.running)
    written = {i: m.stat().st_mtime_ns for i, m in markers.items()}
    driver.kill(stalled)

    assert FeatureStore.open(str(path)).index("h") is None
    n_calls = len(calls(faults))
    monkeypatch.setattr(store.index, "build_part", fault_injection.build_part)
    run_index(str(path), workers=INDEX_WORKERS, min_parts=INDEX_WORKERS, progress=False)

    assert [c["target"] for c in calls(faults)[n_calls:]] == ["h/0"]
    assert {i: m.stat().st_mtime_ns for i, m in markers.items()} == written
    assert_same_index(index_contents(path), fresh_index)


# -- sweeps -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_spec(assets, tmp_path_factory) -> dict:
    """A sweep of six prompts from a file, in parts of 3 prompts by 24 features, by one worker."""
    rng = random.Random(4)
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))})
                               + "\n" for _ in range(6)))
    return dict(prompts=str(prompts), model=str(assets["model_dir"]), sae=str(assets["sae_dirs"][HOOK]), metric="kl",
                prompts_per_part=3, features_per_part=24, workers=1, cpus_per_worker=1, progress=False)


def sweep_config(sweep_spec: dict, path: Path) -> SweepConfig:
    return SweepConfig.build(name="faults", store=str(path), **sweep_spec)


@pytest.fixture(scope="module")
def sweep_reference(sweep_spec, ray_cluster, tmp_path_factory):
    """An uninterrupted sweep."""
    path = tmp_path_factory.mktemp("reference") / "sweeps.zarr"
    counts = run_sweep(sweep_config(sweep_spec, path))
    assert counts["n_parts"] >= 4 and counts["n_lines"] == 6 * counts["n_features"]
    return read_sweep(str(path), "faults")


def part_of(frame, features: np.ndarray, spec: dict) -> np.ndarray:
    """Which part computed each line: prompt block, then feature block (as jobs.sweep plans them)."""
    n_feature_blocks = -(-len(features) // spec["features_per_part"])
    feature_block = np.searchsorted(features, frame["feature"].to_numpy()) // spec["features_per_part"]
    return frame["prompt"].to_numpy() // spec["prompts_per_part"] * n_feature_blocks + feature_block


class SweepViews:
    """Reads the sweep again and again while it runs. It is refused as incomplete until it is
    complete; read part by part, it shows whole parts only, each line equal to the reference's."""

    def __init__(self, path: Path, reference, spec: dict):
        self.path, self.reference, self.spec, self.views = str(path), reference, spec, 0
        self.features = np.unique(reference["feature"].to_numpy())
        self.lines_per_part = Counter(part_of(reference, self.features, spec))
        self.shown: set[int] = set()

    def __call__(self) -> None:
        try:
            frame = read_sweep(self.path, "faults")
        except StoreNotFoundError:  # not begun yet
            return
        except StoreIncompleteError:
            frame = read_sweep(self.path, "faults", allow_incomplete=True)
        self.views += 1
        shown = Counter(part_of(frame, self.features, self.spec))
        assert all(n == self.lines_per_part[part] for part, n in shown.items()), shown
        self.shown = set(shown)
        merged = frame.merge(self.reference, on=["prompt", "feature"], suffixes=("", "_ref"), validate="1:1")
        assert len(merged) == len(frame)
        for column in ("delta", "method"):
            np.testing.assert_array_equal(merged[column], merged[f"{column}_ref"])


def assert_same_sweep(frame, reference) -> None:
    assert list(frame.columns) == list(reference.columns)
    for column in frame.columns:
        np.testing.assert_array_equal(frame[column].to_numpy(), reference[column].to_numpy(), err_msg=column)
    assert frame.attrs["sweep"] == reference.attrs["sweep"]


def sweep_part_dir(path: Path, part_id: int) -> Path:
    return path / "sweeps" / "faults" / "parts" / f"{part_id:06d}"


def test_sweep_worker_killed_mid_part(sweep_spec, sweep_reference, tmp_path, monkeypatch):
    """The sweep's worker SIGKILLed with its second part torn (columns written, no marker). Ray
    restarts it; the sweep finishes by itself, redoes only the torn part, and equals an
    uninterrupted sweep; a reader meanwhile sees only complete parts."""
    path = tmp_path / "sweeps.zarr"
    faults = plan(fault_dir(str(path), "sweep-faults"), before=["1"], after=[])
    monkeypatch.setattr(jobs.sweep, "SweepWorker", fault_injection.sweep_worker_class())
    views = SweepViews(path, sweep_reference, sweep_spec)
    job = Background(run_sweep, sweep_config(sweep_spec, path))
    stalled = wait_for_stalls(faults, ["1"], 120, views, job.running)

    torn = sweep_part_dir(path, 1)
    assert (torn / "delta").exists() and not (torn / fmt.MARKER_GROUP).exists()
    kept_marker = sweep_part_dir(path, 0) / fmt.MARKER_GROUP / "zarr.json"
    written = kept_marker.stat().st_mtime_ns
    views()
    assert views.shown == {0}
    with pytest.raises(StoreIncompleteError, match=r"not complete \(1 of \d+ parts written\)"):
        read_sweep(str(path), "faults")
    os.kill(stalled["1"], signal.SIGKILL)
    job.join(180, poll=views)

    assert_same_sweep(read_sweep(str(path), "faults"), sweep_reference)
    assert kept_marker.stat().st_mtime_ns == written
    log = calls(faults)
    n_parts = len(views.lines_per_part)
    assert [c["target"] for c in log] == ["0", "1", *map(str, range(1, n_parts))]
    assert log[2]["pid"] != stalled["1"]  # redone by the restarted worker


def test_sweep_driver_killed_then_rerun_resumes(sweep_spec, sweep_reference, start_driver, tmp_path, monkeypatch):
    """`latentstore sweep` killed with its second part torn: the sweep stays incomplete; the same
    command run again computes only the missing parts and equals an uninterrupted sweep."""
    path = tmp_path / "sweeps.zarr"
    cfg = sweep_config(sweep_spec, path)
    faults = plan(fault_dir(str(path), "sweep-faults"), before=["1"], after=[])
    (tmp_path / "sweep.json").write_text(json.dumps(asdict(cfg)))
    views = SweepViews(path, sweep_reference, sweep_spec)
    driver = start_driver("sweep", str(tmp_path / "sweep.json"))
    stalled = wait_for_stalls(faults, ["1"], 120, views, driver.running)
    kept_marker = sweep_part_dir(path, 0) / fmt.MARKER_GROUP / "zarr.json"
    written = kept_marker.stat().st_mtime_ns
    driver.kill(stalled)

    views()
    assert views.shown == {0}
    with pytest.raises(StoreIncompleteError, match="Run the same `latentstore sweep` command again"):
        read_sweep(str(path), "faults")
    n_calls = len(calls(faults))
    monkeypatch.setattr(jobs.sweep, "SweepWorker", fault_injection.sweep_worker_class())
    run_sweep(cfg)

    n_parts = len(views.lines_per_part)
    assert [int(c["target"]) for c in calls(faults)[n_calls:]] == list(range(1, n_parts))
    assert kept_marker.stat().st_mtime_ns == written
    assert_same_sweep(read_sweep(str(path), "faults"), sweep_reference)
