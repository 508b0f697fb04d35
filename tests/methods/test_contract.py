"""The method contract, checked on every registered method (read from the registry: a new method file is picked
up without a line here), in 2D and, where the method supports it, 3D, on tiny phantoms:

* it builds through :func:`medssl.methods.build_method`; resolving its defaults is idempotent;
* one training step gives a finite scalar loss whose gradient reaches every exported encoder; the parameter
  sets cover every trainable parameter once; ``after_optimizer_step`` runs;
* ``encoders()`` is non-empty, and exporting them (:func:`medssl.export.export_encoders`, i.e.
  ``save_encoder``) and loading them back (:func:`medssl.export.load_encoder`) gives the same features;
* ``state_dict`` saved and loaded (``weights_only``) into a differently initialised copy gives the identical
  loss on the same batch with the same seed (what ``--resume`` relies on);
* spatial dims it does not support are a ConfigError at construction.

``FAST`` only shrinks widths for speed; a method not listed there runs with its defaults.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from medssl.api import make_config
from medssl.data.highres import HighResDataset
from medssl.data.phantoms import PhantomDataset
from medssl.encoders import load_encoder, read_metadata
from medssl.errors import ConfigError
from medssl.export import export_encoders
from medssl.methods import METHODS, DataInfo, Method, MethodConfig, ViewSpec, build_method
from medssl.nn.backbones import Encoder

SIZE = {2: 32, 3: 16}
BATCH = 4
DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
FAST = {  # smaller widths only (speed); every other setting is the method's default
    "mocov2": ["method.queue_size=16", "method.proj_hidden=32", "method.proj_dim=16"],
    "medmoco": ["method.queue_size=16", "method.proj_hidden=32", "method.proj_dim=16", "method.local_regions=4",
                "method.local_dim=16", "method.whitening_group_size=4"],
    "gravis": ["method.proj_hidden=32", "method.proj_dim=16"],
    "mae": DECODER,
    "miram": [*DECODER, "method.hr_decoder_depth=1"],
    "cnnmim": ["method.mask_patch_size=4", "method.decoder_channels=[16,16,16,16]"],
    "cass": ["method.head=mlp", "method.embed_dim=16", "method.mlp_hidden=16"],
    "dino": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.local_crops=2"],
    "mocov3": ["method.mlp_dim=32", "method.proj_dim=16", "model.patch_size=8"],
    "simmim": ["model.patch_size=8"],
}
FAST_3D = {name: ["model.backbone=resnet10_3d"] for name in ("mocov2", "medmoco", "gravis", "cnnmim", "dino")}
CASES = [(name, sd) for name in sorted(METHODS) for sd in (2, 3)]
IDS = [f"{name}-{sd}d" for name, sd in CASES]


def _config(name: str, sd: int):
    overrides = FAST.get(name, []) + (FAST_3D.get(name, []) if sd == 3 else [])
    return make_config(method=name, data=f"phantom{sd}d", image_size=SIZE[sd], overrides=overrides)


def _info(sd: int) -> DataInfo:
    return DataInfo(in_chans=1, spatial_dims=sd, image_size=SIZE[sd], num_samples=64)


def _build(name: str, sd: int, seed: int = 0) -> Method:
    if sd not in METHODS[name].supported_spatial_dims:
        pytest.skip(f"{name} does not train on {sd}D data (checked by test_unsupported_spatial_dims_are_refused)")
    torch.manual_seed(seed)
    return build_method(_config(name, sd), _info(sd)).train()


def _batch(name: str, sd: int) -> dict[str, torch.Tensor]:
    """A batch as the trainer collates it: images, the high-resolution copies the view spec asks for, indices."""
    data: torch.utils.data.Dataset = PhantomDataset(f"phantom{sd}d", 8, image_size=SIZE[sd])
    spec = METHODS[name].view_spec_for(_config(name, sd).method)
    if spec.needs_highres:
        data = HighResDataset(data, spec.highres_factors)
    items = [data[i] for i in range(BATCH)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k.startswith("image")}
    batch["index"] = torch.tensor([int(it["index"]) for it in items])
    return batch


def _step(method: Method, batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return method.training_step(batch).loss


def _optimizer_step(method: Method) -> None:
    with torch.no_grad():
        for params in method.parameter_sets().values():
            for _, p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.01)
    method.after_optimizer_step(1, 10)


def test_every_method_is_registered_with_its_facts():
    assert {"mocov2", "medmoco", "gravis", "mae", "miram", "cnnmim", "cass"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.description and cls.paper
        assert dataclasses.is_dataclass(cls.config_cls) and issubclass(cls.config_cls, MethodConfig)
        assert cls.config_cls().name == ""  # every field has a default
        assert cls.default_optimizer in ("sgd", "adamw") and cls.default_lr > 0
        assert set(cls.supported_spatial_dims) <= {2, 3} and 2 in cls.supported_spatial_dims
        assert isinstance(cls.view_spec_for({"name": name}), ViewSpec)
        assert (Path(__file__).parents[2] / "docs" / "methods" / f"{name}.md").is_file(), f"docs/methods/{name}.md"


@pytest.mark.parametrize(("name", "sd"), CASES, ids=IDS)
def test_build_step_gradients_and_export_round_trip(name: str, sd: int, tmp_path) -> None:
    method = _build(name, sd)
    encoders = method.encoders()
    assert encoders and all(isinstance(m, torch.nn.Module) for m in encoders.values())
    # one training step: a finite scalar whose gradient reaches every exported encoder
    out = method.training_step(_batch(name, sd))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for key, value in out.logs.items():
        assert isinstance(value, float) or (isinstance(value, torch.Tensor) and value.ndim == 0), key
    assert all(e.ndim == 2 and not e.requires_grad for e in out.embeddings.values())
    out.loss.backward()
    for enc_name, enc in encoders.items():
        grads = [p.grad for p in enc.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches encoder '{enc_name}'"
        assert all(torch.isfinite(g).all() for g in grads)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    in_sets = [n for params in method.parameter_sets().values() for n, _ in params]
    assert sorted(in_sets) == sorted(trainable)  # every trainable parameter in exactly one set
    _optimizer_step(method)
    # export (BatchNorm / whitening statistics have moved) and load back: the same features
    method.eval()
    paths = export_encoders(method, tmp_path)
    assert len(paths) == len(encoders)
    x = torch.rand(2, 1, *(SIZE[sd],) * sd, generator=torch.Generator().manual_seed(5))
    for path in paths:
        enc_name = read_metadata(path)["encoder"]
        with torch.no_grad():
            expected = Encoder(encoders[enc_name]).eval()(x)
            got = load_encoder(path).eval()(x)
        assert got.shape == expected.shape and got.shape[0] == 2
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "sd"), CASES, ids=IDS)
def test_resolving_defaults_is_idempotent(name: str, sd: int) -> None:
    """A saved, resolved config (a resumed run, ``evaluate --checkpoint``) resolves to itself."""
    if sd not in METHODS[name].supported_spatial_dims:
        pytest.skip("unsupported")
    cfg = _config(name, sd)
    METHODS[name].resolve_defaults(cfg, _info(sd))
    resolved = cfg.to_dict()
    METHODS[name].resolve_defaults(cfg, _info(sd))
    assert cfg.to_dict() == resolved


@pytest.mark.parametrize(("name", "sd"), CASES, ids=IDS)
def test_state_dict_round_trip_gives_the_identical_loss(name: str, sd: int) -> None:
    batch = _batch(name, sd)
    trained = _build(name, sd, seed=0)
    _step(trained, batch, seed=1).backward()
    _optimizer_step(trained)  # EMA copies, queues, running statistics move
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _build(name, sd, seed=123)
    before = _step(fresh, batch, seed=2).detach()
    fresh.load_state_dict(state)
    fresh.zero_grad()
    expected, got = _step(trained, batch, seed=2), _step(fresh, batch, seed=2)
    assert not torch.equal(before, expected)  # the copy really started elsewhere
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if set(cls.supported_spatial_dims) != {2, 3}))
def test_unsupported_spatial_dims_are_refused(name: str) -> None:
    for sd in {2, 3} - set(METHODS[name].supported_spatial_dims):
        with pytest.raises(ConfigError):
            build_method(_config(name, 2), _info(sd))


def test_a_method_takes_its_hyper_parameters_not_the_run_config():
    cfg = _config("mocov2", 2)
    cls = METHODS["mocov2"]
    with pytest.raises(TypeError, match="build_method"):
        cls(cfg, cfg.model, cfg.views, _info(2))  # the whole run config where the hyper-parameters belong
