"""Sizing workers from what the cluster offers."""

from __future__ import annotations

import pytest

from jobs.ray_session import worker_resources
from store.errors import ConfigError


class Cluster:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_one_gpu_per_worker_when_the_cluster_has_gpus():
    r = worker_resources(Cluster(CPU=16, GPU=4), None, None)
    assert (r.n_workers, r.use_gpu, r.options, r.n_threads) == (4, True, {"num_gpus": 1, "num_cpus": 1}, None)


def test_cpu_workers_reserve_the_cores_less_one_and_run_torch_on_all_of_them():
    r = worker_resources(Cluster(CPU=9), 2, None)
    assert (r.n_workers, r.use_gpu, r.options, r.n_threads) == (2, False, {"num_cpus": 4.0}, 4)
    r = worker_resources(Cluster(CPU=2), None, None)  # the quick start on a 2-core machine
    assert (r.n_workers, r.options, r.n_threads) == (1, {"num_cpus": 1.0}, 2)
    assert worker_resources(Cluster(CPU=16), 3, None).n_threads == 5
    assert worker_resources(Cluster(CPU=16), 2, 3.5).n_threads == 3  # --cpus-per-worker: as asked
    assert worker_resources(Cluster(CPU=16), 2, 3.5).cores == 3  # a CPU worker's cores are its threads


def test_gpu_on_a_cluster_scaling_from_zero_needs_a_worker_count():
    with pytest.raises(ConfigError, match=r"--gpu with no GPU in the cluster yet: pass --workers N"):
        worker_resources(Cluster(CPU=4), None, None, use_gpu=True)
    assert worker_resources(Cluster(CPU=4), 3, None, use_gpu=True).options == {"num_gpus": 1, "num_cpus": 1}
    assert worker_resources(Cluster(CPU=32, GPU=2), None, 8).cores == 8  # a GPU worker's, the CPUs it asked for


class Loader:
    """A worker class whose loading can fail as a bad SAE does."""

    def __init__(self, weights: str):
        if weights == "truncated":
            raise ConfigError("--sae s: sae_weights.safetensors is not a readable safetensors file.")
        if weights == "missing":
            raise FileNotFoundError(weights)
        self.weights = weights

    def describe(self) -> str:
        return self.weights

    def run(self, n: int) -> int:
        return n + 1


def test_an_error_while_loading_is_raised_by_every_call():
    from jobs.ray_session import as_actor

    Worker = as_actor(Loader)
    assert Worker.__name__ == "Loader" and issubclass(Worker, Loader)
    ok = Worker("good")
    assert (ok.describe(), ok.run(1)) == ("good", 2)
    broken = Worker("truncated")  # constructed: Ray keeps the actor, and its calls say what failed
    for call in (broken.describe, lambda: broken.run(1)):
        with pytest.raises(ConfigError, match="is not a readable safetensors file"):
            call()
    with pytest.raises(FileNotFoundError):  # not a latentstore error: raised where it happens, as before
        Worker("missing")


def run_with_its_own_ray(script: str):
    """Run a Python ``script`` (which starts Ray of its own) in a fresh process; its finished run."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_dir = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # short: socket paths are limited
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


LISTENERS = """
import json, os, time
import psutil
from jobs.ray_session import connect
ray = connect(None, 1)
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process too
time.sleep(2)  # the agents open their ports after start-up
tree = {p.pid: p for p in [psutil.Process(), *psutil.Process().children(recursive=True)]}
found = sorted({(c.laddr.ip, tree[c.pid].name()) for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in tree})
print(json.dumps({"listeners": found, "env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}))
ray.shutdown()
"""


@pytest.mark.ray
def test_a_ray_instance_started_here_listens_on_loopback_only():
    """`latentstore extract` without --address starts its own Ray: the GCS, the raylet, the workers and
    Ray's agents must all listen on loopback, none on every interface or on the machine's address."""
    import ipaddress
    import json

    done = run_with_its_own_ray(LISTENERS)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    listeners = report["listeners"]
    names = {name for _, name in listeners}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), listeners
    exposed = [(ip, name) for ip, name in listeners
               if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]
    assert exposed == [], exposed
    assert report["env"] is None  # the switch is put back once Ray has started


def test_a_cluster_address_is_checked_before_ray_is_asked():
    """Ray quotes an address in its errors and waits minutes for one where nothing answers: a password
    in it, a form it cannot take, or a closed port is refused at once, masked."""
    import socket

    from jobs.ray_session import ADDRESS_FORMS, _check_address

    with socket.socket() as closed:  # a port that was free a moment ago
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    cases = {
        "garbage": f"the Ray address garbage is not HOST:PORT. {ADDRESS_FORMS}",
        "u:hunter2@127.0.0.1:1": "the Ray address ***@127.0.0.1:1 holds credentials (a user name and password). "
                                 "Leave them out: a Ray cluster takes its token from RAY_AUTH_TOKEN or "
                                 "~/.ray/auth_token, never from its address.",
        "ray://h.invalid:10001?token=hunter2": "the Ray address ray://h.invalid:10001?token=*** holds credentials",
        f"127.0.0.1:{port}": f"the Ray cluster at 127.0.0.1:{port} does not answer ([Errno 111] Connection refused). "
                             f"Is its head running (`ray status` there says)? {ADDRESS_FORMS}",
    }
    for address, message in cases.items():
        with pytest.raises(ConfigError) as refused:
            _check_address(address)
        assert str(refused.value).startswith(message) and "hunter2" not in str(refused.value), address
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_address(f"127.0.0.1:{listening.getsockname()[1]}")  # answers: left to Ray
    _check_address("auto")


WORKER_WARNINGS = """
import logging, time, warnings
from jobs import pool
from jobs.ray_session import WorkerResources, connect, in_worker

SAID = "fetched https://user:hunter2@example.com/x?token=abc123 \\x1b]0;retitled\\x07"

class Loud:
    def __init__(self, job):
        pass

    def shout(self, item):
        warnings.warn(SAID)
        logging.getLogger("zarr").warning(SAID)
        return item

def task():
    logging.getLogger("fsspec").warning("task " + SAID)

ray = connect(None, 1)
policy = pool.Policy(label="t", submit=lambda worker, item: worker.shout.remote(item), describe=str)
with pool.actors(ray, Loud, None, WorkerResources(1, False, {"num_cpus": 1}, None), policy) as workers:
    list(pool.run(ray, workers, [1], policy, progress=False))
    ray.get(ray.remote(in_worker(task)).remote())
    time.sleep(3)  # Ray forwards the workers' output to this process's terminal a moment later
"""


@pytest.mark.ray
def test_warnings_and_logs_of_ray_workers_reach_the_terminal_masked_and_escaped():
    """Ray prints a worker's stderr in the driver's terminal as it is: an actor's and a task's warnings
    and log records go through the command line's formatter in the worker first."""
    done = run_with_its_own_ray(WORKER_WARNINGS)
    said = done.stdout + done.stderr
    shown = "fetched https://***@example.com/x?token=*** \\x1b]0;retitled\\x07"
    for line in ("UserWarning: " + shown, "WARNING zarr: " + shown, "WARNING fsspec: task " + shown):
        assert line in said, said[-3000:]
    assert "hunter2" not in said and "abc123" not in said and "\x1b]0;" not in said
