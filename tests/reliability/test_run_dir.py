"""The run directory under hostile conditions: two writers, kill -9, stale temp files, a full or read-only disk
while checkpointing, planted checkpoints, a resumed run of another model, skipped.csv on a failing run."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.cli import main
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.rundir import RunDir
from medssl.errors import RunLockedError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = ["--method", "mocov2", "--data", "phantom2d:64", "--image-size", "16", "--batch-size", "8",
        "--set", "method.queue_size=32", "--set", "train.collapse_every_n_steps=0", "--quiet"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medssl", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("medssl: error:")]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.is_file() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.1)
    assert path.is_file(), proc.stderr.read() if proc.poll() is not None else "timed out"


def test_second_writer_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cli("pretrain", *TINY, "--max-steps", "100000", "--out", str(out), "--set",
                                  "checkpoint.every_n_steps=1", "--set", "train.log_every_n_steps=1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(out / "checkpoints" / "last.ckpt", first)
        first.send_signal(signal.SIGSTOP)  # still holds the lock; leaves the CPU to the others meanwhile
        for extra in ([], ["--resume"]):
            second = subprocess.run(_cli("pretrain", *TINY, "--max-steps", "3", "--out", str(out), *extra),
                                    capture_output=True, text=True, timeout=300, env=_env())
            assert second.returncode == 2, second.stderr
            assert _error_lines(second.stderr) == [
                f"medssl: error: run directory {out} is in use by another medssl process (pid {first.pid}); wait "
                "for it to finish or choose another --out"], second.stderr
            assert "Traceback" not in second.stderr
        rows = len((out / "metrics.csv").read_text().splitlines())
        first.send_signal(signal.SIGCONT)
        t0 = time.time()
        while len((out / "metrics.csv").read_text().splitlines()) <= rows and time.time() - t0 < 120:
            time.sleep(0.1)
        assert first.poll() is None  # the first run never noticed: it trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    steps = [int(float(r["step"])) for r in csv.DictReader((out / "metrics.csv").open())]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or duplicated rows
    saved = int(load_checkpoint(out / "checkpoints" / "last.ckpt")["step"])
    # kill -9 released the lock with the process: the run resumes at once
    third = subprocess.run(_cli("pretrain", "--out", str(out), "--resume", "--max-steps", str(saved + 2), "--quiet"),
                           capture_output=True, text=True, timeout=300, env=_env())
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["step"] == saved + 2


def test_lock_is_held_in_process_and_released_after_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.acquire()
    try:
        with pytest.raises(RunLockedError, match=f"run directory {tmp_path / 'run'} is in use .*pid {os.getpid()}"):
            RunDir(tmp_path / "run").acquire()  # another open file description: refused like another process
    finally:
        run.release()
    again = RunDir(tmp_path / "run")
    again.acquire()
    again.release()


def test_resume_with_nothing_to_resume_creates_nothing(tmp_path, capsys):
    out = tmp_path / "typo" / "run"
    assert main(["pretrain", *TINY, "--max-steps", "2", "--out", str(out), "--resume"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"medssl: error: --resume: {out / 'checkpoints' / 'last.ckpt'} does not exist (nothing to resume in {out})"]
    assert not (tmp_path / "typo").exists()


def test_stale_checkpoint_temps_are_removed_on_start_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".last.ckpt.k1ll3d.tmp").write_bytes(b"\x80" * 4096)  # what kill -9 inside a write leaves
    assert main(["pretrain", *TINY, "--max-steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    (ckpts / ".last.ckpt.ag41n.tmp").write_bytes(b"\x80" * 4096)
    (ckpts / ".step_0000002.ckpt.tmp").write_bytes(b"")  # a rotation's link interrupted
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(ckpts / "last.ckpt")["step"] == 3


@pytest.mark.parametrize(("code", "text"), [(errno.ENOSPC, "no space left on device"),
                                            (errno.EROFS, "read-only file system")])
def test_full_or_read_only_disk_while_checkpointing(tmp_path, monkeypatch, capsys, code, text):
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4: some bytes reach the temp file, then the disk refuses
            f.write(b"\x80" * 1024)
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--max-steps", "6", "--out", str(out), "--set",
                 "checkpoint.every_n_steps=2"]) == 2
    err = capsys.readouterr().err
    last = out / "checkpoints" / "last.ckpt"
    assert _error_lines(err) == [f"medssl: error: cannot write {last}: {text}"], err
    assert "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(last)["step"] == 2  # the previous checkpoint, intact
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temp file left


class _TouchOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["pretrain", "evaluate"])
def test_planted_checkpoint_never_runs_through_the_cli(tmp_path, command):
    marker = tmp_path / "marker"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(pickle.dumps({"step": 1, "model": _TouchOnLoad(marker), "config": {}}))
    if command == "pretrain":
        args = ("pretrain", *TINY, "--max-steps", "2", "--out", str(tmp_path / "run"), "--resume")
    else:
        args = ("evaluate", "--checkpoint", str(last), "--data", "phantom2d:64", "--protocol", "knn",
                "--out", str(tmp_path / "ev"))
    proc = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert len(_error_lines(proc.stderr)) == 1 and str(last) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mismatch") / "run"
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(("change", "expected"), [
    (["--backbone", "resnet34"], r"does not fit method 'mocov2' with backbone 'resnet34': \d+ missing key\(s\) "
                                 r"\(backbone\.layer1\.2\.conv1\.weight, .*, \.\.\. \d+ more\)$"),
    (["--set", "model.stem=cifar"], r"'resnet18': 2 key\(s\) with another shape \(backbone\.conv1\.weight "
                                    r"\[64, 1, 7, 7\] -> \[64, 1, 3, 3\], key_backbone\.conv1\.weight .*\)$"),
    (["--method", "gravis"], r"does not fit method 'gravis' with backbone 'resnet18': .*unexpected key\(s\) "
                             r"\(.*queue"),
])
def test_resume_force_with_another_model_says_what_does_not_match_in_one_line(one_step_run, tmp_path, capsys,
                                                                               change, expected):
    import re
    import shutil

    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    assert main(["pretrain", "--out", str(out), "--resume", "--force", "--max-steps", "2", "--quiet", *change]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert lines[0].startswith(f"medssl: error: checkpoint {out / 'checkpoints' / 'last.ckpt'} does not fit")
    assert re.search(expected, lines[0]), lines[0]
    assert len(lines[0]) < 600
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["step"] == 1  # untouched


def test_skipped_csv_is_written_even_when_the_run_then_fails(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(data / f"img_{i}.png")
    good = (data / "img_0.png").read_bytes()
    (data / "img_0.png").write_bytes(good[: len(good) // 3])  # header intact, pixels cut off
    out = tmp_path / "run"
    # 8 images, one unreadable: the batch of 64 cannot be filled, so the run fails after the skip
    proc = subprocess.run(_cli("pretrain", "--method", "mocov2", "--data", f"folder:{data}", "--image-size", "16",
                               "--batch-size", "64", "--max-steps", "1", "--skip-bad", "--no-cache", "--out", str(out),
                               "--quiet"), capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert f"listed in {out / 'skipped.csv'}" in proc.stderr and "fewer than one batch" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = list(csv.DictReader((out / "skipped.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["img_0.png"] and rows[0]["reason"]
