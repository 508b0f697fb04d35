"""Atomic checkpoints: never a half-written ``last.ckpt``.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then renamed over
the previous one (an atomic operation on POSIX file systems), and the directory entry is fsynced. A crash
at any moment leaves either the old or the new checkpoint, complete.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import CheckpointError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_and_rotate(obj: Any, last: str | Path, *, step: int, keep_last_k: int = 1) -> None:
    """Write ``last`` atomically; with ``keep_last_k > 1`` also keep it as ``step_XXXXXXX.ckpt`` beside it.

    The step files are hard links to the inode ``last`` has now: when the next checkpoint replaces ``last`` by
    rename, the old file lives on under its step name only, so keeping k checkpoints costs k files, not k + 1.
    Only the ``k`` newest step files are kept; the newest is the same file as ``last``.
    """
    last = Path(last)
    atomic_save(obj, last)
    if keep_last_k <= 1:
        return
    named = last.parent / f"step_{int(step):07d}.ckpt"
    tmp = named.with_name(f".{named.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(last, tmp)
    os.replace(tmp, named)
    kept = sorted(last.parent.glob("step_*.ckpt"))
    for old in kept[: max(0, len(kept) - keep_last_k)]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path}: not a medssl training checkpoint")
    return ckpt


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
