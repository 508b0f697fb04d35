"""``medssl prepare``: read a data spec once and write its preprocessed items as compressed shards.

Everything deterministic that shapes an item -- decoding, intensity mapping, resampling, resizing -- runs here,
once, in parallel worker processes (LitData's ``optimize``); pretraining, evaluation and ``embed`` then read the
items back with ``--data shards:DIR`` (:mod:`medssl.data.shards`) and only the random views remain to compute.

The output folder holds LitData's chunks and ``index.json``, ``medssl-shards.json`` (the manifest: source spec,
preprocessing, geometry, and per item its source, label, patient id and split), ``bad.csv`` (files that could not
be read, skipped unless ``fail_on_bad``) and, while the job runs, ``.medssl-prepare.json`` (the request) with
LitData's checkpoints: running the same command again after an interruption continues where it stopped. A folder
that exists and is not a ``prepare`` of the same request is refused, never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError
from medssl.fileio import atomic_write_text, ensure_output_dir

from .shards import MANIFEST, SHARDS_FORMAT

log = logging.getLogger("medssl")

STATE = ".medssl-prepare.json"
_BAD = ".bad"
_PROGRESS = ".progress"
#: Default chunk size in MB: big enough for sequential reads from object storage, small enough to spread over ranks.
DEFAULT_CHUNK_MB = 64.0

__all__ = ["PrepareResult", "prepare"]


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote.

    Attributes:
        out: the prepared folder.
        num_items: items written.
        bad: ``(source, reason)`` of the items that could not be read (listed in ``bad.csv``).
        seconds: wall time of this call.
        resumed: the call finished an interrupted prepare (``already`` when there was nothing left to do).
        already: the folder already held this complete prepare.
    """

    out: Path
    num_items: int
    bad: list[tuple[str, str]]
    seconds: float
    resumed: bool = False
    already: bool = False


class _ItemWriter:
    """LitData's ``fn``: item ``index`` of the source as a dict of arrays, ``None`` (skipped) when unreadable.

    Picklable (workers are spawned): each worker process opens the source once.
    """

    def __init__(self, data: Any, out: str) -> None:
        self.data, self.out = data, out
        self._ds: Any = None
        self._tick: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None, "_tick": None}

    def _dataset(self) -> Any:
        if self._ds is None:
            import torch

            # one thread per worker, as in DataLoader workers: no oversubscription, and no OpenMP thread team
            # inherited through fork from a parent that ran parallel torch ops (it would deadlock)
            torch.set_num_threads(1)
            self._ds = open_source(self.data)
            self._tick = open(Path(self.out) / _PROGRESS / f"{os.getpid()}", "ab", buffering=0)  # noqa: SIM115
        return self._ds

    def __call__(self, index: int) -> dict[str, Any] | None:
        ds = self._dataset()
        try:
            item = ds[index]
        except DataError as e:
            atomic_write_text(Path(self.out) / _BAD / f"{index}.json",
                              json.dumps({"index": index, "source": ds.sources[index], "reason": str(e)}))
            return None
        finally:
            self._tick.write(b".")
        out = {"index": int(index), "image": np.ascontiguousarray(item["image"].numpy(), dtype=np.float32)}
        if "mask" in item:
            out["mask"] = np.ascontiguousarray(item["mask"].numpy(), dtype=np.int64)
        return out


@dataclass
class SourceSpec:
    """The data settings of a plain spec string (the API and the CLI pass a ``DataConfig`` instead)."""

    spec: str
    image_size: int | None = None
    task: str | None = None
    intensity: Any = None
    follow_symlinks: bool = False
    skip_bad: bool = True
    splits: str | None = None
    cache: bool = False
    cache_dir: str | None = None


#: ``data`` settings that do not shape an item: left out of the request (and of what makes two prepares the same).
RUNTIME_KEYS = frozenset({"num_workers", "split", "skip_bad", "cache", "cache_dir", "splits", "shuffle_buffer"})


def open_source(data: Any) -> Any:
    """The source dataset with every setting of ``data`` that shapes an item (as a run would open it), without the
    item cache, a split manifest or the check for unreadable files (they are listed instead)."""
    from .specs import open_from_config

    if is_dataclass(data):
        data = replace(data, skip_bad=True, splits=None)
    return open_from_config(data, cache=False)


def _request(data: Any) -> dict[str, Any]:
    """What the prepare is of: the ``data`` settings that shape an item, as plain values."""
    return {f.name: _plain(getattr(data, f.name)) for f in fields(data) if f.name not in RUNTIME_KEYS}


