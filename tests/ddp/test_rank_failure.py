"""A rank that raises ends the whole 2-process job with its error: no hang, a clear message, exit code != 0.

The data are PNGs whose headers are fine (the dataset opens on every rank) but one file's pixel data is cut
off, so only the rank whose shard holds that file fails, mid-epoch, while the other rank waits in a
collective. Without care the healthy rank would wait for ever.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _folder(root, n=16, bad=5):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    data = (root / f"img_{bad:02d}.png").read_bytes()
    (root / f"img_{bad:02d}.png").write_bytes(data[: len(data) // 3])  # header intact, pixels cut off
    return root / f"img_{bad:02d}.png"


def test_one_failing_rank_ends_the_job_with_its_error(tmp_path):
    bad = _folder(tmp_path / "imgs")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medssl", "pretrain", "--method", "mocov2", "--data", f"folder:{tmp_path / 'imgs'}",
           "--image-size", "32", "--batch-size", "4", "--max-steps", "6", "--devices", "2", "--out", str(out),
           "--set", "method.queue_size=16", "--no-cache", "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert bad.name in proc.stderr, proc.stderr[-3000:]  # the error names the file
    assert elapsed < 400
    assert not (out / "encoder.safetensors").exists()
    # the healthy rank says why it stopped in one line instead of a traceback from inside torch.distributed
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
