"""Atomic file writes: a reader sees the old file or the new one, complete, never a half-written one.

:func:`atomic_write` writes through a temporary file in the destination's directory (so the final rename
never crosses file systems), flushes and fsyncs it, gives it the mode an ordinary ``open(path, "w")`` would
(``0o666`` minus the umask; ``mkstemp`` creates ``0o600``), renames it over the destination (atomic on
POSIX file systems) and fsyncs the directory entry. If anything fails — a full disk, a read-only file
system, an interrupt — the temporary file is removed and the previous file, if any, is untouched.

Temporary files are named ``.<name>.<random>.tmp``; :func:`remove_stale_temps` deletes the ones a killed
process (``kill -9``) left behind. Failures of the disk are raised as :class:`~medssl.errors.StorageError`
naming the file and the cause ("no space left on device", "read-only file system").
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from medssl.errors import StorageError

TEMP_SUFFIX = ".tmp"


def default_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def describe_os_error(e: OSError) -> str:
    """A short human cause of an OS error: ``no space left on device``, ``read-only file system``, ..."""
    known = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded",
             errno.ENOTDIR: "a parent path is a file, not a directory", errno.EISDIR: "it is a directory"}
    return known.get(e.errno or -1, e.strerror or type(e).__name__)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary binary file that then replaces ``path``.

    Args:
        path: the destination; its parent directories are created.
        write: fills the open temporary file (e.g. ``lambda f: torch.save(obj, f)``); it must not close it.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        StorageError: the disk refused (full, read-only, no permission, a parent is a file); the previous
            file at ``path`` is unchanged and no temporary file is left.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {describe_os_error(e)}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _file_parent(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` that is not a directory, if any."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Check, before any work is done, that the output file ``path`` can be written: it is not a directory and
    no parent of it is a file.

    Raises:
        StorageError: naming ``flag``, the path and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{flag} {path}: is a directory; give a file name")
    parent = _file_parent(path)
    if parent is not None:
        raise StorageError(f"{flag} {path}: {parent} is a file, not a directory")
    return path


def ensure_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output directory ``path`` (and its parents) before any work is done, or say why it cannot be.

    Raises:
        StorageError: ``path`` is an existing file, a parent of it is a file, or the disk refused (read-only file
            system, no permission); the message names ``flag`` and the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{flag} {path}: is a file, not a directory")
    parent = _file_parent(path)
    if parent is not None:
        raise StorageError(f"{flag} {path}: {parent} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{flag} {path}: cannot create the directory: {describe_os_error(e)}") from None
    return path


def remove_stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete temporary files :func:`atomic_write` left in ``directory`` when its process was killed.

    Only names of the form ``.<name>.*.tmp`` (any ``name`` when ``None``) are touched. Call it where no other
    process can be writing into ``directory`` (e.g. while holding the run-directory lock).

    Returns:
        The removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    removed = []
    for p in directory.glob(pattern):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