def _fingerprint(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def _check_out(out: Path, request: dict[str, Any]) -> str:
    """``new``, ``resume`` or ``done``: what ``out`` holds for this request.

    Raises:
        DataError: ``out`` exists, is not empty and is not a prepare of the same request.
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a directory")
    if not any(out.iterdir()):
        return "new"
    state = out / STATE
    if not state.is_file():
        raise DataError(f"--out {out}: exists and is not a `medssl prepare` folder; medssl never overwrites it, "
                        "choose a new --out")
    try:
        saved = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--out {out}: {state} is unreadable ({e}); choose a new --out") from None
    if not isinstance(saved, dict) or saved.get("fingerprint") != _fingerprint(request):
        was = saved.get("request", {}).get("spec") if isinstance(saved, dict) else None
        raise DataError(f"--out {out}: holds a prepare of another input or preprocessing (spec {was!r}); medssl "
                        "never overwrites it, choose a new --out")
    return "done" if (out / MANIFEST).is_file() else "resume"


class _Bar:
    """A rich progress bar over the workers' tick files (a terminal only; nothing otherwise)."""

    def __init__(self, folder: Path, total: int, enabled: bool) -> None:
        self.folder, self.total = folder, total
        self.enabled = enabled and sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _count(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.folder.iterdir())
        except OSError:
            return 0

    def _run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("items", total=self.total)
            while not self._stop.wait(0.25):
                bar.update(task, completed=self._count())

    def __enter__(self) -> _Bar:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _to_list(values: np.ndarray | None) -> Any:
    return None if values is None else np.asarray(values).tolist()


def prepare(
    data: Any, out: str | Path, *, image_size: int | None = None, task: str | None = None, workers: int = 1,
    chunk_mb: float = DEFAULT_CHUNK_MB, fail_on_bad: bool = False, progress: bool = True,
) -> PrepareResult:
    """Write the items of ``data`` (preprocessed as a run would read them) as shards in ``out``.

    Args:
        data: a ``DataConfig`` (every setting that shapes an item is applied and recorded: size, task, intensity,
            resampling ...), or a spec string (any spec, ``shards:`` too: re-sharding at another chunk size) with
            ``image_size`` and ``task``.
        out: the folder to write; it must not exist, be empty, or hold an interrupted prepare of the same request.
        image_size, task: with a spec string, the item size and label task.
        workers: worker processes (LitData's ``num_workers``).
        chunk_mb: target size of one shard in MB.
        fail_on_bad: an unreadable item is an error (after the others are written) instead of a line in ``bad.csv``.
        progress: show a progress bar on a terminal.

    Raises:
        DataError: bad spec or settings, an ``out`` that is not a prepare of this request, no readable item, or
            (``fail_on_bad``) any unreadable item.
    """
    t0 = time.perf_counter()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers!r}")
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, int | float) or not np.isfinite(chunk_mb) or \
            not 0 < chunk_mb <= 4096:
        raise DataError(f"--chunk-mb must be a number in (0, 4096], got {chunk_mb!r}")
    out = Path(out).expanduser()
    if isinstance(data, str):
        data = SourceSpec(data, image_size=image_size, task=task)
    spec = data.spec
    request = _request(data)
    mode = _check_out(out, request)
    ds = open_source(data)
    if ds.spatial_dims == 3 and getattr(data, "volume_mode", "resize") == "patches":
        raise DataError(f"prepare {spec}: shards hold fixed-size items; for 3D data add --set data.volume_mode=resize "
                        "(volumes resized to --image-size). data.volume_mode: patches (random crops of native-size "
                        "volumes) reads the source files, with the item cache")
    if mode == "done":
        manifest = json.loads((out / MANIFEST).read_text())
        bad = [(b["source"], b["reason"]) for b in manifest.get("bad", [])]
        return PrepareResult(out, len(manifest["items"]["sources"]), bad, time.perf_counter() - t0, True, True)
    if fail_on_bad:
        ds.check_open_errors()
    ensure_output_dir(out)
    fingerprint = _fingerprint(request)
    atomic_write_text(out / STATE, json.dumps({"fingerprint": fingerprint, "request": request}, indent=1,
                                              default=str))
    for sub in (_BAD, _PROGRESS):
        (out / sub).mkdir(exist_ok=True)
    for i, reason in ds.open_errors.items():
        atomic_write_text(out / _BAD / f"{i}.json", json.dumps({"index": i, "source": ds.sources[i], "reason": reason}))
    todo = [i for i in range(len(ds)) if i not in ds.open_errors]
    if not todo:
        raise DataError(f"data {spec}: no readable item to prepare")
    writer = _ItemWriter(data, str(out))
    if not (out / "index.json").is_file() or (out / ".checkpoints").exists():  # else LitData had finished
        _optimize(writer, todo, out, workers=min(workers, len(todo)), chunk_mb=chunk_mb, progress=progress)
    bad_rows = sorted((json.loads(p.read_text()) for p in (out / _BAD).glob("*.json")), key=lambda b: b["index"])
    bad_index = {int(b["index"]) for b in bad_rows}
    keep = np.array([i for i in range(len(ds)) if i not in bad_index], dtype=np.int64)
    bad = [(str(b["source"]), str(b["reason"])) for b in bad_rows]
    if fail_on_bad and bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"prepare {spec}: {bad[0][0]}: {bad[0][1]}{more}; the readable items are written in {out}; "
                        "run without --fail-on-bad to finish with them (the unreadable ones listed in bad.csv)")
    if not len(keep):
        raise DataError(f"data {spec}: no readable item (first problem: {bad[0][1] if bad else 'empty'})")
    _verify_order(out, keep, spec)
    manifest = {
        "format": "medssl-shards", "version": SHARDS_FORMAT, "fingerprint": fingerprint, "request": request,
        "preprocessing": ds.preprocessing(), "source": spec,
        "geometry": {"spatial_dims": ds.spatial_dims, "in_chans": ds.in_chans, "image_size": ds.image_size,
                     "has_masks": ds.has_masks},
        "task": ds.task, "tasks": [ds.task] if ds.task else [], "class_names": list(ds.class_names),
        "multilabel": ds.multilabel,
        "items": {"sources": [ds.sources[i] for i in keep], "source_index": keep.tolist(),
                  "labels": None if ds.labels is None else _to_list(ds.labels[keep]),
                  "patient_ids": _to_list(ds.patient_ids[keep]), "splits": _to_list(ds.splits[keep])},
        "bad": [{"source": s, "reason": r} for s, r in bad],
    }
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(bad)
    atomic_write_text(out / "bad.csv", buf.getvalue())
    atomic_write_text(out / MANIFEST, json.dumps(manifest, default=str))
    shutil.rmtree(out / _PROGRESS, ignore_errors=True)
    return PrepareResult(out, len(keep), bad, time.perf_counter() - t0, resumed=mode == "resume")


