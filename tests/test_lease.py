"""The writer lease (store/lease.py): one writing run per store, on local paths and on S3 (moto on
loopback). Writers race as real processes started together: exactly one proceeds, the others are
refused with a message naming the holder. `--overwrite`, `index` and `sweep` are refused while
another run holds the lease, before anything is read or written. A lease left by a killed driver,
or one whose heartbeat expired, is taken over.

Run as ``python -m tests.test_lease LOCATION COMMAND GO_FILE``, this module is a writer that takes
the lease once ``GO_FILE`` exists and holds it until killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from store.errors import ConfigError, StoreLockedError
from store.lease import LEASE_ENCODING, StoreLease, hold_lease, lease_path, read_lease
from tests.s3_server import s3  # noqa: F401  (the fixture, for the S3 cases)

REPO = Path(__file__).parent.parent
HOST = re.escape(socket.gethostname())


def held_by(command: str, pid: int) -> str:
    """The start of the refusal message for a lease held by ``command`` as ``pid`` on this host."""
    return (rf"is in use by another run: `{re.escape(command)}` \(pid {pid} on {HOST}\) has held it since "
            r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00 \(last heartbeat \d+ s ago\)")


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run.zarr")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from tests.s3_server import BUCKET

    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/run.zarr"


class Writer:
    """A writer in its own process (this module's ``__main__``) that takes the lease on ``go``."""

    def __init__(self, location: str, command: str, go: Path | None = None):
        self.command = command
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_lease", location, command, str(go or "-")],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout.readline().strip() == "ready"

    def outcome(self) -> str:
        """'won', or 'refused <message>'."""
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def plant(location: str, **fields) -> dict:
    """A lease as another run would have written it; ``fields`` override a fresh one from another host."""
    import fsspec

    now = time.time()
    record = {"encoding-type": LEASE_ENCODING, "encoding-version": "1.2", "token": uuid.uuid4().hex,
              "command": "latentstore extract", "host": "gpu-node-7", "boot_id": "elsewhere", "pid_namespace": 1,
              "pid": 4242, "started_at": _iso(now - 3600), "renewed_at": _iso(now), "ttl_s": 60.0, **fields}
    path = lease_path(location)
    if "://" not in path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fsspec.open(path, "wb") as f:
        f.write(json.dumps(record).encode())
    return record


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


# -- racing writers ---------------------------------------------------------------------------------


def test_writers_started_together_exactly_one_proceeds(location, tmp_path):
    go = tmp_path / "go"
    writers = [Writer(location, f"latentstore extract #{i}", go) for i in range(3)]
    try:
        go.touch()  # all three are waiting: they take the lease at the same moment
        outcomes = [w.outcome() for w in writers]
        winners = [w for w, o in zip(writers, outcomes) if o == "won"]
        assert len(winners) == 1, outcomes
        (winner,) = winners
        for o in outcomes:
            if o != "won":
                assert o.startswith("refused store ")
                assert re.search(held_by(winner.command, winner.proc.pid), o), o
        # and a writer that comes later is refused the same way, with the fix in the message
        with pytest.raises(StoreLockedError, match=held_by(winner.command, winner.proc.pid) +
                           r".*Wait for that run to end.*stop it \(kill \d+\)"):
            StoreLease(location, "latentstore extract").acquire()
    finally:
        for w in writers:
            w.kill()


def test_threads_racing_in_one_process_exactly_one_wins(location):
    n, won, refused = 8, [], []
    barrier = threading.Barrier(n)

    def racer(i: int) -> None:
        lease = StoreLease(location, f"racer {i}")
        barrier.wait()
        try:
            won.append(lease.acquire())
        except StoreLockedError as e:
            refused.append(e)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == n - 1
        assert all(re.search(held_by(won[0].command, os.getpid()), str(e)) for e in refused)
        assert read_lease(location)["token"] == won[0].token
    finally:
        for lease in won:
            lease.release()
    assert read_lease(location) is None


# -- stale leases -----------------------------------------------------------------------------------


def test_lease_of_a_killed_driver_is_taken_over(location, caplog):
    driver = Writer(location, "latentstore extract")
    assert driver.outcome() == "won"
    with pytest.raises(StoreLockedError, match=held_by("latentstore extract", driver.proc.pid)):
        StoreLease(location, "latentstore extract").acquire()
    driver.kill()  # SIGKILL: no chance to give the lease back
    assert read_lease(location)["pid"] == driver.proc.pid
    with hold_lease(location, "latentstore extract") as lease:
        assert read_lease(location)["token"] == lease.token
    assert f"its process {driver.proc.pid} is no longer running on this machine" in caplog.text
    assert read_lease(location) is None


def test_expired_heartbeat_is_taken_over_and_a_fresh_one_from_another_host_is_not(location):
    plant(location, renewed_at=_iso(time.time() - 10))
    with pytest.raises(StoreLockedError, match=r"\(pid 4242 on gpu-node-7\) has held it since .* If that run is "
                                               r"dead, its lease expires 60 s after its last heartbeat, at "
                                               r"\S+ \(in 5\d s\); run this command again then"):
        StoreLease(location, "latentstore index").acquire()
    plant(location, renewed_at=_iso(time.time() - 61))
    with hold_lease(location, "latentstore index") as lease:
        assert read_lease(location)["token"] == lease.token
    assert read_lease(location) is None


def test_unreadable_lease_is_taken_over(tmp_path):
    location = str(tmp_path / "run.zarr")
    Path(lease_path(location)).write_text("{not json")
    with hold_lease(location, "latentstore extract") as lease:
        assert read_lease(location)["token"] == lease.token


# -- holding ----------------------------------------------------------------------------------------


def test_heartbeat_renews_and_a_lost_lease_stops_the_run(location):
    with hold_lease(location, "latentstore extract", ttl_s=0.6) as lease:
        first = read_lease(location)["renewed_at"]
        deadline = time.time() + 5
        while read_lease(location)["renewed_at"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert read_lease(location)["renewed_at"] > first
        lease.check()
        other = plant(location)  # another run took it over (as if this one had stalled past its TTL)
        while lease.lost is None and time.time() < deadline + 5:
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match=r"lost its writer lease on .*pid 4242 on gpu-node-7 holds it now"):
            lease.check()
    assert read_lease(location)["token"] == other["token"]  # not deleted: it is the other run's


def test_reentrant_in_one_thread_refused_from_another(location):
    with hold_lease(location, "latentstore extract") as outer:
        with hold_lease(location, "latentstore index") as inner:  # extract building its index
            assert inner is outer
        assert read_lease(location)["token"] == outer.token  # the inner exit did not release it
        refused = []
        thread = threading.Thread(target=lambda: _try(location, refused))
        thread.start()
        thread.join()
        assert re.search(held_by("latentstore extract", os.getpid()), str(refused[0]))
    assert read_lease(location) is None


def _try(location, refused):
    try:
        with hold_lease(location, "latentstore sweep s"):
            pass
    except StoreLockedError as e:
        refused.append(e)


def test_released_on_error(location):
    with pytest.raises(RuntimeError, match="boom"):
        with hold_lease(location, "latentstore extract"):
            assert read_lease(location) is not None
            raise RuntimeError("boom")
    assert read_lease(location) is None


def test_lease_lives_beside_the_store_not_in_it(tmp_path):
    from store.location import has_content
    from store.writer import StoreWriter

    location = str(tmp_path / "new" / "run.zarr")
    assert lease_path(location) == location + ".lease.json"
    with hold_lease(location, "latentstore extract"):
        assert not has_content(location)  # a new store is still new
        assert StoreWriter(location).begin({"x": 1}, {"n_shards": 0}, overwrite=False) == {}
        assert sorted(os.listdir(location)) == ["shards", "zarr.json"]
    assert sorted(os.listdir(tmp_path / "new")) == ["run.zarr"]
    with pytest.raises(ConfigError, match=r"root of a bucket.*s3://bucket/run.zarr"):
        lease_path("s3://bucket")


def test_a_folder_that_cannot_hold_the_lease_is_refused_clearly(tmp_path, monkeypatch):
    import errno

    from store import lease as lease_mod
    from store.errors import StoreWriteError

    def refuse(self, data):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lease_mod._LocalObject, "_write_temporary", refuse)
    location = str(tmp_path / "run.zarr")
    with pytest.raises(StoreWriteError, match=r"cannot write its writer lease .*run\.zarr\.lease\.json \(Read-only "
                                              r"file system\)\. .* the folder that holds it, .*, must be writable too"):
        StoreLease(location, "latentstore extract").acquire()


