"""Checkpoints: never half-written, never executed, RNG states as plain values.

Writing goes through :func:`medssl.fileio.atomic_write` (temp file in the same directory, fsync, rename over
the previous file, fsync of the directory): a crash at any moment leaves either the old or the new checkpoint,
complete, and a full or read-only disk is a :class:`~medssl.errors.StorageError` naming the file.

Reading uses ``torch.load(weights_only=True)``: a checkpoint may hold tensors and plain Python values (dicts,
lists, tuples, numbers, strings, None) only. A file that asks the unpickler for anything else (a class, a
function: the way a planted pickle runs code) is refused with a :class:`~medssl.errors.CheckpointError`, and
nothing in it runs. That is why :func:`rng_state` stores NumPy's state as a tensor plus ints and Python's as
a list of ints.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import CheckpointError, StorageError
from medssl.fileio import atomic_write, describe_os_error
from medssl.fileio import default_mode as _default_mode  # noqa: F401  (export.py still imports it from here)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`medssl.fileio.atomic_write`).

    Raises:
        StorageError: the disk refused the write; the previous file at ``path`` is unchanged.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def save_and_rotate(obj: Any, last: str | Path, *, step: int, keep_last_k: int = 1) -> None:
    """Write ``last`` atomically; with ``keep_last_k > 1`` also keep it as ``step_XXXXXXX.ckpt`` beside it.

    The step files are hard links to the inode ``last`` has now: when the next checkpoint replaces ``last`` by
    rename, the old file lives on under its step name only, so keeping k checkpoints costs k files, not k + 1.
    Only the ``k`` newest step files are kept; the newest is the same file as ``last``.

    Raises:
        StorageError: the disk refused a write; ``last`` is the previous complete checkpoint or the new one.
    """
    last = Path(last)
    atomic_save(obj, last)
    if keep_last_k <= 1:
        return
    named = last.parent / f"step_{int(step):07d}.ckpt"
    tmp = named.with_name(f".{named.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(last, tmp)
        os.replace(tmp, named)
        kept = sorted(last.parent.glob("step_*.ckpt"))
        for old in kept[: max(0, len(kept) - keep_last_k)]:
            old.unlink(missing_ok=True)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {named}: {describe_os_error(e)}") from None


def _unpickler_refusal(e: Exception) -> str:
    """The one useful line of torch's weights-only refusal: the global it would have imported, or the opcode."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if found:
        return f"global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return found.group(1).strip() if found else (text.splitlines() or [type(e).__name__])[0]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint onto the CPU without running anything stored in it.

    Raises:
        CheckpointError: naming the file, when it is missing, corrupt, refers to Python objects other than
            tensors and plain values (refused unread: ``weights_only=True``), or is not a medssl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = _unpickler_refusal(e)
        if what.startswith("global "):
            raise CheckpointError(
                f"checkpoint {path}: refused, it asks to import the Python object {what[7:]}; medssl loads "
                "checkpoints holding only tensors and plain values and never runs code from a file"
            ) from None
        raise CheckpointError(f"checkpoint {path}: cannot be read (not a checkpoint of tensors and plain "
                              f"values: {what})") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: not a medssl training checkpoint")
    return ckpt


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and every CUDA device, as tensors and plain values.

    Python's ``random.getstate()`` is ``(version, 625 ints, gauss_next)``; NumPy's legacy state is
    ``("MT19937", 624 uint32 keys, pos, has_gauss, cached_gaussian)``: the keys are stored as an int64 tensor,
    the rest as ints and floats, so that ``torch.load(weights_only=True)`` reads them back.
    """
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
