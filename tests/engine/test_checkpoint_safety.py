"""Checkpoints never unpickle code: planted pickles are refused unread; RNG states are plain values; every
registered method's checkpoint loads with ``weights_only=True``."""

from __future__ import annotations

import pathlib
import pickle
import random

import numpy as np
import pytest
import torch

from medssl.engine.checkpoint import load_checkpoint, rng_state, set_rng_state
from medssl.errors import CheckpointError


class _TouchOnLoad:
    """Unpickling this creates ``marker``: what a planted checkpoint would do with any code it likes."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _plant(path: pathlib.Path, marker: pathlib.Path, how: str) -> None:
    payload = {"step": 1, "model": _TouchOnLoad(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "marker"
    path = tmp_path / "last.ckpt"
    _plant(path, marker, how)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*last\.ckpt: ") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # the reference: an unrestricted unpickler would have run the planted code
    pickle.loads(pickle.dumps({"model": _TouchOnLoad(marker)}))
    assert marker.exists()


def test_refusal_names_the_object_it_would_import(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"step": 1, "model": {}, "rng": [np.random.get_state()]}, path)  # the old (pickled numpy) format
    with pytest.raises(CheckpointError, match=r"refused, it asks to import the Python object numpy"):
        load_checkpoint(path)


def test_rng_state_is_plain_values_and_survives_weights_only(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # a cached Gaussian in Python's state (gauss_next) ...
    np.random.standard_normal()  # ... and in NumPy's (has_gauss)
    path = tmp_path / "rng.ckpt"
    torch.save({"rng": [rng_state()]}, path)
    expected = ([random.random() for _ in range(3)], random.gauss(0, 1), np.random.rand(3),
                np.random.standard_normal(), torch.rand(3))
    state = torch.load(path, weights_only=True)["rng"][0]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state)
    got = ([random.random() for _ in range(3)], random.gauss(0, 1), np.random.rand(3),
           np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


def _method_names() -> list[str]:
    from medssl.methods import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("name", _method_names())
def test_every_method_checkpoint_loads_weights_only(tmp_path, name):
    """The whole checkpoint of each registered method (model, optimisers, schedulers, RNG, config), built the
    way the trainer builds it, loads back with weights_only=True and equals what was saved."""
    from lightning.fabric import Fabric

    from medssl.api import make_config
    from medssl.engine.optim import build_optimizers
    from medssl.engine.state import TrainState
    from medssl.engine.trainer import build_method, resolve_defaults
    from medssl.methods import DataInfo, get_method

    cfg = make_config(method=name, data="phantom2d:16", image_size=32)
    resolve_defaults(cfg, type("D", (), {"image_size": 32})(), get_method(name))
    fabric = Fabric(accelerator="cpu", devices=1)
    method = build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=16), fabric)
    _, optim = build_optimizers(fabric, method, cfg.optim, total_steps=10, method_name=name)
    saved = TrainState(method, optim, cfg, steps_per_epoch=5, step=3).state_dict([rng_state()])
    torch.save(saved, tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    assert loaded["step"] == 3 and loaded["config"] == cfg.to_dict()
    assert loaded["model"].keys() == saved["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    assert loaded["optimizers"].keys() == saved["optimizers"].keys()
