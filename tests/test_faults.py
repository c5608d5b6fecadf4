"""Faults on a real two-node-and-more Ray cluster, and data fixed between runs.

The cluster tests run a driver in a subprocess (``python -m tests.test_faults CONFIG``) that
builds its own ``ray.cluster_utils.Cluster``: a head without GPUs and three worker nodes with
one logical GPU each, so the extraction's GPU actors land on the worker nodes exactly as on
a real cluster (the CPU build of torch then runs them on the CPU). The session's plain
``ray_cluster`` fixture stays untouched in this process.

The driver swaps in a worker that, on one chosen shard, stops for good after writing part
of the shard (a torn shard group, no completion marker) and says where it is. The test then
checks what a reader sees at that moment, and applies the fault: SIGKILL of the worker
process, or removal of its whole node. Throughout, a reader in this process polls the store
and checks that it only ever shows complete shards with consistent numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).parent.parent

# -- the driver, run in a subprocess ------------------------------------------------------------

try:
    from pipeline.worker import ExtractWorker
except ImportError:  # pragma: no cover
    ExtractWorker = object


class FaultyWorker(ExtractWorker):
    """The extraction worker, unchanged, except that on ``target_shard`` its first attempt stops
    forever after ``stop_after`` arrays are written, leaving a torn shard, and reports its pid."""

    fault_dir: str = ""
    target_shard: int = -1
    stop_after: int = 4  # token_ids, row, pos, then the first SAE's indptr

    def run_shard(self, shard):
        import ray
        import store.elements as elements
        from store.format import shard_path

        flag = os.path.join(self.fault_dir, "stopped.json")
        if shard.shard_id == self.target_shard and not os.path.exists(flag):
            # The worker writes a shard's arrays on threads while another shard may be under way:
            # only the target shard's writes are counted, and the patch stays (this process dies).
            real, torn, calls = elements.write_array, shard_path(shard.shard_id), []

            def stop_part_way(group, *args, **kwargs):
                if group.path.startswith(torn):
                    calls.append(1)
                    if len(calls) == self.stop_after:
                        info = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                                "shard_id": shard.shard_id}
                        with open(flag + ".tmp", "w") as f:
                            json.dump(info, f)
                        os.replace(flag + ".tmp", flag)
                        while True:  # until the fault takes this process away
                            time.sleep(0.5)
                return real(group, *args, **kwargs)

            elements.write_array = stop_part_way
        marker = super().run_shard(shard)
        with open(os.path.join(self.fault_dir, "completed.jsonl"), "a") as f:
            f.write(json.dumps({"shard_id": shard.shard_id, "pid": os.getpid(),
                                "node_id": ray.get_runtime_context().get_node_id()}) + "\n")
        return marker


def _driver(config_path: str) -> None:
    """Build the cluster, then run each scenario of the config in turn."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    import jobs.extract
    from jobs.extract import ExtractConfig, run_extract
    from pipeline.dataset import DatasetSpec

    spec = json.loads(Path(config_path).read_text())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    print("cluster up:", [n.node_id for n in nodes], flush=True)
    jobs.extract.ExtractWorker = FaultyWorker
    for scenario in spec["scenarios"]:
        fault_dir = Path(scenario["fault_dir"])
        fault_dir.mkdir(parents=True, exist_ok=True)
        FaultyWorker.fault_dir, FaultyWorker.target_shard = str(fault_dir), scenario.get("target_shard", -1)

        def remove_node_on_request(fault_dir=fault_dir):
            go = fault_dir / "remove-node"
            while not go.exists():
                time.sleep(0.1)
            stopped = json.loads((fault_dir / "stopped.json").read_text())
            node = next(n for n in cluster.worker_nodes if n.node_id == stopped["node_id"])
            cluster.remove_node(node, allow_graceful=False)  # the machine is gone, processes and all
            try:
                os.kill(stopped["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            (fault_dir / "node-removed").write_text(stopped["node_id"])

        if scenario.get("remove_node"):
            threading.Thread(target=remove_node_on_request, daemon=True).start()
        cfg = ExtractConfig.build(model=spec["model"], saes=tuple(spec["saes"]), dataset=DatasetSpec(spec["dataset"]),
                            store=scenario["store"], context_size=16, batch_size=4, shard_tokens=384, workers=2,
                            max_tokens=spec["max_tokens"],
                            use_gpu=True, cpus_per_worker=1, progress=False, index=False)
        started = time.time()
        counts = run_extract(cfg)
        (fault_dir / "finished.json").write_text(json.dumps({"counts": counts, "seconds": time.time() - started}))
        print(f"{scenario['name']}: {counts['n_tokens']} tokens in {time.time() - started:.1f}s", flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    _driver(sys.argv[1])
    sys.exit(0)


# -- the tests ----------------------------------------------------------------------------------

from jobs.extract import run_extract  # noqa: E402
from pipeline.dataset import DatasetSpec  # noqa: E402
from store import FeatureStore  # noqa: E402
from store import format as fmt  # noqa: E402
from store.errors import DataError  # noqa: E402
from tests.stores import assert_prefix_of, assert_same_store, config  # noqa: E402


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float, poll=None) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited early:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}:\n{proc.stdout.read()[-4000:]}")
        if poll is not None:
            poll()
        time.sleep(0.2)


class ConsistentReader:
    """Opens the store again and again while it is written; every view must be a set of complete
    shards, each equal to the same shard of the reference, with counts that add up."""

    def __init__(self, store: Path, reference: FeatureStore):
        self.store, self.reference, self.views, self.shards_seen = store, reference, 0, set()
        self.by_id = {s.shard_id: s for s in reference.shards}

    def __call__(self) -> None:
        if not (self.store / "zarr.json").exists():
            return
        fs = FeatureStore.open(str(self.store))
        self.views += 1
        assert fs.n_tokens == sum(s.n_tokens for s in fs.shards)
        for s in fs.shards:
            ref = self.by_id[s.shard_id]
            assert (self.store / fmt.shard_path(s.shard_id) / fmt.MARKER_GROUP).exists()
            assert s.n_tokens == ref.n_tokens
            np.testing.assert_array_equal(fs.token_ids(s.token_start, s.token_stop),
                                          self.reference.token_ids(ref.token_start, ref.token_stop))
            for hook in fs.hooks:
                got, want = fs.csr(hook, s.token_start, s.token_stop), self.reference.csr(hook, ref.token_start, ref.token_stop)
                assert (got != want).nnz == 0 and got.nnz == s.nnz[hook]
            self.shards_seen.add(s.shard_id)


@pytest.mark.slow
def test_killed_worker_and_removed_node_on_a_real_cluster(assets, reference_store, tmp_path):
    """One cluster, two runs over the tokens of the session store's first 4 shards (--max-tokens
    plans exactly those shards): a worker SIGKILLed in the middle of writing a shard; the node under
    a worker removed in the middle of a shard. Both finish by themselves with the tokens and
    activations of an uninterrupted run: no token lost or written twice."""
    scenarios = [
        {"name": "kill", "store": str(tmp_path / "kill.zarr"), "fault_dir": str(tmp_path / "f-kill"),
         "target_shard": 2},
        {"name": "node", "store": str(tmp_path / "node.zarr"), "fault_dir": str(tmp_path / "f-node"),
         "target_shard": 1, "remove_node": True},
    ]
    spec = {"model": str(assets["model_dir"]), "saes": [str(d) for d in assets["sae_dirs"].values()],
            "dataset": str(assets["jsonl"]), "scenarios": scenarios,
            "max_tokens": sum(s.n_tokens for s in reference_store.shards[:4])}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # Its own Ray temp dir (short: socket paths have a length limit), so that no other ray.init on
    # this machine finds this cluster through /tmp/ray/ray_current_cluster, nor it theirs.
    ray_dir = tempfile.mkdtemp(prefix="lsf", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_dir}
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_faults", str(tmp_path / "spec.json")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference = reference_store
    try:
        # a worker killed in the middle of writing shard 2
        kill_dir, kill_store = tmp_path / "f-kill", tmp_path / "kill.zarr"
        reader = ConsistentReader(kill_store, reference)
        _wait_for(kill_dir / "stopped.json", proc, 300, poll=reader)  # the cluster starts first
        stopped = json.loads((kill_dir / "stopped.json").read_text())
        torn = kill_store / fmt.shard_path(2)
        assert (torn / fmt.TOKEN_IDS).exists() and not (torn / fmt.MARKER_GROUP).exists()
        reader()
        assert 2 not in {s.shard_id for s in FeatureStore.open(str(kill_store)).shards}  # torn: not shown
        os.kill(stopped["pid"], signal.SIGKILL)
        _wait_for(kill_dir / "finished.json", proc, 180, poll=reader)
        assert reader.views > 0
        killed = FeatureStore.open(str(kill_store))
        assert killed.complete and len(killed.shards) == 4
        assert_prefix_of(killed, reference)
        completed = [json.loads(line) for line in (kill_dir / "completed.jsonl").read_text().splitlines()]
        redo = [c for c in completed if c["shard_id"] == 2]
        assert len(redo) == 1 and redo[0]["pid"] != stopped["pid"]  # done once more, by the restarted actor

        # the node under a worker removed in the middle of shard 1
        node_dir, node_store = tmp_path / "f-node", tmp_path / "node.zarr"
        reader = ConsistentReader(node_store, reference)
        _wait_for(node_dir / "stopped.json", proc, 180, poll=reader)
        reader()
        (node_dir / "remove-node").write_text("now")
        _wait_for(node_dir / "finished.json", proc, 240, poll=reader)
        removed = (node_dir / "node-removed").read_text()
        assert_prefix_of(FeatureStore.open(str(node_store)), reference)
        completed = [json.loads(line) for line in (node_dir / "completed.jsonl").read_text().splitlines()]
        redo = [c for c in completed if c["shard_id"] == 1]
        assert len(redo) == 1 and redo[0]["node_id"] != removed  # redone elsewhere
        assert proc.wait(timeout=60) == 0, proc.stdout.read()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)


