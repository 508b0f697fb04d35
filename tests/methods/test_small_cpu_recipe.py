"""The bundled ``mocov2_small_cpu`` recipe: a valid config with the settings its docs state, and it trains."""

from __future__ import annotations

import numpy as np

from medssl.api import RECIPES_DIR, pretrain
from medssl.config import build_config, load_yaml


def test_recipe_settings():
    cfg = build_config(load_yaml(RECIPES_DIR / "mocov2_small_cpu.yaml"))
    assert cfg.method_name == "mocov2" and cfg.method["queue_size"] == 1024
    assert cfg.model.stem == "default" and cfg.model.zero_init_last is False
    assert cfg.data.image_size == 32 and cfg.views.blur_p == 0.0 and cfg.views.crop_scale == (0.3, 1.0)
    assert cfg.optim.lr is None  # the batch rule: 0.06 x 64 / 128
    assert cfg.train.batch_size == 64


def test_recipe_trains_on_a_small_npz(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "p.npz", train_images=imgs, val_images=imgs[:0], test_images=imgs[:0])
    run = pretrain(config="mocov2_small_cpu", data=f"npz:{tmp_path / 'p.npz'}", out=tmp_path / "r", progress=False,
                   overrides=["train.max_steps=2", "train.batch_size=8", "checkpoint.on_sigterm=false"])
    cfg = load_yaml(run / "config.yaml")
    assert abs(cfg["optim"]["lr"] - 0.06 * 8 / 128) < 1e-12
    assert cfg["method"]["queue_size"] == 1024  # recorded as asked; the method caps the queue at 24 images
    assert (run / "encoder.safetensors").is_file()
