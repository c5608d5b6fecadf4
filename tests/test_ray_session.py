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


def test_cpu_workers_share_the_cores_less_one():
    r = worker_resources(Cluster(CPU=9), 2, None)
    assert (r.n_workers, r.use_gpu, r.options, r.n_threads) == (2, False, {"num_cpus": 4.0}, 4)


def test_gpu_on_a_cluster_scaling_from_zero_needs_a_worker_count():
    with pytest.raises(ConfigError, match=r"--gpu with no GPU in the cluster yet: pass --workers N"):
        worker_resources(Cluster(CPU=4), None, None, use_gpu=True)
    assert worker_resources(Cluster(CPU=4), 3, None, use_gpu=True).options == {"num_gpus": 1, "num_cpus": 1}


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
    from jobs.ray_session import init_errors_on_call

    Worker = init_errors_on_call(Loader)
    assert Worker.__name__ == "Loader" and issubclass(Worker, Loader)
    ok = Worker("good")
    assert (ok.describe(), ok.run(1)) == ("good", 2)
    broken = Worker("truncated")  # constructed: Ray keeps the actor, and its calls say what failed
    for call in (broken.describe, lambda: broken.run(1)):
        with pytest.raises(ConfigError, match="is not a readable safetensors file"):
            call()
    with pytest.raises(FileNotFoundError):  # not a latentstore error: raised where it happens, as before
        Worker("missing")
