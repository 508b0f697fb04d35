import os, pytest
from medssl.fileio import atomic_write, atomic_write_text, remove_stale_temps
from medssl.errors import StorageError
def test_roundtrip(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "x.txt", "hi")
    assert p.read_text() == "hi" and oct(p.stat().st_mode & 0o777) != "0o600"
    assert not list(tmp_path.glob("a/.*"))
def test_failure_keeps_old(tmp_path):
    p = atomic_write_text(tmp_path / "x.txt", "old")
    def boom(f):
        f.write(b"par"); raise OSError(28, "No space left on device")
    with pytest.raises(StorageError, match="no space left on device"):
        atomic_write(p, boom)
    assert p.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))
def test_parent_is_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StorageError, match="x.txt"):
        atomic_write_text(tmp_path / "f" / "x.txt", "a")
def test_stale(tmp_path):
    (tmp_path / ".last.ckpt.abc.tmp").write_text("x"); (tmp_path / "keep.tmp").write_text("x")
    assert len(remove_stale_temps(tmp_path, "last.ckpt")) == 1
    assert (tmp_path / "keep.tmp").exists()
