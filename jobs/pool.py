"""One driver loop for every Ray command: workers take the next item as each becomes free.

Extraction hands shards to its actors, a sweep hands parts to its actors, the index build hands
feature ranges to tasks; each command says how with a ``Policy`` and reads the results as they
come from ``run``. A worker's latentstore error reaches the driver as itself, with a note of what
was under way (``jobs.ray_session.call``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jobs.ray_session import WorkerResources, call, as_actor


def _one(item: Any, result: Any) -> int:
    return 1


@dataclass(frozen=True)
class Policy:
    """How one command hands its items to its workers, and how it shows their progress."""

    label: str  # the progress bar's name: "extract", "sweep", "index"
    submit: Callable[[Any, Any], Any]  # (worker, item) -> the ObjectRef of the item's result
    describe: Callable[[Any], str]  # what an item's call was doing, for an error's note
    unit: str = "part"  # the progress bar's unit
    unit_scale: bool = False  # show the bar's counts as 12.3k
    amount: Callable[[Any, Any], int] = _one  # progress made by a finished (item, result)
    count: str | None = None  # beside the bar, "COUNT done/all" of the items (e.g. "shards")
    calls_per_worker: int = 1  # items a worker takes at once
    location: str | None = None  # the store, named by the error of a disk that filled up


@contextlib.contextmanager
def actors(ray, worker_class: type, job: Any, resources: WorkerResources, policy: Policy,
           max_calls: int | None = None):
    """``resources.n_workers`` actors of ``worker_class``, each made from ``job``; killed on the way out.

    A killed worker comes back and its call is retried, so every item's write must be idempotent
    (stack.md). Each runs up to ``max_calls`` calls at once (default ``policy.calls_per_worker``;
    more where a later step hands the warm actors other work)."""
    actor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=max_calls or policy.calls_per_worker,
                       **resources.options)(as_actor(worker_class))
    started = [actor.remote(job) for _ in range(resources.n_workers)]
    try:
        yield started
    finally:
        for a in started:
            ray.kill(a)


def run(ray, workers: list, items: Iterable, policy: Policy, *, progress: bool = True, total: int | None = None,
        initial: int = 0, n_done: int = 0) -> Iterator[tuple[Any, Any]]:
    """Hand ``items`` to ``workers`` (each taking ``policy.calls_per_worker`` at once) and yield each
    ``(item, result)`` as it finishes. ``total``, ``initial``: the bar's, in ``policy.unit``;
    ``n_done``: the items finished before (for ``policy.count``)."""
    from tqdm.auto import tqdm

    queue = deque(items)
    n_items = n_done + len(queue)
    idle, in_flight = list(workers) * policy.calls_per_worker, {}  # a worker once per call it may take
    bar = tqdm(total=n_items if total is None else total, initial=initial, unit=policy.unit,
               unit_scale=policy.unit_scale, desc=policy.label, disable=not progress, dynamic_ncols=True)
    if policy.count:
        bar.set_postfix_str(f"{policy.count} {n_done}/{n_items}")
    try:
        while queue or in_flight:
            while idle and queue:
                worker, item = idle.pop(), queue.popleft()
                in_flight[policy.submit(worker, item)] = (worker, item)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            worker, item = in_flight.pop(ref)
            idle.append(worker)
            result = call(ray, ref, policy.describe(item), location=policy.location)
            n_done += 1
            bar.update(policy.amount(item, result))
            if policy.count:
                bar.set_postfix_str(f"{policy.count} {n_done}/{n_items}")
            yield item, result
    finally:
        bar.close()
        for ref in in_flight:  # left by an error or Ctrl-C: cancelled, else killing their workers has each
            with contextlib.suppress(Exception):  # call report that it will be retried
                ray.cancel(ref)
