"""Stores in object storage: extraction, resume, index, queries and verify against a real
S3-compatible server (moto's standalone server) on loopback, started by the test.

Credentials reach latentstore only through the environment, as on a real cluster, and the
test asserts that they appear nowhere: not in any object of the bucket, not in the command's
output, not in Ray's logs, not in error messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from store import FeatureStore  # noqa: E402
from store.errors import ConfigError, StoreNotFoundError  # noqa: E402
from store.verify import verify_store  # noqa: E402
from tests.s3_server import BUCKET, s3  # noqa: E402,F401  (the fixture)

REPO = Path(__file__).parent.parent
HOOK = "blocks.0.hook_resid_post"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _extract(assets, store: str, env: dict, ray_dir: str) -> subprocess.CompletedProcess:
    """`latentstore extract` as a user runs it, with credentials only in the environment."""
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--model", str(assets["model_dir"]),
            "--sae", str(assets["sae_dirs"][HOOK]), "--dataset", str(assets["rows20"]), "--store", store,
            "--context-size", "16", "--batch-size", "4", "--shard-tokens", "384", "--workers", "1", "--no-progress"]
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env, RAY_TMPDIR=ray_dir)
    done = subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_extract_resume_index_query_and_verify_on_s3(assets, s3, reference_store, tmp_path):
    """The first 20 rows of the test extraction (``tests.stores.config``), one SAE, into a bucket:
    the store holds the session's local store's first tokens exactly."""
    import s3fs

    from store.writer import StoreWriter
    from tests.stores import assert_prefix_of

    assets = dict(assets, rows20=tmp_path / "rows20.jsonl")
    assets["rows20"].write_text("".join(assets["jsonl"].read_text().splitlines(keepends=True)[:20]))

    url = f"s3://{BUCKET}/runs/run.zarr"
    ray_dir = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # short: Ray's socket paths have a length limit
    outputs = [_extract(assets, url, s3, ray_dir)]
    fs = FeatureStore.open(url)
    assert fs.complete and fs.location == url
    assert_prefix_of(fs, reference_store)
    shard_ids = [s.shard_id for s in fs.shards]

    # resume: two shards lost and the store marked unfinished, as after a crash; the same command finishes it
    bucket = s3fs.S3FileSystem()
    for shard in ("000001", "000003"):
        bucket.rm(f"{BUCKET}/runs/run.zarr/shards/{shard}", recursive=True)
    StoreWriter(url)._set_root(status="writing")
    partial = FeatureStore.open(url)
    assert not partial.complete and [s.shard_id for s in partial.shards] == [i for i in shard_ids if i not in (1, 3)]
    outputs.append(_extract(assets, url, s3, ray_dir))
    fs = FeatureStore.open(url)
    assert fs.complete
    assert_prefix_of(fs, reference_store)

    # the index was built in the bucket, and queries read it
    assert fs.index(HOOK) is not None
    csc, ids = fs.csr(HOOK).tocsc(), fs.token_ids()
    for feature in range(0, fs.d_sae(HOOK), 7):
        tokens, values = fs.index(HOOK).entries(feature)
        column = slice(csc.indptr[feature], csc.indptr[feature + 1])
        order = np.lexsort((csc.indices[column], -csc.data[column].astype(np.float64)))
        np.testing.assert_array_equal(tokens, csc.indices[column][order])
        np.testing.assert_array_equal(values, csc.data[column][order])
        top = fs.top_activations(HOOK, feature, k=20)
        ordinary = tokens[~np.isin(ids[tokens], list(fs.special_token_ids))]
        np.testing.assert_array_equal(top["token_index"], ordinary[:20])
    assert verify_store(url).ok

    # credentials appear nowhere: objects in the bucket, the command's output, Ray's logs, error messages
    secrets = [s3["AWS_SECRET_ACCESS_KEY"], s3["AWS_ACCESS_KEY_ID"]]
    objects = bucket.find(BUCKET)
    assert any(o.endswith("zarr.json") for o in objects)
    for obj in objects:
        data = bucket.cat_file(obj)
        assert not any(s.encode() in data for s in secrets), obj
    for out in outputs:
        assert not any(s in out.stdout + out.stderr for s in secrets)
    n_logs = 0
    for path in Path(ray_dir).rglob("*"):
        if path.is_file() and not path.is_symlink():
            n_logs += 1
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    assert n_logs > 0
    with pytest.raises(StoreNotFoundError) as missing:
        FeatureStore.open(f"s3://{BUCKET}/no-such.zarr")
    with pytest.raises(ConfigError) as embedded:
        FeatureStore.open(f"s3://{secrets[1]}:{secrets[0]}@{BUCKET}/runs/run.zarr")
    for err in (missing.value, embedded.value):
        assert not any(s in str(err) for s in secrets)
    assert "holds credentials" in str(embedded.value)
