"""Faults injected into index-build tasks and actors and into sweep workers, for
tests/test_index_sweep_faults.py and tests/test_extract_job.py.

Ray runs these in its worker processes, so they take their orders from files, in a fault
directory beside the store (``fault_dir``). Its ``plan.json`` names targets (``"<hook>/<part_id>"``
for index parts, ``"<part_id>"`` for sweep parts) under ``stall_before_marker`` or
``stall_after_marker``. A target's first attempt stops for good at that point: after every array
of the part is written but before its completion marker (a torn part), or after the marker but
before the call returns (a finished part whose worker dies before saying so). It first writes
``stalled-<target>.json`` with its pid, for the test to kill it, or to kill the driver. Every call
is logged to ``calls.jsonl``.

Run as ``python -m tests.fault_injection index|sweep ...``, this is a driver that the tests
SIGKILL part-way. Only the standard library is imported at the top: index tasks import this
module, and must not pay for torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

STALL_LIMIT_S = 300  # a stalled attempt nobody kills dies by itself, as a killed worker would


def fault_dir(location: str, what: str) -> Path:
    """Where the faults of one job on the store at ``location`` are planned and recorded."""
    return Path(os.path.abspath(location).rstrip("/") + ".faults") / what


class Fault:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        plan = self.dir / "plan.json"
        self.plan = json.loads(plan.read_text()) if plan.exists() else {}

    def log(self, target: str) -> None:
        with open(self.dir / "calls.jsonl", "a") as f:
            f.write(json.dumps({"target": target, "pid": os.getpid(), "time": time.time()}) + "\n")

    def stalls(self, target: str, when: str) -> bool:
        """Whether this attempt at ``target`` stops ``when`` ("before" or "after") its marker."""
        return target in self.plan.get(f"stall_{when}_marker", []) and not self.flag(target).exists()

    def flag(self, target: str) -> Path:
        return self.dir / f"stalled-{target.replace('/', '@')}.json"

    def stall(self, target: str) -> None:
        flag = self.flag(target)
        flag.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "target": target}))
        os.replace(flag.with_suffix(".tmp"), flag)
        deadline = time.time() + STALL_LIMIT_S
        while time.time() < deadline:
            time.sleep(0.1)
        os._exit(1)


def calls(directory: Path) -> list[dict]:
    path = Path(directory) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def stalled_before_marking(fault: "Fault", target: str):
    """Stall where a part is about to be marked complete: every array of it is written. Only this
    thread stalls: an actor builds other parts on its other threads meanwhile."""
    import store.elements as elements

    original, caller = elements.write_marker, threading.get_ident()

    def write_marker(part, marker):
        if threading.get_ident() == caller:
            fault.stall(target)
        return original(part, marker)

    elements.write_marker = write_marker
    try:
        yield
    finally:
        elements.write_marker = original


def build_part(location, hook, part, shards, token_dtype):
    """``store.index.build_part`` (unpatched in Ray's workers), with the planned faults."""
    import store.index as index_mod

    fault, target = Fault(fault_dir(location, "index")), f"{hook}/{part.part_id}"
    fault.log(target)
    if fault.stalls(target, "before"):
        with stalled_before_marking(fault, target):
            return index_mod.build_part(location, hook, part, shards, token_dtype)
    marker = index_mod.build_part(location, hook, part, shards, token_dtype)
    if fault.stalls(target, "after"):
        fault.stall(target)
    return marker


def extract_worker_class():
    """``pipeline.worker.ExtractWorker``, whose index parts (built at the end of an extraction, when
    its actors hold every CPU) take the planned faults."""
    from pipeline.worker import ExtractWorker

    class FaultyExtractWorker(ExtractWorker):
        def build_index_part(self, location, name, part, shards, token_dtype):
            return build_part(location, name, part, shards, token_dtype)

    return FaultyExtractWorker


def sweep_worker_class():
    """``pipeline.sweep_worker.SweepWorker``, with the planned faults."""
    from pipeline.sweep_worker import SweepWorker

    class FaultySweepWorker(SweepWorker):
        def run_part(self, part):
            cfg = self.job.config
            fault, target = Fault(fault_dir(cfg.store.path, f"sweep-{cfg.name}")), str(part.part_id)
            fault.log(target)
            if fault.stalls(target, "before"):
                with stalled_before_marking(fault, target):
                    return super().run_part(part)
            marker = super().run_part(part)
            if fault.stalls(target, "after"):
                fault.stall(target)
            return marker

    return FaultySweepWorker


def _drive(argv: list[str]) -> None:
    """A driver to be killed: ``index STORE WORKERS`` (in as many parts) or ``sweep CONFIG.json`` (a
    SweepConfig as ``dataclasses.asdict`` gives it, of a sweep of prompts from a file)."""
    from tests import fault_injection  # by this name, so that Ray's workers import it rather than get a copy

    if argv[0] == "index":
        import store.index
        from jobs.index import run_index

        store.index.build_part = fault_injection.build_part
        run_index(argv[1], workers=int(argv[2]), min_parts=int(argv[2]), progress=False)
    else:
        import jobs.sweep
        from jobs.sweep import SweepConfig, run_sweep

        fields = json.loads(Path(argv[1]).read_text())
        jobs.sweep.SweepWorker = fault_injection.sweep_worker_class()
        run_sweep(SweepConfig.from_dict(fields))


if __name__ == "__main__":
    _drive(sys.argv[1:])
