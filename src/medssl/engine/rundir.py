"""The run directory: where a run keeps its files, and the lock that makes it one run's alone.

Layout (``RUN`` is ``--out``)::

    RUN/.lock                  held (fcntl.flock) by the one process writing the run; holds its pid
    RUN/config.yaml            the resolved config
    RUN/metrics.csv            one row per log step
    RUN/skipped.csv            with --skip-bad: the unreadable items, written as soon as they are known
    RUN/splits.csv             which items pretraining read (a split manifest, reusable with --splits)
    RUN/checkpoints/last.ckpt  the newest complete checkpoint

The lock is an OS advisory lock on an open file (``flock(LOCK_EX | LOCK_NB)``): the kernel releases it when
the process ends in any way, ``kill -9`` included, so a dead run never leaves a stale lock behind; the
``.lock`` file itself stays and is harmless. Under DDP only global rank 0 locks (the other ranks are the same
run) and tells the others whether it got the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medssl.config import PretrainConfig, save_config
from medssl.errors import CheckpointError, ConfigError, MedsslError, RunLockedError, StorageError
from medssl.fileio import describe_os_error, remove_stale_temps

log = logging.getLogger("medssl")

LOCK_NAME = ".lock"
#: ``flock`` errors of file systems that have no locks at all (some network / parallel file systems): the run
#: goes on unlocked, with a warning, rather than not at all.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


def _first_existing_ancestor(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return parent
    return None


def check_out_dir(out: Path, data_spec: str) -> None:
    """Refuse an ``--out`` the run could not or must not write, before anything is created.

    Raises:
        ConfigError: ``out`` is a file, lies under a file, or lies inside the root of a ``folder:DIR`` data
            spec (the run's own images, e.g. reconstructions, would become data on the next read).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    ancestor = _first_existing_ancestor(out.absolute())
    if ancestor is not None and not ancestor.is_dir():
        raise ConfigError(f"--out {out}: {ancestor} is a file, not a directory")
    prefix, sep, arg = str(data_spec).partition(":")
    if prefix.strip().lower() == "folder" and sep and arg:
        root = Path(arg).expanduser().resolve()
        target = out.expanduser().resolve()
        if target == root or root in target.parents:
            raise ConfigError(f"--out {out}: inside the data folder {root} of --data {data_spec}; the run's own "
                              "images would be read as data next time, choose an --out outside it")


class RunDir:
    """The files of one run directory, its lock, and the files written when training starts.

    Args:
        root: the run directory (``--out``); created by :meth:`acquire`.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    def check(self, data_spec: str, *, resume: bool = False) -> None:
        """Refuse an unusable ``--out`` (:func:`check_out_dir`), or ``resume`` without a checkpoint, before
        anything is written.

        Raises:
            ConfigError: see :func:`check_out_dir`.
            CheckpointError: ``resume`` and there is no ``checkpoints/last.ckpt``.
        """
        check_out_dir(self.root, data_spec)
        if resume and not self.last.is_file():
            raise CheckpointError(f"--resume: {self.last} does not exist (nothing to resume in {self.root})")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    def acquire(self) -> None:
        """Create the directory, take its lock and remove temp files a killed writer left behind.

        Raises:
            StorageError: the directory cannot be created or locked (read-only, no permission, full).
            RunLockedError: another live process holds the lock.
        """
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StorageError(f"cannot create run directory {self.root}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunLockedError(f"run directory {self.root} is in use by another medssl process{who}; wait for it "
                                 "to finish or choose another --out") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise StorageError(f"cannot lock {self.lock_file}: {describe_os_error(e)}") from None
            log.warning("cannot lock %s (%s: the file system has no locks); nothing stops a second run on this "
                        "directory", self.lock_file, describe_os_error(e))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        stale = remove_stale_temps(self.checkpoints) + remove_stale_temps(self.root)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted write: %s", len(stale),
                     ", ".join(p.name for p in stale))

    def release(self) -> None:
        """Give the lock back (closing the file releases it; the file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self, fabric: Any) -> Iterator[RunDir]:
        """Hold the lock for the body (global rank 0 only); every rank raises rank 0's error, if any."""
        error: MedsslError | None = None
        if fabric.is_global_zero:
            try:
                self.acquire()
            except MedsslError as e:
                error = e
        error = fabric.broadcast(error, src=0)
        if error is not None:
            raise error
        try:
            yield self
        finally:
            self.release()

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """List the items ``--skip-bad`` dropped (``path, reason``) in ``skipped.csv``."""
        from medssl.data.manifest import write_skipped

        try:
            write_skipped(list(skipped), self.skipped)
        except OSError as e:
            raise StorageError(f"cannot write {self.skipped}: {describe_os_error(e)}") from None

    def write_start(self, cfg: PretrainConfig, dataset: Any, indices: Any) -> None:
        """Write the resolved ``config.yaml`` and the split manifest of the items pretraining reads."""
        from medssl.data.splits import write_split_manifest

        save_config(cfg, self.config)
        try:  # split == train, or every non-test item: reusable with --splits
            write_split_manifest(dataset, self.splits, {"subset:pretrain": indices})
        except OSError as e:
            raise StorageError(f"cannot write {self.splits}: {describe_os_error(e)}") from None
