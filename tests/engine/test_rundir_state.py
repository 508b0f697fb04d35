"""Run-directory checks and lock fallbacks, and the one-line description of a checkpoint that does not fit."""

from __future__ import annotations

import errno
import fcntl
import logging

import pytest
import torch

from medssl.engine.rundir import RunDir, check_out_dir
from medssl.engine.state import describe_mismatch
from medssl.errors import ConfigError, StorageError


def test_describe_mismatch_counts_and_names_the_first_keys():
    model = {f"w{i}": torch.zeros(2) for i in range(6)} | {"conv": torch.zeros(8, 3, 3, 3)}
    ckpt = {f"w{i}": torch.zeros(2) for i in range(2)} | {"old_a": torch.zeros(1), "conv": torch.zeros(8, 1, 7, 7)}
    assert describe_mismatch(model, ckpt) == (
        "4 missing key(s) (w2, w3, w4, ... 1 more); 1 unexpected key(s) (old_a); "
        "1 key(s) with another shape (conv [8, 1, 7, 7] -> [8, 3, 3, 3])")
    assert describe_mismatch(model, dict(model)) is None


def test_out_dir_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file, not a directory$"):
        check_out_dir(tmp_path / "f", "phantom2d")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'f'} is a file, not a directory$"):
        check_out_dir(tmp_path / "f" / "deeper" / "run", "phantom2d")
    with pytest.raises(ConfigError, match="inside the data folder"):
        check_out_dir(tmp_path / "imgs" / "run", f"folder:{tmp_path / 'imgs'}")
    with pytest.raises(ConfigError, match="inside the data folder"):  # however the path is spelled
        check_out_dir(tmp_path / "imgs" / ".." / "imgs" / "run", f"FOLDER:{tmp_path / 'imgs'}/")
    check_out_dir(tmp_path / "imgs2" / "run", f"folder:{tmp_path / 'imgs'}")  # a sibling is fine
    check_out_dir(tmp_path / "imgs" / "run", f"csv:{tmp_path / 'imgs' / 'm.csv'}")  # only folder: walks its root


def _flock_failing_with(code):
    real = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(code, "refused")
        return real(fd, op)

    return flock


def test_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fcntl, "flock", _flock_failing_with(errno.ENOLCK))
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(logging.getLogger("medssl"), "propagate", True)  # the CLI may have turned it off
    with caplog.at_level(logging.WARNING, logger="medssl"):
        run.acquire()
    run.release()
    assert "nothing stops a second run" in caplog.text


def test_other_lock_errors_are_one_storage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _flock_failing_with(errno.EIO))
    with pytest.raises(StorageError, match=r"^cannot lock .*\.lock: refused$"):
        RunDir(tmp_path / "run").acquire()
