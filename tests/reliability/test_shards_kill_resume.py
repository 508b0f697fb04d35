"""``medssl pretrain --devices 2 --data shards:...`` killed with SIGKILL mid-epoch, then ``--resume``: every rank
reads exactly the batches an uninterrupted run reads after the checkpoint (nothing repeated, nothing skipped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medssl.data.prepare import prepare
from medssl.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.ddp, pytest.mark.timeout(900)]

N, BATCH, STEPS = 64, 4, 12  # 2 ranks x 4 = 8 per step: 8 steps per epoch, the kill lands inside epoch 0
RECORDER = """
import os, sys
from medssl.engine import trainer as T
_step = T.Trainer._step
def _recorded(self, batch, epoch):
    with open(os.environ["SHARDS_REC"] + f".{self.fabric.global_rank}", "a") as f:
        f.write(f"{self.state.step} " + ",".join(map(str, batch["index"].tolist())) + "\\n")
    return _step(self, batch, epoch)
T.Trainer._step = _recorded
from medssl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(script: Path, shards: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, str(script), "pretrain", "--method", "mocov2", "--data", f"shards:{shards}",
            "--image-size", "16", "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--devices", "2",
            "--set", "train.accelerator=cpu", "--out", str(out), "--quiet", "--set", "data.split=all",
            "--set", "data.shuffle_buffer=8", "--set", "method.queue_size=32", "--set", "checkpoint.every_n_steps=3",
            ] + (["--resume"] if resume else [])


def _records(rec: Path) -> dict[tuple[int, int], list[int]]:
    """``(rank, step) -> item indices`` of the batch each rank fed at that step (a rerun step overwrites)."""
    out: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        p = Path(f"{rec}.{rank}")
        for line in p.read_text().splitlines():
            step, idx = line.split(" ")
            out[(rank, int(step))] = [int(i) for i in idx.split(",")]
    return out


def _run(args: list[str], rec: Path) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "SHARDS_REC": str(rec), "OMP_NUM_THREADS": "1"})


def test_sigkill_mid_epoch_then_resume_reads_the_remaining_batches(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    prepare(f"phantom2d:{N}", shards, image_size=16, workers=1, chunk_mb=0.006, progress=False)
    script = tmp_path / "rec.py"
    script.write_text(RECORDER)

    ref = _run(_cmd(script, shards, tmp_path / "ref", False), tmp_path / "ref.rec")
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    reference = _records(tmp_path / "ref.rec")
    assert sorted(reference) == [(r, s) for r in (0, 1) for s in range(STEPS)]
    epoch0 = sorted(i for (r, s), idx in reference.items() if s < 8 for i in idx)
    assert epoch0 == list(range(N))  # both ranks together: every item once in the epoch

    out, rec = tmp_path / "run", tmp_path / "run.rec"
    proc = _run(_cmd(script, shards, out, False), rec)
    t0 = time.time()
    while time.time() - t0 < 600 and proc.poll() is None:  # kill once step 4 is under way (checkpoint at 3)
        p = Path(f"{rec}.0")
        if p.is_file() and any(line.startswith("4 ") for line in p.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert 0 < int(ckpt["step"]) < 8 and ckpt["loader"]["kind"] == "shards"  # mid-epoch, loader state saved
    assert ckpt["loader"]["batch"] == int(ckpt["step"]) and ckpt["loader"]["world_size"] == 2

    resumed = _run(_cmd(script, shards, out, True), rec)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert _records(rec) == reference  # steps after the checkpoint: the same batches on the same ranks
    assert int(load_checkpoint(out / "checkpoints" / "last.ckpt")["step"]) == STEPS
