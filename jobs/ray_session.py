"""What every latentstore Ray driver shares: joining a cluster, sizing workers, surfacing errors."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from jobs.terminal import show_logs_masked
from store.errors import ConfigError, LatentStoreError, disk_full, is_disk_full
from store.location import credentials_in, mask_url, mask_urls


_joined_here = False  # whether connect() initialized this process's Ray (not a caller, such as a notebook)


def connect(address: str | None, n_cpus_wanted: float):
    """Join a cluster (``address`` or RAY_ADDRESS), reuse this process's, or start a local one."""
    global _joined_here
    import ray

    if ray.is_initialized():
        return ray
    _joined_here = True
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ValueError, ConnectionError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {mask_url(address)} ({mask_urls(str(e))}). "
                              f"{ADDRESS_FORMS}") from e
    else:
        # Ray turns token authentication on for a local cluster, and says so at every start with how to
        # turn it off: it stays on, unsaid
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        with _loopback_only(ray):
            # More logical CPUs than the actors take, so Ray's own tasks never starve (stack.md).
            ray.init(num_cpus=max(os.cpu_count() or 1, int(n_cpus_wanted) + 1), include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address=LOOPBACK)
    return ray


def disconnect() -> None:
    """Leave (or, when started here, stop) the Ray that connect() initialized; a Ray that the caller
    initialized is theirs, and stays."""
    global _joined_here
    if _joined_here:
        import ray

        _joined_here = False
        ray.shutdown()


ADDRESS_FORMS = ("Give --address (or RAY_ADDRESS) as the head's HOST:PORT (6379 by default), ray://HOST:10001 or "
                 "auto, or leave both out to start Ray on this machine.")


def _check_address(address: str) -> None:
    """Refuse, now, a cluster address with credentials in it (Ray would quote it in its messages), one
    that is not HOST:PORT, and one whose port does not answer (Ray would wait minutes)."""
    import socket
    from urllib.parse import urlsplit

    as_url = address if "://" in address else f"ray://{address}"
    shown = mask_url(as_url) if "://" in address else mask_url(as_url).removeprefix("ray://")
    if found := credentials_in(as_url):
        raise ConfigError(f"the Ray address {shown} holds credentials ({found}). Leave them out: a Ray cluster "
                          "takes its token from RAY_AUTH_TOKEN or ~/.ray/auth_token, never from its address.")
    if address == "auto":  # the cluster this machine belongs to, which Ray finds
        return
    try:
        parts = urlsplit(as_url)
        host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" and "://" in address else None)
    except ValueError:
        host = port = None
    if not host or not port:
        raise ConfigError(f"the Ray address {shown} is not HOST:PORT. {ADDRESS_FORMS}")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"the Ray cluster at {shown} does not answer ({e}). Is its head running "
                          f"(`ray status` there says)? {ADDRESS_FORMS}") from e


LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch between a cluster node and local-only Ray


@contextlib.contextmanager
def _loopback_only(ray):
    """A Ray instance started inside binds every server it opens (GCS, raylet, workers, agents) to
    loopback, not to every interface: no other machine can reach it. Users who want a cluster
    give --address.

    Ray's own switch for this is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (local-only Ray, its default on
    macOS and Windows): then the node's address is loopback, and its servers listen there. Ray reads
    the variable once, at import, so the value it read is set as well; the processes Ray starts
    inherit the variable. Both are put back afterwards, so that this process can still join a cluster."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


@dataclass(frozen=True)
class WorkerResources:
    n_workers: int
    use_gpu: bool
    options: dict  # for ray.remote: num_gpus / num_cpus
    n_threads: int | None  # the cores a CPU worker computes on (an extraction: one encoding stream each)

    @property
    def cores(self) -> int:
        """The cores one worker holds: its threads on a CPU, else its whole CPUs."""
        return self.n_threads or max(1, int(self.options.get("num_cpus", 1)))


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
    total = ray.cluster_resources().get("CPU", 1)
    cpus = cpus_per_worker or max(1.0, (total - 1) / n_workers)  # Ray keeps one logical CPU for its own tasks
    # the workers take their whole share of the cores: the driver's idles while they run (on a 2-core
    # machine, one core instead of two made the quick start's extraction 1.5 times slower)
    return WorkerResources(n_workers, False, {"num_cpus": cpus}, max(1, int(cpus_per_worker or total / n_workers)))


def call(ray, ref, what: str, location: str | None = None):
    """``ray.get`` that re-raises a worker's latentstore error as itself, noting what was under way.
    A full disk (ENOSPC, EDQUOT) met by a worker becomes a StoreFullError that names the path
    (``location``, the store, when the error does not name a file) and says that a rerun resumes."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if is_disk_full(cause):
            full = disk_full(cause, location)
            full.add_note(f"(while {what})")
            raise full from None
        if isinstance(cause, LatentStoreError):
            cause.add_note(f"(while {what})")
            raise cause from None
        raise


def as_actor(worker_class: type) -> type:
    """The worker class as a Ray actor runs it. Its process prints log records and warnings masked
    (``in_worker``). A LatentStoreError from ``__init__`` (truncated weights, say) is kept and raised
    by every public method: Ray reports an exception in an actor's ``__init__`` only as text inside an
    ActorDiedError, so the user would get a Ray traceback instead of the error and its fix; raised by
    a call, it reaches the driver as itself (see ``call``)."""

    def __init__(self, *args, **kwargs):
        show_logs_masked()
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


def in_worker(function: Callable) -> Callable:
    """``function`` as a Ray task runs it: its worker process first prints log records and warnings
    through the command line's masking formatter, since Ray forwards a worker's stderr to the
    terminal as it is, credentials in URLs and control characters included."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        show_logs_masked()
        return function(*args, **kwargs)

    return run
