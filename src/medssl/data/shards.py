"""The ``shards:DIR_OR_URL`` spec: items written once by ``medssl prepare``, read back without decoding.

A prepared folder holds LitData chunks (``chunk-*.bin`` and LitData's ``index.json``; each item zstd-compressed on
its own, so reading one item reads and decompresses only its bytes) and ``medssl-shards.json``, the manifest:
the source spec and the preprocessing that produced the items, the geometry, and per item (in shard order) its
source id, label, patient id and split, plus the files that could not be read. The items are exactly the
tensors the source spec gives with the same settings (``tests/data/test_shards.py``).

:class:`ShardsDataset` is an ordinary :class:`~medssl.data.base.ImageDataset`: evaluation, ``embed`` and
``inspect`` read items by index. Pretraining reads them as a stream (:func:`stream_order`): the chunks in a
shuffled order, every rank a disjoint contiguous part of that stream, and a seeded shuffle buffer within it, so
a rank touches about ``1 / world size`` of the chunks per epoch and the order is a pure function of ``(seed,
epoch, rank, world size)`` -- a resumed run recomputes it and skips the batches already trained on.

Remote URLs (``s3://``, ``gs://``, ``azure://`` ...) go through LitData's downloader into a local chunk cache;
without network they fail with one :class:`~medssl.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import DataError

from .base import ImageDataset

MANIFEST = "medssl-shards.json"
SHARDS_FORMAT = 1
#: Items the per-rank shuffle buffer holds by default (``data.shuffle_buffer``).
DEFAULT_SHUFFLE_BUFFER = 1024
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

__all__ = ["MANIFEST", "ShardsDataset", "is_remote", "read_manifest", "stream_order"]


def is_remote(location: str) -> bool:
    """``location`` is read through LitData's downloader into a local chunk cache: a URL (``s3://bucket/x``) or
    ``local:/path`` (a slow shared disk staged chunk by chunk to the local cache). ``file://`` and plain paths are
    read in place."""
    return (bool(_URL.match(location)) and not location.startswith("file://")) or location.startswith("local:")


def _local(location: str) -> Path:
    return Path(location[len("file://"):] if location.startswith("file://") else location).expanduser()


def _fetch_remote(url: str, cache_dir: Path) -> Path:
    """Download ``url``'s manifest and LitData index into ``cache_dir`` through LitData's downloader.

    Raises:
        DataError: the engine cannot reach the URL (no network, no credentials, no such bucket).
    """
    try:
        from litdata.streaming.downloader import get_downloader
    except ImportError as e:  # pragma: no cover - litdata is a dependency
        raise DataError(f"shards:{url}: remote shards need litdata ({e})") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = url.rstrip("/")
    try:
        downloader = get_downloader(base, str(cache_dir), [])
        for name in (MANIFEST, "index.json"):  # private file, then an atomic rename: ranks may share the cache
            tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
            downloader.download_file(f"{base}/{name}", str(tmp))
            os.replace(tmp, cache_dir / name)
    except Exception as e:  # the engine raises botocore / fsspec / OS errors of many kinds
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"shards:{url}: cannot read the remote shards ({type(e).__name__}: {first}); without "
                        "network access copy the prepared folder to a local or shared disk and use shards:DIR"
                        ) from None
    return cache_dir


def remote_cache_dir(url: str) -> Path:
    """Where the chunks of a remote ``url`` are cached (``$MEDSSL_CACHE_DIR/../shards/<hash>``)."""
    from .cache import default_cache_dir

    return default_cache_dir().parent / "shards" / hashlib.sha256(url.encode()).hexdigest()[:16]


def read_manifest(folder: Path, name: str) -> dict[str, Any]:
    """The checked manifest of a prepared folder.

    Raises:
        DataError: no manifest (not a prepared folder, or an unfinished ``medssl prepare``), or an unreadable one.
    """
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / ".medssl-prepare.json").is_file():
            raise DataError(f"{name}: {folder} is an unfinished `medssl prepare` (no {MANIFEST}); run the same "
                            "prepare command again to finish it")
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST} (not written by `medssl prepare`)"
        raise DataError(f"{name}: {folder} {what}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: {path} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "medssl-shards":
        raise DataError(f"{name}: {path} is not a medssl shards manifest")
    if manifest.get("version") != SHARDS_FORMAT:
        raise DataError(f"{name}: {path} has version {manifest.get('version')!r}; this medssl reads version "
                        f"{SHARDS_FORMAT} (prepare the data again)")
    items = manifest.get("items")
    keys = ("sources", "patient_ids", "splits")
    if not isinstance(items, dict) or not all(isinstance(items.get(k), list) for k in keys):
        raise DataError(f"{name}: {path} lacks the item lists ({', '.join(keys)})")
    n = len(items["sources"])
    if any(len(items[k]) != n for k in keys) or (items.get("labels") is not None and len(items["labels"]) != n):
        raise DataError(f"{name}: {path}: the item lists have different lengths")
    return manifest


def _chunk_table(folder: Path, name: str, remote: bool) -> tuple[list[str], np.ndarray, list[int]]:
    """Chunk file names, the cumulative item counts (``starts``, length chunks + 1) and the byte sizes.

    Raises:
        DataError: LitData's ``index.json`` is missing or unreadable, or (local folders) a chunk file is missing or
            has another size than the index records (a truncated copy).
    """
    path = folder / "index.json"
    try:
        index = json.loads(path.read_text())
        chunks = index["chunks"]
        names = [str(c["filename"]) for c in chunks]
        sizes = [int(c["chunk_size"]) for c in chunks]
        nbytes = [int(c["chunk_bytes"]) for c in chunks]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{name}: {path} (the shard index) is missing or unreadable ({type(e).__name__}: {e})"
                        ) from None
    if not remote:
        for fname, expected in zip(names, nbytes, strict=True):
            p = folder / fname
            if not p.is_file():
                raise DataError(f"{name}: shard {p} is missing")
            size = p.stat().st_size
            if size < expected:
                raise DataError(f"{name}: shard {p} is truncated ({size} bytes, the index records {expected})")
    return names, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), nbytes


class ShardsDataset(ImageDataset):
    """The items of a folder (or URL) written by ``medssl prepare``.

    Args:
        location: the prepared folder, ``file://`` path or remote URL.
        image_size: must equal the prepared size when given (the items are stored resized).
        task: must be the prepared task when given.
        name: the spec string.

    Raises:
        DataError: not a prepared folder, a truncated or missing shard, an unreachable URL, or a size / task the
            shards were not prepared with.
    """

    def __init__(self, location: str, *, image_size: int | None = None, task: str | None = None,
                 name: str | None = None) -> None:
        name = name or f"shards:{location}"
        self.location = location
        self.remote = is_remote(location)
        folder = _fetch_remote(location, remote_cache_dir(location)) if self.remote else _local(location)
        self.folder = folder
        manifest = read_manifest(folder, name)
        self.manifest = manifest
        geo = manifest.get("geometry") or {}
        prepared_size = int(geo.get("image_size", 0))
        if image_size is not None and int(image_size) != prepared_size:
            raise DataError(f"{name}: the shards hold {prepared_size}-pixel items; image size {image_size} would need "
                            f"`medssl prepare --image-size {image_size}` (items are stored resized)")
        prepared_task = manifest.get("task")
        if task is not None and task != prepared_task:
            raise DataError(f"{name}: the shards were prepared with task {prepared_task!r}, not {task!r}; prepare "
                            f"again with --task {task}")
        self.chunk_names, self.chunk_starts, self.chunk_bytes = _chunk_table(folder, name, self.remote)
        items = manifest["items"]
        n = len(items["sources"])
        if int(self.chunk_starts[-1]) != n:
            raise DataError(f"{name}: the shard index holds {int(self.chunk_starts[-1])} items, the manifest {n} "
                            f"(an incomplete copy?)")
        labels = items.get("labels")
        self.origins = [str(s) for s in items["sources"]]
        try:
            self._set_metadata(
                name=name, spatial_dims=int(geo["spatial_dims"]), in_chans=int(geo["in_chans"]),
                image_size=prepared_size, labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                class_names=list(manifest.get("class_names") or []), multilabel=bool(manifest.get("multilabel")),
                patient_ids=np.asarray(items["patient_ids"], dtype=str), splits=np.asarray(items["splits"], dtype=str),
                sources=[f"{name}#{i}" for i in range(n)], task=prepared_task if labels is not None else None,
                tasks=tuple(manifest.get("tasks") or ()), has_masks=bool(geo.get("has_masks")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{name}: {folder / MANIFEST} is inconsistent ({e})") from None
        self.prepared_size = prepared_size
        self._stream: Any = None
        self._pid = -1

    # -- reading --------------------------------------------------------------------------------------------
    def _engine(self) -> Any:
        """LitData's reader of the chunks, one per process (DataLoader workers open their own)."""
        if self._stream is None or self._pid != os.getpid():
            from litdata import StreamingDataset

            kwargs: dict[str, Any] = {}
            if self.remote:
                kwargs["cache_dir"] = str(self.folder / "chunks")
            try:
                self._stream = StreamingDataset(self.location if self.remote else str(self.folder), **kwargs)
            except Exception as e:
                raise DataError(f"{self.name}: cannot open the shards ({type(e).__name__}: {e})") from None
            self._pid = os.getpid()
        return self._stream

    def _chunk_path(self, index: int) -> str:
        name = self.chunk_names[self.chunk_of(index)]
        return f"{self.location.rstrip('/')}/{name}" if self.remote else str(self.folder / name)

    def chunk_of(self, index: int) -> int:
        """The chunk holding item ``index``."""
        return int(np.searchsorted(self.chunk_starts, index, side="right") - 1)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.image_size != self.prepared_size:  # a copy at another size (high-resolution targets)
            raise DataError(f"{self.name}: the shards hold {self.prepared_size}-pixel items, {self.image_size}-pixel "
                            "copies were asked for (a method that reconstructs at a higher resolution, e.g. MIRAM); "
                            "use the source spec, or shards prepared at that size")
        try:
            item = self._engine()[int(index)]
            image = np.asarray(item["image"], dtype=np.float32)
            mask = np.asarray(item["mask"], dtype=np.int64) if self.has_masks else None
        except DataError:
            raise
        except Exception as e:  # LitData raises struct / zstd / OS / index errors on a damaged chunk
            chunk = self._chunk_path(index)
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise DataError(f"{self.name}: shard {chunk} is corrupt (item {index}: {type(e).__name__}: {first}); "
                            "prepare the data again or restore the file") from None
        expected = (self.in_chans,) + (self.image_size,) * self.spatial_dims
        if image.shape != expected:
            chunk = self._chunk_path(index)
            raise DataError(f"{self.name}: shard {chunk} is corrupt (item {index} has shape {image.shape}, the "
                            f"manifest says {expected})")
        return torch.from_numpy(image.copy()), None if mask is None else torch.from_numpy(mask.copy())

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "shards": self.manifest.get("fingerprint")}

    @property
    def fingerprint(self) -> str:
        """Identifies the prepared data (source spec + preprocessing + item count)."""
        return str(self.manifest.get("fingerprint"))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None  # each process opens its own reader
        state["_pid"] = -1
        return state


