"""A disk cache of decoded, preprocessed items: the second epoch skips DICOM / NIfTI decoding.

Each cached item is one ``.npy`` file per array (image, mask) read back memory-mapped, so the cache never
holds a dataset in RAM and works for datasets larger than memory. An entry's key is the SHA-256 of

* the **content hash** of every source file of the item (SHA-256 of the bytes), and
* the **preprocessing key**: the dataset class, output size, channels, intensity settings and the cache
  format version.

Change a file's bytes or any preprocessing setting and the key changes: the stale entry is simply never
read again (``medssl`` does not delete it; remove the cache folder to reclaim the space). Hashing a file
costs one sequential read, far cheaper than decoding it; the hash is memoised per process under
``(path, size, mtime)`` so a warm epoch does not re-read the sources at all (a file rewritten with the
same size and the same modification time in nanoseconds would not be noticed).

Concurrency: writers (DataLoader workers, DDP ranks, two jobs on one machine) write to a private
temporary file and ``os.replace`` it into place, an atomic rename on POSIX and Windows. Two processes that
build the same entry at once both write identical bytes and the last rename wins; a reader sees either no
entry or a complete one, never a partial file. No locks are needed.

Location: ``data.cache_dir`` in the config, else ``$MEDSSL_CACHE_DIR``, else ``~/.cache/medssl/items``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError

CACHE_FORMAT = 1
__all__ = ["ItemCache", "default_cache_dir", "file_digest"]


def default_cache_dir() -> Path:
    """``$MEDSSL_CACHE_DIR`` or ``~/.cache/medssl/items``."""
    env = os.environ.get("MEDSSL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "medssl" / "items"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (of every file, sorted by name, for a DICOM series folder).

    Memoised per process under ``(path, size, mtime_ns)``.
    """
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.iterdir() if x.is_file()):
            h.update(f.name.encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    got = _DIGESTS.get(key)
    if got is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        got = h.hexdigest()
        _DIGESTS[key] = got
    return got


class ItemCache:
    """Content-addressed store of preprocessed items.

    Args:
        root: Cache folder (created on first write).
        preprocessing: JSON-serialisable description of everything that shapes an item besides its source
            bytes (dataset class, size, channels, intensity mode ...).

    Attributes:
        hits, misses: Counters of this process (a DataLoader worker has its own).
    """

    def __init__(self, root: str | Path, preprocessing: dict[str, Any]) -> None:
        self.root = Path(root).expanduser()
        text = json.dumps({"format": CACHE_FORMAT, **preprocessing}, sort_keys=True, default=str)
        self.preprocessing_key = hashlib.sha256(text.encode()).hexdigest()
        self.hits = 0
        self.misses = 0

    def key(self, files: list[str]) -> str:
        """The entry key of an item read from ``files``."""
        h = hashlib.sha256(self.preprocessing_key.encode())
        for f in files:
            h.update(file_digest(f).encode())
        return h.hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.image.npy", d / f"{key}.mask.npy"

    def get(self, files: list[str], with_mask: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The cached arrays (memory-mapped, read-only) or ``None`` on a miss."""
        img_p, mask_p = self._paths(self.key(files))
        try:
            image = np.load(img_p, mmap_mode="r")
            mask = np.load(mask_p, mmap_mode="r") if with_mask else None
        except (FileNotFoundError, ValueError, OSError):
            self.misses += 1
            return None
        self.hits += 1
        return image, mask

    def put(self, files: list[str], image: np.ndarray, mask: np.ndarray | None) -> None:
        """Store an item atomically (mask first, so an image entry implies its mask is there)."""
        img_p, mask_p = self._paths(self.key(files))
        try:
            img_p.parent.mkdir(parents=True, exist_ok=True)
            if mask is not None:
                _atomic_save(mask_p, mask)
            _atomic_save(img_p, image)
        except OSError as exc:
            raise DataError(f"cannot write the data cache in {self.root}: {exc} "
                            "(set data.cache_dir or data.cache=false)") from exc


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