# -- a bad row fixed between runs ---------------------------------------------------------------


def _markers(store: Path) -> dict[int, dict]:
    from store.writer import StoreWriter

    return StoreWriter(str(store)).completed_shards()


def _save_rows(path: Path, rows: list) -> None:
    import shutil

    import datasets

    if path.exists():
        shutil.rmtree(path)
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(str(path))


@pytest.mark.ray
def test_rerun_after_editing_rows_redoes_only_their_shards(assets, tmp_path, ray_cluster, caplog):
    """A bad row is named before any work (the plan tokenizes every row), and no store is started.
    Once the data is fixed, the run completes; editing a row of a complete shard later, with as many
    tokens, redoes only that shard, and rebuilds the index, though the store holds as many tokens."""
    rows = [[1, 2, 3]] * 120 + [[1, 99, 2]] + [[4, 5]] * 9  # row 120: outside the vocabulary
    data, store = tmp_path / "rows", tmp_path / "s.zarr"
    _save_rows(data, rows)
    cfg = config(assets, store, dataset=DatasetSpec(str(data), tokens_column="ids"), shard_tokens=150)
    with pytest.raises(DataError, match=r"dataset row 120: token id 99 is outside"):
        run_extract(cfg)  # row 120 is past the driver's look at the first 100 rows: the plan finds it
    assert not store.exists()

    rows[120] = [1, 9, 2]  # the fix
    _save_rows(data, rows)
    run_extract(cfg)
    after = _markers(store)
    assert set(after) == {0, 1, 2}
    fs = FeatureStore.open(str(store))
    assert fs.complete and fs.n_tokens == sum(map(len, rows))
    np.testing.assert_array_equal(fs.token_ids(), np.concatenate(rows))

    rows[3] = [7, 7, 7]  # an edit inside shard 0, of as many tokens: only shard 0 is redone
    _save_rows(data, rows)
    with caplog.at_level("WARNING", logger="store.writer"):
        run_extract(cfg)
    assert "the dataset changed since this store was written" in caplog.text
    assert "Kept 2 complete shards whose rows are unchanged; 1 will be redone" in caplog.text
    again = _markers(store)
    assert again[0]["written_at"] != after[0]["written_at"] or again[0]["checksums"] != after[0]["checksums"]
    assert again[1] == after[1] and again[2] == after[2]

    fresh = tmp_path / "fresh.zarr"
    run_extract(cfg.changed(store=str(fresh)))
    rerun, reference = FeatureStore.open(str(store)), FeatureStore.open(str(fresh))
    assert_same_store(rerun, reference)
    for hook in reference.hooks:  # the index built before the edit was not kept: it is the fresh one
        for feature in range(reference.d_sae(hook)):
            for got, want in zip(rerun.index(hook).entries(feature), reference.index(hook).entries(feature)):
                np.testing.assert_array_equal(got, want)


def test_markers_without_a_row_digest_are_not_kept_when_data_changes(assets, tmp_path):
    """Markers of stores written before row digests existed cannot vouch for their rows."""
    from jobs.extract import _rows_unchanged, validate
    from pipeline.dataset import open_dataset, rows_digest

    data = tmp_path / "rows"
    _save_rows(data, [[1, 2, 3]] * 20)
    plan = validate(config(assets, tmp_path / "s.zarr", dataset=DatasetSpec(str(data), tokens_column="ids"),
                           shard_tokens=30))
    keep = _rows_unchanged(plan)
    digest = rows_digest(open_dataset(plan.config.dataset)[0:10]["ids"])
    marker = {"shard_id": 0, "row_start": 0, "row_stop": 10, "window_start": 0, "n_windows": 10,
              "token_limit": None, "n_tokens": 30}
    assert keep({**marker, "rows_digest": digest})
    assert not keep(marker)  # no digest: redone
    assert not keep({**marker, "rows_digest": digest, "token_limit": 5})  # a max-tokens cut: redone
    assert not keep({**marker, "rows_digest": digest, "row_stop": 9})  # other rows: redone
    assert not keep({**marker, "rows_digest": "sha256:0"})
