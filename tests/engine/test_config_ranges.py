"""The train / optim / checkpoint sections check their own values: one line with the key, the range, the value."""

from __future__ import annotations

import pytest

from medssl.config import ACCELERATORS, OPTIMIZERS, PRECISIONS, SPLIT_CHOICES, build_config
from medssl.errors import ConfigError


def _build(section: str, values: dict) -> object:
    return build_config({"method": {"name": "mocov2"}, section: values})


@pytest.mark.parametrize(("section", "values", "message"), [
    ("train", {"batch_size": -4}, "train.batch_size must be >= 1, got -4"),
    ("train", {"epochs": 0}, "train.epochs must be >= 1, got 0"),
    ("train", {"max_steps": 0}, "train.max_steps must be >= 1, got 0"),
    ("train", {"devices": 0}, "train.devices must be >= 1, got 0"),
    ("train", {"num_nodes": -1}, "train.num_nodes must be >= 1, got -1"),
    ("train", {"log_every_n_steps": 0}, "train.log_every_n_steps must be >= 1, got 0"),
    ("train", {"collapse_every_n_steps": -1}, "train.collapse_every_n_steps must be >= 0, got -1"),
    ("train", {"visualize_every_n_steps": -1}, "train.visualize_every_n_steps must be >= 0, got -1"),
    ("train", {"seed": -1}, "train.seed must be in [0, 2147483647], got -1"),
    ("train", {"seed": 2**31}, "train.seed must be in [0, 2147483647], got 2147483648"),
    ("train", {"precision": "64"}, "train.precision must be one of 32, 32-true, bf16-mixed, 16-mixed, got '64'"),
    ("train", {"accelerator": "tpu9"}, "train.accelerator must be one of auto, cpu, cuda, gpu, mps, got 'tpu9'"),
    ("optim", {"lr": -1}, "optim.lr must be >= 0, got -1.0"),
    ("optim", {"lr": float("nan")}, "optim.lr must be a finite number >= 0, got nan"),
    ("optim", {"lr": float("inf")}, "optim.lr must be a finite number >= 0, got inf"),
    ("optim", {"weight_decay": -0.1}, "optim.weight_decay must be >= 0, got -0.1"),
    ("optim", {"momentum": 5}, "optim.momentum must be in [0, 1), got 5.0"),
    ("optim", {"momentum": 1}, "optim.momentum must be in [0, 1), got 1.0"),
    ("optim", {"betas": [0.9, 1.0]}, "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim", {"warmup_steps": -1}, "optim.warmup_steps must be >= 0, got -1"),
    ("optim", {"warmup_fraction": 1.5}, "optim.warmup_fraction must be in [0, 1], got 1.5"),
    ("optim", {"min_lr_ratio": -0.5}, "optim.min_lr_ratio must be in [0, 1], got -0.5"),
    ("optim", {"grad_clip": -1}, "optim.grad_clip must be >= 0, got -1.0"),
    ("optim", {"name": "adam"}, "optim.name must be one of sgd, adamw, got 'adam'"),
    ("optim", {"sets": {"vit": {"lr": -1}}}, "optim.sets.vit.lr must be >= 0, got -1.0"),
    ("optim", {"sets": {"vit": {"betas": [1.2, 0.9]}}}, "optim.sets.vit.betas[0] must be in [0, 1), got 1.2"),
    ("checkpoint", {"every_n_steps": -1}, "checkpoint.every_n_steps must be >= 0, got -1"),
    ("checkpoint", {"keep_last_k": 0}, "checkpoint.keep_last_k must be >= 1, got 0"),
    ("data", {"split": "test"}, "data.split must be one of train, train+val, all, got 'test'"),
])
def test_out_of_range_values_name_key_range_and_value(section, values, message):
    with pytest.raises(ConfigError) as e:
        _build(section, values)
    assert str(e.value) == message


@pytest.mark.parametrize(("section", "values"), [
    ("train", {"batch_size": 1, "epochs": 1, "max_steps": 1, "seed": 0, "log_every_n_steps": 1,
               "collapse_every_n_steps": 0, "visualize_every_n_steps": 0}),
    ("train", {"max_steps": None, "seed": 2**31 - 1}),
    ("optim", {"lr": None, "weight_decay": 0, "momentum": 0, "betas": [0, 0], "warmup_steps": 0,
               "warmup_fraction": 0, "min_lr_ratio": 0, "grad_clip": 0}),
    ("optim", {"lr": 1e-8, "momentum": 0.999, "warmup_fraction": 1, "min_lr_ratio": 1}),
    ("optim", {"lr": 0.0}),  # frozen weights: tests of gradients use it
    ("checkpoint", {"every_n_steps": 0, "keep_last_k": 1}),
])
def test_boundary_values_are_accepted(section, values):
    cfg = _build(section, values)
    for key, value in values.items():
        got = getattr(getattr(cfg, section), key)
        assert got == (tuple(value) if isinstance(value, list) else value)


def test_every_choice_is_accepted():
    for p in PRECISIONS:
        assert _build("train", {"precision": p}).train.precision == p
    for a in ACCELERATORS:
        assert _build("train", {"accelerator": a}).train.accelerator == a
    for n in OPTIMIZERS:
        assert _build("optim", {"name": n}).optim.name == n
    for s in SPLIT_CHOICES:
        assert _build("data", {"split": s}).data.split == s