def stream_order(chunk_starts: np.ndarray, allowed: np.ndarray, *, seed: int, epoch: int, rank: int,
                 world_size: int, buffer: int, drop_last: bool) -> np.ndarray:
    """This rank's item order for one epoch of streaming from shards.

    1. The chunks are permuted with a generator seeded by ``(seed, epoch)`` (the same on every rank); the stream is
       the ``allowed`` items of each chunk in that order.
    2. Rank ``r`` takes the ``r``-th of ``world_size`` equal contiguous parts of the stream: the ranks' parts are
       disjoint and together hold every item (``drop_last``: the last ``len % world_size`` items of the epoch's
       stream are left out; else the parts are padded with the stream's first items, as PyTorch's
       ``DistributedSampler`` does).
    3. A shuffle buffer of ``buffer`` items, seeded by ``(seed, epoch, rank)``, mixes the part: each incoming item
       replaces a random buffered one, which is emitted; the buffer is emptied in random order at the end.

    Args:
        chunk_starts: cumulative item counts of the chunks (``0, n0, n0 + n1, ...``).
        allowed: sorted item indices the epoch reads (e.g. the training split).

    Returns:
        int64 item indices, ``ceil`` or ``floor(len(allowed) / world_size)`` of them.
    """
    g = np.random.default_rng([int(seed), int(epoch), 0xC0FFEE])
    n_chunks = len(chunk_starts) - 1
    chunk_of = np.searchsorted(chunk_starts, allowed, side="right") - 1
    perm = g.permutation(n_chunks)
    rank_of_chunk = np.empty(n_chunks, dtype=np.int64)
    rank_of_chunk[perm] = np.arange(n_chunks)
    stream = allowed[np.argsort(rank_of_chunk[chunk_of], kind="stable")]
    n = len(stream)
    per_rank = n // world_size if drop_last else -(-n // world_size)
    if not drop_last and per_rank * world_size > n and n:
        stream = np.concatenate([stream, np.resize(stream, per_rank * world_size - n)])
    part = stream[rank * per_rank:(rank + 1) * per_rank]
    rng = np.random.default_rng([int(seed), int(epoch), int(rank), 0xB0FFE2])
    out = np.empty(len(part), dtype=np.int64)
    size = max(1, min(int(buffer), len(part)))
    buf = list(part[:size])
    k = 0
    for item in part[size:]:
        j = int(rng.integers(len(buf)))
        out[k] = buf[j]
        buf[j] = item
        k += 1
    for j in rng.permutation(len(buf)):
        out[k] = buf[j]
        k += 1
    return out
