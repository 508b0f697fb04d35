"""Tests of the cnnmim method: no mask leakage through the sparse encoder (2D and 3D), forward/backward in 2D and
3D with every masking strategy, export into plain timm / ResNet-3D, and the CLI end to end. (Sparse BatchNorm is
tested in tests/nn/test_sparse.py, the masked loss in tests/losses/test_reconstruction.py.)"""

from __future__ import annotations

import pytest
import safetensors.torch as st
import timm
import torch
from torch import nn

from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.methods import DataInfo, build_method
from medssl.methods.cnnmim import CNNMIM
from medssl.nn.backbones3d import build_backbone_3d
from medssl.nn.sparse import SparseBatchNorm2d
from medssl.transforms.masking import resize_mask, upsample_mask


def _method(sd: int = 2, size: int = 32, backbone: str | None = None, **method: object) -> CNNMIM:
    torch.manual_seed(0)
    bb = backbone or ("resnet18" if sd == 2 else "resnet10_3d")
    cfg = build_config({"method": {"name": "cnnmim", **method}, "model": {"backbone": bb}})
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _record(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks storing the output of every conv, norm, pooling layer and stage of ``model``."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Conv3d | nn.modules.batchnorm._BatchNorm | nn.MaxPool2d | nn.MaxPool3d) or (
            name.startswith("layer") and "." not in name
        ):
            handles.append(mod.register_forward_hook(lambda m, i, o, n=name: acts.__setitem__(n, o.detach().clone())))
    return acts, handles


def _masked_input(method: CNNMIM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same image with completely different values in the masked units."""
    pix = upsample_mask(mask, method.patch)
    noise = torch.randn(x.shape, generator=_gen(99)) * 5 + 3
    return torch.where(pix, noise, x)


@pytest.mark.parametrize("sd,strategy,training", [(2, "random", True), (2, "block", False), (3, "random", True),
                                                   (3, "tube", False)])
def test_encoder_never_sees_masked_values(sd: int, strategy: str, training: bool) -> None:
    """Every layer's activations are identical whatever the masked input holds, and zero at masked positions."""
    method = _method(sd, size=64 if sd == 2 else 32, mask_strategy=strategy, mask_ratio=0.5,
                     mask_patch_size=16 if sd == 2 else 8)
    method.train(training)
    b = 3
    x = torch.randn(b, 1, *method.image_shape, generator=_gen(0))
    mask = method.draw_mask(b, torch.device("cpu"), generator=_gen(1))
    x2 = _masked_input(method, x, mask)
    assert not torch.equal(x, x2)

    runs = []
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    for inp in (x, x2):
        method.load_state_dict(initial)
        acts, handles = _record(method.backbone)
        with torch.random.fork_rng():
            pred, pix = method.reconstruct(inp, mask)
        for h in handles:
            h.remove()
        runs.append((acts, pred, {k: v.clone() for k, v in method.backbone.state_dict().items()}))
    (a1, p1, s1), (a2, p2, s2) = runs
    assert len(a1) > 10
    for name in a1:
        assert torch.equal(a1[name], a2[name]), f"activations of {name} depend on masked input values"
        masked_here = resize_mask(pix, a1[name].shape[2:]).expand_as(a1[name])
        if all(a >= g for a, g in zip(a1[name].shape[2:], method.grid, strict=True)):
            assert masked_here.any(), name  # (coarser maps may have no fully masked position)
        assert (a1[name][masked_here] == 0).all(), f"{name} is not zero at masked positions"
    assert torch.equal(p1, p2)
    # BatchNorm running statistics saw only visible values, so they moved identically (and they moved).
    assert not training or not torch.equal(s1["bn1.running_mean"], initial["backbone.bn1.running_mean"])
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0)


def test_dense_variant_leaks_into_masked_positions() -> None:
    """Control: with sparse=false the same check fails (the zeroing is what keeps masked positions empty)."""
    method = _method(2, sparse=False, mask_ratio=0.5, mask_patch_size=8)
    x = torch.randn(2, 1, 32, 32, generator=_gen(0))
    mask = method.draw_mask(2, torch.device("cpu"), generator=_gen(1))
    acts, handles = _record(method.backbone)
    _, pix = method.reconstruct(x, mask)
    for h in handles:
        h.remove()
    conv = acts["layer1.0.conv1"]
    assert (conv[resize_mask(pix, conv.shape[2:]).expand_as(conv)] != 0).any()
    # ... and BatchNorm in the dense network is not sparse
    assert type(method.backbone.bn1) is SparseBatchNorm2d and method.mask_state.mask is None


