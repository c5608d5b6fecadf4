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
