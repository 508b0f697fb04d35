"""The item cache: hits after the first read, invalidation by content and by preprocessing, two writers."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.data.cache import ItemCache, file_digest
from medssl.data.manifest import CsvDataset, drop_bad
from medssl.data.readers import IntensityConfig

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def _manifest(tmp: Path, names: list[str]) -> Path:
    (tmp / "d").mkdir(exist_ok=True)
    rows = []
    for i, n in enumerate(names):
        shutil.copy(get_testdata_file(n), tmp / "d" / n)
        rows.append({"path": f"d/{n}", "label": i % 2, "patient_id": f"p{i}"})
    with open(tmp / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    return tmp / "m.csv"


NAMES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"]


def test_second_read_hits_the_cache_and_returns_the_same_tensor(tmp_path: Path) -> None:
    ds = CsvDataset(_manifest(tmp_path, NAMES), image_size=32)
    ref = [ds[i]["image"] for i in range(len(ds))]
    assert ds.enable_cache(tmp_path / "cache")
    first = [ds[i]["image"] for i in range(len(ds))]
    assert ds._cache.misses == len(ds) and ds._cache.hits == 0
    second = [ds[i]["image"] for i in range(len(ds))]
    assert ds._cache.hits == len(ds)
    for a, b, c in zip(ref, first, second, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    second[0].add_(1.0)  # items are writable copies, not views of the read-only memory map
    torch.testing.assert_close(ds[0]["image"], ref[0])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(ds)


def test_changed_file_or_preprocessing_invalidates(tmp_path: Path) -> None:
    m = _manifest(tmp_path, NAMES[:2])
    cache = tmp_path / "cache"
    ds = CsvDataset(m, image_size=32)
    ds.enable_cache(cache)
    old = ds[0]["image"].clone()
    # new bytes in the same file: another image under the same name
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "d" / "CT_small.dcm")
    os.utime(tmp_path / "d" / "CT_small.dcm", ns=(1, 1))
    ds2 = CsvDataset(m, image_size=32)
    ds2.enable_cache(cache)
    new = ds2[0]["image"]
    assert ds2._cache.misses == 1 and not torch.allclose(old, new)
    torch.testing.assert_close(new, ds2[1]["image"])  # now the same file as item 1
    # another intensity setting or size is another entry
    ds3 = CsvDataset(m, image_size=32, intensity=IntensityConfig(mode="minmax"))
    ds3.enable_cache(cache)
    ds3[1]
    assert ds3._cache.misses == 1
    ds4 = CsvDataset(m, image_size=24)
    ds4.enable_cache(cache)
    assert ds4[1]["image"].shape[-1] == 24 and ds4._cache.misses == 1


def test_file_digest_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_digest(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


def _writer(root: str, seed: int, q: mp.Queue) -> None:
    cache = ItemCache(root, {"p": 1})
    rng = np.random.default_rng(0)
    arr = rng.random((1, 256, 256)).astype(np.float32)
    for _ in range(30):
        cache.put([root + "/src.bin"], arr, None)
        got = cache.get([root + "/src.bin"], with_mask=False)
        q.put(bool(got is not None and np.array_equal(np.asarray(got[0]), arr)))


def test_two_processes_building_the_same_entries_never_see_a_partial_file(tmp_path: Path) -> None:
    (tmp_path / "src.bin").write_bytes(b"source")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, q)) for s in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(60)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(results)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_drop_bad_fills_the_cache_used_by_the_kept_items(tmp_path: Path) -> None:
    m = _manifest(tmp_path, NAMES[:2])
    ds = CsvDataset(m, image_size=32)
    ds.enable_cache(tmp_path / "cache")
    sub = drop_bad(ds)
    assert ds._cache.misses == 2
    sub[0], sub[1]
    assert ds._cache.hits == 2
