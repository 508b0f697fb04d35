"""Non-finite losses: the step is skipped; after MAX_BAD_STEPS in a row training stops, last checkpoint intact."""

from __future__ import annotations

import pytest
import torch

from medssl.api import pretrain
from medssl.engine.checkpoint import load_checkpoint
from medssl.engine.guard import MAX_BAD_STEPS
from medssl.errors import MedsslError
from medssl.methods.mocov2 import MoCoV2

pytestmark = pytest.mark.slow


def test_consecutive_nan_losses_stop_with_checkpoint_intact(tmp_path, monkeypatch):
    original = MoCoV2.training_step
    calls = {"n": 0}

    def nan_after_four(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] > 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoCoV2, "training_step", nan_after_four)
    with pytest.raises(MedsslError, match=f"{MAX_BAD_STEPS} consecutive non-finite losses"):
        pretrain("mocov2", data="phantom2d:256", out=tmp_path / "r", image_size=32, batch_size=16, max_steps=50,
                 progress=False, overrides=["method.queue_size=32", "checkpoint.every_n_steps=2"])
    assert calls["n"] == 4 + MAX_BAD_STEPS
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt")
    assert ckpt["step"] == 4
    assert all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradients_with_a_finite_loss_are_skipped(tmp_path, monkeypatch):
    original = MoCoV2.training_step
    calls = {"n": 0}

    def nan_grads_on_steps_3_and_later(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] > 4:  # one isolated bad step, then a run of them
            out.loss = out.loss + 0.0 * _NaNGradient.apply(next(self.backbone.parameters()).sum())
        assert torch.isfinite(out.loss)
        return out

    monkeypatch.setattr(MoCoV2, "training_step", nan_grads_on_steps_3_and_later)
    with pytest.raises(MedsslError, match="consecutive non-finite losses or gradients"):
        pretrain("mocov2", data="phantom2d:256", out=tmp_path / "r", image_size=32, batch_size=16, max_steps=50,
                 progress=False, overrides=["method.queue_size=32", "checkpoint.every_n_steps=1"])
    # calls 1, 3, 4 trained (step 2 was skipped and did not count): 3 steps, then MAX_BAD_STEPS bad ones
    assert calls["n"] == 4 + MAX_BAD_STEPS
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt")
    assert ckpt["step"] == 3
    assert all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())
