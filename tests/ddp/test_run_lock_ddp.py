"""Under DDP only global rank 0 locks the run directory and tells the other ranks: a locked directory ends the
2-process job with the lock error on every rank, exit 2, no hang and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from medssl.engine.rundir import RunDir

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_locked_run_directory_stops_every_rank(tmp_path):
    out = tmp_path / "ddp"
    holder = RunDir(out)
    holder.acquire()  # this test process is "the other run"
    try:
        cmd = [sys.executable, "-m", "medssl", "pretrain", "--method", "mocov2", "--data", "phantom2d:64",
               "--image-size", "16", "--batch-size", "4", "--max-steps", "2", "--devices", "2", "--out", str(out),
               "--set", "method.queue_size=16", "--quiet"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert time.monotonic() - t0 < 300
    finally:
        holder.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = f"medssl: error: run directory {out} is in use by another medssl process (pid {os.getpid()})"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medssl: error:")]
    assert lines and all(ln.startswith(expected) for ln in lines), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (out / "metrics.csv").exists() and not (out / "checkpoints" / "last.ckpt").exists()
