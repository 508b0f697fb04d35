"""`medssl pretrain --devices 2` on the CPU: Fabric launches 2 gloo processes; the run completes and exports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medssl.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_two_process_pretraining_run(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "medssl", "pretrain", "--method", "mocov2", "--data", "phantom2d:128",
           "--image-size", "32", "--batch-size", "8", "--max-steps", "4", "--devices", "2", "--out", str(out),
           "--set", "method.queue_size=32", "--set", "train.log_every_n_steps=2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run written to") == 1  # rank 0 reports once
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["step"] == 4
    assert len(ckpt["rng"]) == 2  # every rank's RNG state is saved
    # 4 steps × global batch 16 keys entered the 32-slot queue: two full turns, pointer back at 0
    assert int(ckpt["model"]["queue_ptr"]) == 0
    assert torch.isfinite(ckpt["model"]["queue"]).all()
    assert (out / "encoder.safetensors").is_file()
