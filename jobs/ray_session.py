"""What every latentstore Ray driver shares: joining a cluster, sizing workers, surfacing errors."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass

from store.errors import ConfigError, LatentStoreError


def connect(address: str | None, n_cpus_wanted: float):
    """Join a cluster (``address`` or RAY_ADDRESS), reuse this process's, or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # More logical CPUs than the actors take, so Ray's own tasks never starve (stack.md).
        ray.init(num_cpus=max(os.cpu_count() or 1, int(n_cpus_wanted) + 1), include_dashboard=False,
                 logging_level=logging.WARNING)
    return ray


@dataclass(frozen=True)
class WorkerResources:
    n_workers: int
    use_gpu: bool
    options: dict  # for ray.remote: num_gpus / num_cpus
    n_threads: int | None  # torch threads for a CPU worker


def worker_resources(ray, workers: int | None, cpus_per_worker: float | None,
                     use_gpu: bool | None = None) -> WorkerResources:
    """One GPU per worker when the cluster has GPUs (or ``use_gpu``), else CPU workers sharing its cores."""
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(n_gpus) if use_gpu is None else use_gpu
    if use_gpu and not workers and not n_gpus:
        raise ConfigError("--gpu with no GPU in the cluster yet: pass --workers N so the autoscaler knows how many "
                          "GPU workers to start.")
    n_workers = workers or max(1, n_gpus)
    if use_gpu:
        return WorkerResources(n_workers, True, {"num_gpus": 1, "num_cpus": cpus_per_worker or 1}, None)
    cpus = cpus_per_worker or max(1.0, (ray.cluster_resources().get("CPU", 1) - 1) / n_workers)
    return WorkerResources(n_workers, False, {"num_cpus": cpus}, max(1, int(cpus)))


def call(ray, ref, what: str):
    """``ray.get`` that re-raises a worker's latentstore error as itself, noting what was under way."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, LatentStoreError):
            cause.add_note(f"(while {what})")
            raise cause from None
        raise


def init_errors_on_call(worker_class: type) -> type:
    """The worker class, with a LatentStoreError from ``__init__`` (truncated weights, say) kept and
    raised by every public method. Ray reports an exception in an actor's ``__init__`` only as text
    inside an ActorDiedError, so the user would get a Ray traceback instead of the error and its fix;
    raised by a call, it reaches the driver as itself (see ``call``)."""

    def __init__(self, *args, **kwargs):
        self._init_error = None
        try:
            worker_class.__init__(self, *args, **kwargs)
        except LatentStoreError as e:
            self._init_error = e

    def guarded(method):
        @functools.wraps(method)
        def call_unless_init_failed(self, *args, **kwargs):
            if self._init_error is not None:
                raise self._init_error
            return method(self, *args, **kwargs)

        return call_unless_init_failed

    methods = {name: guarded(method) for name, method in inspect.getmembers(worker_class, inspect.isfunction)
               if not name.startswith("_")}
    return type(worker_class.__name__, (worker_class,), {"__init__": __init__, **methods,
                                                          "__qualname__": worker_class.__qualname__})
