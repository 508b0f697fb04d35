"""Output paths are checked before any work: a file where a directory is expected is one StorageError."""

from __future__ import annotations

import pytest

from medssl.errors import StorageError
from medssl.fileio import check_output_file, ensure_output_dir


def test_ensure_output_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    assert ensure_output_dir(tmp_path / "a" / "b").is_dir()
    assert ensure_output_dir(tmp_path / "a") == tmp_path / "a"  # existing directory: fine
    with pytest.raises(StorageError, match=r"--out .*/f: is a file, not a directory"):
        ensure_output_dir(tmp_path / "f")
    with pytest.raises(StorageError, match=r"results directory .*/f/g/h: .*/f is a file, not a directory"):
        ensure_output_dir(tmp_path / "f" / "g" / "h", "results directory")
    assert not (tmp_path / "f" / "g").exists()


def test_check_output_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output_file(tmp_path / "new" / "r.html") == tmp_path / "new" / "r.html"
    with pytest.raises(StorageError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(StorageError, match=r"r.html: .*/f is a file"):
        check_output_file(tmp_path / "f" / "r.html")


def test_pretrain_resume_without_a_run_says_so(tmp_path):
    from medssl.api import pretrain
    from medssl.errors import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="nothing to resume in .*empty"):
        pretrain(out=tmp_path / "empty", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume in .*missing .the directory does not exist"):
        pretrain(out=tmp_path / "missing", resume=True)
