"""medssl.fileio: atomic writes keep the old file on failure, leave no temp file, name the cause."""

from __future__ import annotations

import errno

import pytest

from medssl.errors import StorageError
from medssl.fileio import atomic_write, atomic_write_text, default_mode, remove_stale_temps


def test_write_creates_parents_with_an_ordinary_mode(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "x.txt", "hi")
    assert p.read_text() == "hi"
    assert p.stat().st_mode & 0o777 == default_mode()  # not mkstemp's 0o600
    assert not list((tmp_path / "a").glob(".*"))


def test_a_failing_write_keeps_the_old_file_and_names_the_cause(tmp_path):
    p = atomic_write_text(tmp_path / "x.txt", "old")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=r"cannot write .*x\.txt: no space left on device"):
        atomic_write(p, full_disk)
    assert p.read_text() == "old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_parent_that_is_a_file_is_one_storage_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StorageError, match="x.txt"):
        atomic_write_text(tmp_path / "f" / "x.txt", "a")


def test_stale_temps_of_one_name_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".last.ckpt.abc.tmp").write_text("x")
    (tmp_path / ".other.abc.tmp").write_text("x")
    (tmp_path / "keep.tmp").write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path, "last.ckpt")] == [".last.ckpt.abc.tmp"]
    assert (tmp_path / "keep.tmp").exists() and (tmp_path / ".other.abc.tmp").exists()
    assert remove_stale_temps(tmp_path / "missing") == []
