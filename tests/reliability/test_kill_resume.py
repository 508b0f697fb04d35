"""Kill and resume: SIGKILL at random points and inside a checkpoint write, SIGTERM, keep-last-k.

Each interrupted run is resumed with ``--resume`` until it completes; in deterministic mode its final weights must
equal an uninterrupted run's (same data order, RNG states, queue), its step count must be right, and
``last.ckpt`` must always load (never half-written).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.api import pretrain
from medssl.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 12
OVERRIDES = ["method.queue_size=32", "train.log_every_n_steps=1", "checkpoint.every_n_steps=2",
             "train.deterministic=true"]
CLI = ["pretrain", "--method", "mocov2", "--data", "phantom2d:96", "--image-size", "16", "--batch-size", "8",
       "--max-steps", str(STEPS)] + [a for o in OVERRIDES for a in ("--set", o)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run = pretrain("mocov2", data="phantom2d:96", out=tmp_path_factory.mktemp("ref") / "run", image_size=16,
                   batch_size=8, max_steps=STEPS, progress=False, overrides=OVERRIDES)
    return load_checkpoint(run / "checkpoints" / "last.ckpt")


def _start(out: Path, resume: bool, prelude: str = "", quiet: bool = True) -> subprocess.Popen:
    code = f"{prelude}\nimport sys\nfrom medssl.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, *CLI, "--out", str(out)] + (["--resume"] if resume else [])
    args += ["--quiet"] if quiet else []
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _ckpt_step(out: Path) -> int:
    p = out / "checkpoints" / "last.ckpt"
    return int(load_checkpoint(p)["step"]) if p.is_file() else 0


def _wait_for_step(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        m = out / "metrics.csv"
        if m.is_file():
            rows = list(csv.DictReader(m.open()))
            if rows and int(float(rows[-1]["step"])) >= at_least:
                return
        time.sleep(0.05)


def _assert_equal_to_reference(out: Path, reference: dict) -> None:
    final = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert final["step"] == STEPS
    for k, v in reference["model"].items():
        assert torch.allclose(v.float(), final["model"][k].float(), atol=1e-6), k
    steps = [int(float(r["step"])) for r in csv.DictReader((out / "metrics.csv").open())]
    assert steps == list(range(1, STEPS + 1))  # resumed rows replace, never duplicate, the lost ones


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path: Path, reference: dict) -> None:
    import random

    rng = random.Random(7)
    out = tmp_path / "run"
    kills = 0
    targets = sorted(rng.sample(range(2, STEPS - 1), 3))  # kill once metrics reach these steps
    for target in targets:
        proc = _start(out, resume=(out / "checkpoints" / "last.ckpt").is_file())
        _wait_for_step(out, proc, target)
        time.sleep(rng.random() * 0.3)  # somewhere inside the next step (or its checkpoint write)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        load_checkpoint(out / "checkpoints" / "last.ckpt")  # complete after every kill
    assert kills >= 2
    proc = _start(out, resume=True, quiet=False)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "resuming" in err
    _assert_equal_to_reference(out, reference)


def test_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, reference: dict) -> None:
    # The third checkpoint write dies half-way through writing its bytes (like SIGKILL or a power cut would).
    prelude = (
        "import os, torch, medssl.engine.checkpoint as c\n"
        "_save, _n = torch.save, [0]\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    _n[0] += 1\n"
        "    if _n[0] == 3:\n"
        "        f.write(b'\\x80' * 4096); f.flush(); os._exit(137)\n"
        "    return _save(obj, f, *a, **k)\n"
        "c.torch.save = dying_save\n"
    )
    out = tmp_path / "run"
    proc = _start(out, resume=False, prelude=prelude)
    proc.communicate(timeout=600)
    assert proc.returncode == 137
    assert _ckpt_step(out) == 4  # the checkpoint of step 4 survives; the one of step 6 never replaced it
    proc = _start(out, resume=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    _assert_equal_to_reference(out, reference)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path: Path, reference: dict) -> None:
    out = tmp_path / "run"
    proc = _start(out, resume=False)
    _wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    stopped = _ckpt_step(out)
    assert 3 <= stopped < STEPS
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert int(float(rows[-1]["step"])) == stopped  # the checkpoint is of the last step that ran
    proc = _start(out, resume=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    _assert_equal_to_reference(out, reference)


def test_keep_last_k(tmp_path: Path) -> None:
    run = pretrain("mocov2", data="phantom2d:96", out=tmp_path / "k", image_size=16, batch_size=8, max_steps=10,
                   progress=False, overrides=["method.queue_size=32", "checkpoint.every_n_steps=2",
                                              "checkpoint.keep_last_k=3"])
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*.ckpt")) == ["step_0000006.ckpt", "step_0000008.ckpt",
                                                              "step_0000010.ckpt"]
    assert os.path.samefile(ck / "last.ckpt", ck / "step_0000010.ckpt")
    assert load_checkpoint(ck / "step_0000006.ckpt")["step"] == 6
    assert not list(ck.glob(".*tmp"))
