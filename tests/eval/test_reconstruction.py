"""Tests of the reconstruction figure (medssl.eval.reconstruction) and the trainer's visualisation hook."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medssl.engine.trainer import _write_visuals
from medssl.eval.reconstruction import middle_slice, panel_image, save_reconstruction_grid
from medssl.methods.base import Method, StepOutput, VisualPanel


def _panel(scale: str, n: int, size: int, channels: int = 1, sd: int = 2) -> VisualPanel:
    g = torch.Generator().manual_seed(size)
    shape = (n, channels, *(size,) * sd)
    panels = {"input": torch.rand(shape, generator=g), "mask": torch.rand(shape, generator=g) > 0.5,
              "reconstruction": torch.rand(shape, generator=g), "target": torch.rand(shape, generator=g)}
    return VisualPanel(scale, panels)


def test_grid_png_layout(tmp_path) -> None:
    path = save_reconstruction_grid([_panel("1x", 3, 16), _panel("2x", 3, 32)], tmp_path / "a" / "step_000001.png",
                                    title="step 1")
    img = Image.open(path)
    # 8 columns (4 per scale) of 1.6 in, 3 rows of 1.6 in + title, at 100 dpi
    assert img.size == (1280, 520)
    arr = np.asarray(img.convert("L"), dtype=np.float64)
    assert arr.std() > 10  # images were drawn, not a blank canvas
    assert not list(tmp_path.glob("a/*.tmp"))


def test_rows_are_capped(tmp_path) -> None:
    img = Image.open(save_reconstruction_grid([_panel("1x", 11, 8)], tmp_path / "x.png", max_rows=8))
    assert img.size == (640, 8 * 160 + 20)


def test_middle_slice_and_display_arrays() -> None:
    vol = torch.arange(2 * 1 * 5 * 3 * 4, dtype=torch.float32).reshape(2, 1, 5, 3, 4)
    assert torch.equal(middle_slice(vol), vol[:, :, 2])
    img = torch.rand(2, 1, 3, 4)
    assert middle_slice(img) is img
    grey = panel_image(vol / vol.max())
    assert grey.shape == (2, 3, 4) and np.allclose(grey, (vol / vol.max())[:, 0, 2].numpy())
    rgb = panel_image(torch.full((1, 3, 4, 4), 2.0))
    assert rgb.shape == (1, 4, 4, 3) and rgb.max() == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError):
        middle_slice(torch.zeros(2, 3))


def test_bad_panels(tmp_path) -> None:
    with pytest.raises(ValueError, match="no panels"):
        save_reconstruction_grid([], tmp_path / "x.png")
    bad = VisualPanel("1x", {"input": torch.rand(2, 1, 4, 4), "target": torch.rand(3, 1, 4, 4)})
    with pytest.raises(ValueError, match="same number"):
        save_reconstruction_grid([bad], tmp_path / "x.png")


class _Drawing(Method):
    name = "drawing"

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1)
        self.fail = fail
        self.seen_training: bool | None = None

    def training_step(self, batch):  # pragma: no cover - not used
        return StepOutput(loss=torch.zeros(()))

    def visualize(self, batch, step):
        self.seen_training = self.training
        if self.fail:
            raise RuntimeError("boom")
        noise = torch.rand(batch["image"].shape)  # consumes the global RNG
        return [VisualPanel("1x", {"input": batch["image"], "reconstruction": noise})]


def test_trainer_hook_writes_png_and_leaves_rng_alone(tmp_path) -> None:
    method = _Drawing().train()
    batch = {"image": torch.rand(2, 1, 8, 8)}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = _write_visuals(method, batch, 7, tmp_path, seed=0)
    assert path == tmp_path / "reconstructions" / "step_000007.png" and path.is_file()
    assert torch.equal(torch.get_rng_state(), state)  # training randomness untouched
    assert method.seen_training is False and method.training  # eval() during the call, train() restored
    # seeded: the same figure content at every call
    first = path.read_bytes()
    _write_visuals(method, batch, 7, tmp_path, seed=0)
    assert path.read_bytes() == first


def test_trainer_hook_without_panels_or_failing(tmp_path, caplog) -> None:
    class Silent(_Drawing):
        def visualize(self, batch, step):
            return None

    assert _write_visuals(Silent(), {"image": torch.rand(1, 1, 4, 4)}, 1, tmp_path, seed=0) is None
    assert not (tmp_path / "reconstructions").exists()
    with caplog.at_level(logging.WARNING, logger="medssl"):
        assert _write_visuals(_Drawing(fail=True), {"image": torch.rand(1, 1, 4, 4)}, 2, tmp_path, seed=0) is None
    assert "reconstruction figure failed" in caplog.text and "boom" in caplog.text
