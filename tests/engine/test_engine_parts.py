"""Engine pieces: schedule, optimiser groups, sampler, atomic checkpoints, metrics.csv, EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.config import OptimConfig
from medssl.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from medssl.engine.logging import MetricsCSV
from medssl.engine.optim import build_optimizer, build_scheduler, param_groups
from medssl.engine.sampler import ResumableBatchSampler
from medssl.engine.schedule import warmup_cosine
from medssl.errors import CheckpointError
from medssl.nn.ema import ema_update, make_ema_copy


def test_warmup_cosine_shape():
    total, warm = 100, 10
    f = [warmup_cosine(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1)
    assert f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    # half-way through the cosine part: 0.5
    assert warmup_cosine(10 + 45, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert warmup_cosine(total, total, warm, min_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(list(m.named_parameters()), 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m[0].weight), id(m[3].weight)}
    nodecay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert nodecay == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[3].bias)}


def test_scheduler_sets_lr_per_step():
    p = nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(name="sgd", warmup_steps=4)
    opt = build_optimizer([("w", p)], cfg, lr=0.5)
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * warmup_cosine(s, 20, 4) for s in range(20)]
    assert np.allclose(lrs, expected)


def test_sampler_resumes_mid_epoch_with_identical_batches():
    idx = np.arange(100, 150)
    full = ResumableBatchSampler(idx, 8, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 50 // 8
    resumed = ResumableBatchSampler(idx, 8, seed=3)
    resumed.set_epoch(2, start_batch=4)
    assert list(resumed) == batches[4:]
    other = ResumableBatchSampler(idx, 8, seed=3)
    other.set_epoch(3)
    assert list(other) != batches
    assert set(np.concatenate(batches)).issubset(set(idx))


def test_sampler_ranks_partition_the_global_batch():
    idx = np.arange(64)
    per_rank = []
    for r in range(2):
        s = ResumableBatchSampler(idx, 8, seed=0, rank=r, world_size=2)
        s.set_epoch(0)
        per_rank.append(list(s))
    single = ResumableBatchSampler(idx, 16, seed=0)
    single.set_epoch(0)
    for b, (a0, a1) in enumerate(zip(*per_rank, strict=True)):
        assert not set(a0) & set(a1)
        assert a0 + a1 == list(single)[b]


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "model": {}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"step": 2, "model": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)


def test_rng_state_roundtrip():
    s = rng_state()
    a = torch.rand(3), np.random.rand(2)
    set_rng_state(s)
    b = torch.rand(3), np.random.rand(2)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_metrics_csv_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    m = MetricsCSV(path)
    for s in (10, 20, 30):
        m.log({"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 0.1, "images_per_s": 5.0})
    m.log({"step": 40, "epoch": 0, "loss": 0.01, "lr": 0.1, "images_per_s": 5.0, "extra": 1.5})
    m2 = MetricsCSV(path, resume_step=20)
    m2.log({"step": 30, "epoch": 0, "loss": 0.5, "lr": 0.1, "images_per_s": 5.0})
    lines = path.read_text().strip().splitlines()
    assert lines[0].split(",")[:5] == ["step", "epoch", "loss", "lr", "images_per_s"]
    assert [ln.split(",")[0] for ln in lines[1:]] == ["10", "20", "30"]


def test_ema_update_formula():
    online = nn.Linear(3, 2)
    ema = make_ema_copy(online)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update(ema, online, 0.9)
    for b, e, o in zip(before, ema.parameters(), online.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * o)
        assert not e.requires_grad