# -- the commands -----------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_store(tmp_path) -> Path:
    from store.writer import StoreWriter

    path = tmp_path / "held.zarr"
    run = {"model": {"name": "m"}, "dataset": {"name": "d"}, "context_size": 4, "prepend_bos": False,
           "value_dtype": "float32", "saes": [{"hook": "h", "d_sae": 8, "source": "s", "architecture": "standard"}]}
    StoreWriter(str(path)).begin(run, {"n_shards": 0}, overwrite=False)
    return path


def test_overwrite_index_and_sweep_are_refused_while_another_run_holds_the_store(assets, small_store, tmp_path):
    from jobs.extract import run_extract
    from jobs.index import run_index
    from jobs.sweep import SweepConfig, run_sweep
    from tests.stores import config

    before = _snapshot(small_store)
    holder = Writer(str(small_store), "latentstore extract")
    try:
        assert holder.outcome() == "won"
        message = held_by("latentstore extract", holder.proc.pid)
        with pytest.raises(StoreLockedError, match=message):
            run_extract(config(assets, small_store, overwrite=True))
        with pytest.raises(StoreLockedError, match=message):
            run_index(str(small_store))
        with pytest.raises(StoreLockedError, match=message):
            run_sweep(SweepConfig.build(name="s", store=str(small_store), rows=(0, 4), metric="loss"))
    finally:
        holder.kill()
    assert _snapshot(small_store) == before  # untouched