@pytest.mark.parametrize(
    "sd,strategy,kwargs",
    [(2, "random", {}), (2, "block", {"input_fill": "token"}), (2, "center", {"densify": False}),
     (2, "slice", {"norm_pix_loss": False}), (3, "random", {}), (3, "block", {}), (3, "center", {}),
     (3, "slice", {}), (3, "tube", {"decoder_convs": 1})],
)
def test_training_step_forward_backward(sd: int, strategy: str, kwargs: dict) -> None:
    size = 32 if sd == 2 else 16
    method = _method(sd, size=size, mask_strategy=strategy, mask_patch_size=4, **kwargs)
    images = torch.rand(2, 1, *(size,) * sd, generator=_gen(5))
    out = method.training_step({"image": images})
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 0 < out.logs["mask_ratio"] < 1
    out.loss.backward()
    assert method.backbone.conv1.weight.grad is not None and method.backbone.conv1.weight.grad.abs().sum() > 0
    assert method.decoder.head.weight.grad.abs().sum() > 0
    if method.mask_tokens is not None:
        assert all(t.grad is not None for t in method.mask_tokens)
    if method.input_token is not None:
        assert method.input_token.grad is not None and method.input_token.grad.abs().sum() > 0


def test_visualize_panel_shapes_3d() -> None:
    method = _method(3, size=16, mask_patch_size=4, vis_samples=2).eval()
    with torch.no_grad():
        panels = method.visualize({"image": torch.rand(3, 1, 16, 16, 16, generator=_gen(6))}, step=1)
    assert panels is not None and len(panels) == 1
    cols = panels[0].columns
    assert list(cols) == ["input", "mask", "reconstruction", "target"]
    assert all(v.shape == (2, 1, 16, 16, 16) for v in cols.values())
    # the reconstruction keeps the visible input and the target is the image itself
    vis = cols["mask"] == 0
    torch.testing.assert_close(cols["reconstruction"][vis], cols["target"][vis])
    torch.testing.assert_close(cols["target"], torch.rand(3, 1, 16, 16, 16, generator=_gen(6))[:2])


def test_exported_backbone_is_plain_timm_2d() -> None:
    method = _method(2, mask_patch_size=8)
    method.training_step({"image": torch.rand(4, 1, 32, 32, generator=_gen(7))})  # moves BN running stats
    state = method.encoders()["backbone"].state_dict()
    ref = timm.create_model("resnet18", num_classes=0, in_chans=1)
    ref.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 32, 32, generator=_gen(8))
    method.eval()
    ref.eval()
    torch.testing.assert_close(method.encoders()["backbone"](x), ref(x))
    assert method.export_meta()["backbone"]["format"] == "timm"


def test_exported_backbone_is_plain_resnet3d(tmp_path) -> None:
    from medssl.encoders import load_encoder
    from medssl.export import export_encoders

    method = _method(3, size=16, mask_patch_size=4)
    method.training_step({"image": torch.rand(2, 1, 16, 16, 16, generator=_gen(9))})
    ref = build_backbone_3d("resnet10_3d", in_chans=1)
    ref.load_state_dict(method.backbone.state_dict(), strict=True)
    (path,) = export_encoders(method, tmp_path)
    assert set(st.load_file(str(path))) == set(ref.state_dict())
    enc = load_encoder(path)
    x = torch.rand(2, 1, 16, 16, 16, generator=_gen(10))
    method.eval()
    torch.testing.assert_close(enc.backbone(x), method.backbone(x))


@pytest.mark.parametrize(
    "sd,kwargs,match",
    [(2, {"mask_strategy": "tube"}, "3D"), (2, {"mask_patch_size": 5}, "divisible"),
     (2, {"mask_ratio": 0.0}, "mask_ratio"),
     (2, {"input_fill": "noise"}, "input_fill"), (2, {"decoder_channels": [8, 8]}, "decoder_channels"),
     (2, {"augment": "heavy"}, "augment")],
)
def test_config_errors(sd: int, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _method(sd, **kwargs)


def test_non_resnet_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ResNet-style"):
        _method(2, backbone="vit_tiny_patch16_224")


@pytest.mark.parametrize("recipe,sd", [("cnnmim_prostate_t2w", 3), ("cnnmim_phantom3d_cpu", 3),
                                       ("cnnmim_phantom2d_cpu", 2)])
def test_recipes_build(recipe: str, sd: int) -> None:
    from medssl.api import make_config

    cfg = make_config(config=recipe)
    assert cfg.method["name"] == "cnnmim" and cfg.optim.name == "adamw"
    method = build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=int(cfg.data.image_size),
                                        num_samples=100))
    assert method.spatial_dims == sd and method.hparams.mask_strategy == "random"
    assert all(g >= 4 for g in method.grid)


@pytest.mark.parametrize("data,bs,steps", [("phantom2d:64", 8, 6), ("phantom3d:16", 2, 3)])
def test_cli_pretrain_writes_reconstructions(tmp_path, data: str, bs: int, steps: int) -> None:
    from medssl.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--method", "cnnmim", "--data", data, "--image-size", "32", "--batch-size", str(bs),
                 "--max-steps", str(steps), "--out", str(out), "--quiet", "--set", "train.visualize_every_n_steps=2",
                 "--set", "train.log_every_n_steps=1", "--set", "model.stem=cifar"]) == 0
    pngs = sorted(p.name for p in (out / "reconstructions").glob("*.png"))
    expected = sorted({f"step_{s:06d}.png" for s in range(2, steps + 1, 2)} | {f"step_{steps:06d}.png"})
    assert pngs == expected
    assert (out / "encoder.safetensors").is_file()
