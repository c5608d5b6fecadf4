"""The on-disk format: its spec's listing, versions, value encodings, readers of partial stores."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from store import FeatureStore
from store import format as fmt
from store.errors import FormatVersionError, StoreNotFoundError
from store.writer import ShardData, SparseActivations, StoreWriter

REPO = Path(__file__).parent.parent


def tiny_store(assets, path) -> FeatureStore:
    """The store whose listing docs/FORMAT.md shows."""
    import datasets

    from jobs.extract import ExtractConfig, run_extract
    from pipeline.dataset import DatasetSpec

    data = path.parent / "tiny.parquet"
    datasets.Dataset.from_dict({"text": ["the cat sat on the mat", "a big red fox ran", "it was", "and then"]}).to_parquet(str(data))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    run_extract(ExtractConfig.build(model=str(assets["model_dir"]), saes=tuple(str(assets["sae_dirs"][h]) for h in hooks),
                                    dataset=DatasetSpec(str(data)), store=str(path), context_size=8, shard_tokens=12,
                                    workers=1, progress=False))
    return FeatureStore.open(str(path))


@pytest.mark.ray
def test_format_doc_listing_matches_a_real_store(assets, ray_cluster, tmp_path):
    fs = tiny_store(assets, tmp_path / "tiny.zarr")
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    listing = re.search(r"```\n(/  \(latentstore\.store.*?)```", doc, re.S).group(1).strip()
    assert listing == fs.tree()
    assert f"**Format version {fmt.FORMAT_VERSION}.**" in doc


def write_synthetic(location, shards: list[sp.csr_matrix], value_dtype="float32", complete=True) -> StoreWriter:
    writer = StoreWriter(str(location))
    run = {"model": {"name": "m"}, "dataset": {"name": "d"}, "context_size": 4, "prepend_bos": False,
           "value_dtype": value_dtype, "saes": [{"hook": "h", "d_sae": shards[0].shape[1], "source": "s",
                                                 "architecture": "standard"}]}
    writer.begin(run, {"n_shards": len(shards)}, overwrite=False)
    markers = []
    for i, m in enumerate(shards):
        n = m.shape[0]
        values = m.data.astype(fmt.storage_dtype(value_dtype)) if value_dtype != "bfloat16" else _bf16_bits(m.data)
        markers.append(writer.write_shard(ShardData(i, i, i + 1, None, np.arange(n), np.full(n, i), np.arange(n),
                                                    {"h": SparseActivations(m.indptr.astype(np.int64),
                                                                            m.indices.astype(np.uint16), values)}),
                                          value_dtype, {"h": m.shape[1]}))
    if complete:
        writer.finalize(markers, {})
    return writer


def write_synthetic_complete(location, shards: list[sp.csr_matrix]) -> None:
    """``write_synthetic``'s store of SAE h, finished as an extraction finishes it: with its merged
    statistics and counts, so that it opens and verifies as a real one."""
    from store import stats

    writer = write_synthetic(location, shards, complete=False)
    markers = [m for _, m in sorted(writer.completed_shards().items())]
    n_tokens = sum(m["n_tokens"] for m in markers)
    d_sae = shards[0].shape[1]
    stats.write_merged(str(location), "h", stats.merge_shards(str(location), markers, "h", d_sae, "float32"), n_tokens)
    writer.finalize(markers, {"n_tokens": n_tokens, "n_shards": len(markers), "nnz": {"h": sum(m.nnz for m in shards)}})


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bfloat16_values_decode_like_torch(tmp_path):
    import torch

    m = sp.random(20, 50, density=0.2, format="csr", random_state=0, dtype=np.float32) * 7
    write_synthetic(tmp_path / "b.zarr", [m], "bfloat16")
    got = FeatureStore.open(str(tmp_path / "b.zarr")).csr("h")
    expected = torch.from_numpy(m.data).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got.data, expected)
    np.testing.assert_array_equal(got.indices, m.indices)


def test_row_ranges_across_shards_equal_slices(tmp_path):
    mats = [sp.random(n, 30, density=0.3, format="csr", random_state=n, dtype=np.float32) for n in (5, 0, 7, 3)]
    write_synthetic(tmp_path / "r.zarr", mats)
    fs = FeatureStore.open(str(tmp_path / "r.zarr"))
    full = sp.vstack(mats).tocsr()
    assert fs.n_tokens == 15
    for start, stop in [(0, 15), (3, 9), (5, 12), (12, 12), (14, 15)]:
        assert abs(fs.csr("h", start, stop) - full[start:stop]).max() == 0 if stop > start else fs.csr("h", start, stop).shape == (0, 30)
    with pytest.raises(IndexError, match=r"token range start=10, stop=16 is not a range of the store's 15 tokens"):
        fs.csr("h", 10, 16)


def test_reader_sees_only_complete_shards_while_writing(tmp_path):
    mats = [sp.random(4, 10, density=0.5, format="csr", random_state=i, dtype=np.float32) for i in range(3)]
    writer = write_synthetic(tmp_path / "w.zarr", mats, complete=False)
    marker = tmp_path / "w.zarr" / "shards" / "000001" / "complete" / "zarr.json"
    marker.write_text(marker.read_text()[:20])  # a torn marker
    fs = FeatureStore.open(str(tmp_path / "w.zarr"))
    assert not fs.complete
    assert [s.shard_id for s in fs.shards] == [0, 2] and fs.n_tokens == 8
    assert writer.completed_shards().keys() == {0, 2}


def test_a_store_being_created_reads_as_empty_at_every_step(tmp_path, monkeypatch):
    import zarr

    seen, create_group = [], zarr.Group.create_group

    def open_first(group, name, **kwargs):  # a reader opens the store just before each group is made
        fs = FeatureStore.open(str(tmp_path / "c.zarr"))
        seen.append((name, fs.complete, fs.n_tokens, fs.shards))
        return create_group(group, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_group", open_first)
    write_synthetic(tmp_path / "c.zarr", [sp.random(4, 10, density=0.5, format="csr", dtype=np.float32)], complete=False)
    assert seen[0] == (fmt.SHARDS_GROUP, False, 0, [])


def test_a_reader_is_quiet_about_files_mid_write(tmp_path):
    import warnings

    from zarr.errors import ZarrUserWarning

    mats = [sp.random(4, 10, density=0.5, format="csr", random_state=i, dtype=np.float32) for i in range(2)]
    write_synthetic(tmp_path / "p.zarr", mats, complete=False)
    (tmp_path / "p.zarr" / "shards" / "zarr.0a1b2c.partial").write_text("{")  # zarr's temporary, mid-write
    (tmp_path / "p.zarr" / "shards" / "000002").mkdir()  # a shard's folder before its zarr.json
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=ZarrUserWarning, append=True)
        assert [s.shard_id for s in FeatureStore.open(str(tmp_path / "p.zarr")).shards] == [0, 1]


def test_newer_major_version_is_refused_with_upgrade_hint(tmp_path):
    m = sp.random(3, 10, density=0.5, format="csr", random_state=0, dtype=np.float32)
    write_synthetic(tmp_path / "v.zarr", [m])
    import zarr

    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="a")
    attrs = dict(root.attrs[fmt.ATTRS_KEY], **{"encoding-version": "3.0"})
    root.attrs[fmt.ATTRS_KEY] = attrs
    with pytest.raises(FormatVersionError, match=r"format 3\.0; this latentstore reads format 2\.x\. Upgrade"):
        FeatureStore.open(str(tmp_path / "v.zarr"))
    attrs["encoding-version"] = "2.7"  # a newer minor only adds: still readable
    root.attrs[fmt.ATTRS_KEY] = attrs
    assert FeatureStore.open(str(tmp_path / "v.zarr")).n_tokens == 3


def test_missing_store_says_how_to_make_one(tmp_path):
    with pytest.raises(StoreNotFoundError, match=r"No latentstore store at .*latentstore extract --store"):
        FeatureStore.open(str(tmp_path / "nothing.zarr"))


def test_store_package_needs_neither_torch_nor_ray():
    code = ("import sys, store, store.reader, store.writer, store.sweeps; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