def _optimize(writer: _ItemWriter, todo: list[int], out: Path, *, workers: int, chunk_mb: float,
              progress: bool) -> None:
    """LitData's ``optimize`` over ``todo`` in order (``use_checkpoint``: an interrupted job continues)."""
    try:
        from litdata import optimize
    except ImportError as e:  # pragma: no cover - a dependency
        raise DataError(f"medssl prepare needs litdata ({e}): pip install litdata zstandard") from None
    with _Bar(out / _PROGRESS, len(todo), progress), open(os.devnull, "w") as null:
        stdout = sys.stdout
        sys.stdout = null  # LitData prints its own progress lines; ours is the bar
        try:
            optimize(writer, todo, output_dir=str(out), chunk_bytes=int(chunk_mb * 1e6), num_workers=workers,
                     compression="zstd", compression_level="sample", keep_data_ordered=True, use_checkpoint=True,
                     reorder_files=False, verbose=False, start_method=_start_method())
        except DataError:
            raise
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])
            text = next((line for line in reversed(first) if line.strip()), type(e).__name__)[:300]
            raise DataError(f"prepare {writer.data.spec} -> {out}: a worker failed ({text}); run the same "
                            "command again to continue") from None
        finally:
            sys.stdout = stdout


def _verify_order(out: Path, keep: np.ndarray, spec: str) -> None:
    """The first item of every chunk is the source item the manifest puts there (LitData kept the order)."""
    from .shards import _chunk_table

    names, starts, _ = _chunk_table(out, f"prepare {spec}", remote=False)
    if int(starts[-1]) != len(keep):
        raise DataError(f"prepare {spec} -> {out}: the shards hold {int(starts[-1])} items, {len(keep)} were "
                        "expected; remove the folder and prepare again")
    from litdata import StreamingDataset

    stream = StreamingDataset(str(out))
    for pos in starts[:-1]:
        got = int(stream[int(pos)]["index"])
        if got != int(keep[pos]):
            raise DataError(f"prepare {spec} -> {out}: shard order differs from the source (position {pos} holds "
                            f"item {got}, expected {int(keep[pos])}); remove the folder and prepare again")


def _start_method() -> str:
    """``fork`` where it exists (workers start in milliseconds, as DataLoader workers do), else ``spawn``."""
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() and sys.platform != "darwin" else "spawn"