def test_cli_extract_overwrite_is_refused_before_any_work(assets, small_store):
    before = _snapshot(small_store)
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--model", str(assets["model_dir"]),
            "--sae", str(next(iter(assets["sae_dirs"].values()))), "--dataset", str(assets["jsonl"]),
            "--store", str(small_store), "--overwrite", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with hold_lease(str(small_store), "latentstore sweep other") as lease:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert read_lease(str(small_store))["token"] == lease.token
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"latentstore extract: error: store \S+held.zarr " + held_by("latentstore sweep other", os.getpid()),
                     done.stderr), done.stderr[-3000:]
    assert _snapshot(small_store) == before


def test_a_failed_run_gives_the_lease_back_and_leaves_nothing(assets, tmp_path):
    from jobs.extract import run_extract
    from tests.stores import config

    store = tmp_path / "missing" / "run.zarr"
    with pytest.raises(ConfigError, match=r"ExtractConfig\.dataset\.context_size must be positive"):
        run_extract(config(assets, store, context_size=0))
    assert read_lease(str(store)) is None
    assert not (tmp_path / "missing").exists()  # the folder made for the lease went with it


@pytest.mark.ray
def test_two_identical_extractions_one_runs_the_other_is_refused(assets, ray_cluster, tmp_path):
    """The first user report: two identical `latentstore extract` runs started together. One writes
    the store (and its index, under the same lease), the other is refused before any work."""
    from jobs.extract import run_extract
    from store import FeatureStore
    from tests.stores import config

    store = tmp_path / "twice.zarr"
    cfg = config(assets, store, saes=(str(next(iter(assets["sae_dirs"].values()))),), max_tokens=60)
    outcomes = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        try:
            outcomes[name] = run_extract(cfg)
        except StoreLockedError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes.values() if isinstance(o, StoreLockedError)]
    counts = [o for o in outcomes.values() if isinstance(o, dict)]
    assert len(refused) == 1 and len(counts) == 1, outcomes
    with pytest.raises(StoreLockedError, match=held_by("latentstore extract", os.getpid())):
        raise refused[0]
    fs = FeatureStore.open(str(store))
    assert fs.complete and fs.n_tokens == counts[0]["n_tokens"] == 60
    assert all(fs.index(hook) is not None for hook in fs.hooks)
    assert read_lease(str(store)) is None  # given back at the end


# -- a writer in its own process --------------------------------------------------------------------


def _hold(location: str, command: str, go: str) -> None:
    print("ready", flush=True)
    while go != "-" and not os.path.exists(go):
        time.sleep(0.002)
    try:
        with hold_lease(location, command):
            print("won", flush=True)
            time.sleep(600)
    except StoreLockedError as e:
        print("refused " + str(e).replace("\n", " "), flush=True)


if __name__ == "__main__":
    _hold(*sys.argv[1:4])
