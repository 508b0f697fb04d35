"""The item cache's persistent digest index: a new process serves a warm cache without opening a source file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medssl.data import cache as cache_mod
from medssl.data.cache import DigestIndex, file_digest

READ_ALL = """
import json, sys
from medssl.data.specs import open_dataset
data, cache, count = sys.argv[1], sys.argv[2], sys.argv[3] == "count"
ds = open_dataset("folder:" + data, image_size=8)
ds.enable_cache(cache)
opened = []
if count:  # from here on, every file this process opens is recorded
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
sums = [float(ds[i]["image"].sum()) for i in range(len(ds))]
print(json.dumps({"sums": sums, "source_opens": [p for p in opened if p.startswith(data)],
                  "hits": ds._cache.hits, "misses": ds._cache.misses}))
"""


def _folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _run(data: Path, cache: Path, count: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", READ_ALL, str(data), str(cache), "count" if count else "warm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_no_source_file(tmp_path: Path) -> None:
    data, cache = _folder(tmp_path / "imgs"), tmp_path / "cache"
    cold = _run(data, cache, count=True)
    assert cold["misses"] == 6 and len(cold["source_opens"]) >= 6  # decoded and hashed once
    warm = _run(data, cache, count=True)
    assert warm["hits"] == 6 and warm["misses"] == 0
    assert warm["source_opens"] == []  # the digests come from the index: one stat per file, no read
    assert warm["sums"] == cold["sums"]
    assert (cache / "digests.sqlite").is_file()


def test_index_follows_changed_files_and_survives_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "_DIGESTS", {})  # a "new process": nothing memoised
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    index = DigestIndex(tmp_path / "idx.sqlite")
    d1 = file_digest(f, index)
    monkeypatch.setattr(cache_mod, "_DIGESTS", {})
    f.write_bytes(b"two!")  # new size and mtime: a new key, hashed again
    d2 = file_digest(f, index)
    import hashlib

    assert d1 == hashlib.sha256(b"one").hexdigest() and d2 == hashlib.sha256(b"two!").hexdigest()
    # a damaged index file is a warning, never an error: digests are computed as without an index
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    monkeypatch.setattr(cache_mod, "_DIGESTS", {})
    broken = DigestIndex(bad)
    assert file_digest(f, broken) == d2 and broken.disabled
    ro = DigestIndex(tmp_path / "file" / "idx.sqlite")  # parent is a file: cannot be created
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(cache_mod, "_DIGESTS", {})
    assert file_digest(f, ro) == d2 and ro.disabled
