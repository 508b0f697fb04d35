"""Tests of the cnnmim method: no mask leakage through the sparse encoder (2D and 3D), sparse BatchNorm against
a hand-written reference, the masked loss against a hand-written formula, forward/backward in 2D and 3D with
every masking strategy, export into plain timm / ResNet-3D, and the CLI end to end."""

from __future__ import annotations

import itertools

import pytest
import safetensors.torch as st
import timm
import torch
from torch import nn

from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.methods import DataInfo
from medssl.methods.cnnmim import (
    CNNMIM,
    SparseBatchNorm2d,
    SparseBatchNorm3d,
    masked_reconstruction_loss,
    patchify_pixels,
    unpatchify_pixels,
)
from medssl.nn.backbones3d import build_backbone_3d
from medssl.transforms.masking import MaskConfig, mask_grid, resize_mask, upsample_mask


def _method(sd: int = 2, size: int = 32, backbone: str | None = None, **method: object) -> CNNMIM:
    torch.manual_seed(0)
    bb = backbone or ("resnet18" if sd == 2 else "resnet10_3d")
    cfg = build_config({"method": {"name": "cnnmim", **method}, "model": {"backbone": bb}})
    return CNNMIM(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64))


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
    method = _method(2, sparse=False, mask_ratio=0.5)
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


@pytest.mark.parametrize("cls,ref_cls,shape", [(SparseBatchNorm2d, nn.BatchNorm2d, (4, 3, 6, 5)),
                                              (SparseBatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 5, 3))])
def test_sparse_batch_norm_against_reference(cls: type, ref_cls: type, shape: tuple[int, ...]) -> None:
    from medssl.methods.cnnmim import MaskState

    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    bn = cls(3, momentum=0.2)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    state = MaskState()
    bn.mask_state = state
    ref = ref_cls(3, momentum=0.2)
    ref.load_state_dict(bn.state_dict())
    # No mask: exactly the plain BatchNorm, train and eval.
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    # A mask: statistics over the visible positions only, written out by hand.
    mask = torch.rand(shape[0], 1, *shape[2:], generator=_gen(3)) < 0.4
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    with state.active(mask):
        y = bn(x)
    vis = (~mask).expand_as(x)
    for c in range(3):
        vals = x[:, c][vis[:, c]]
        mean, var = vals.mean(), vals.var(unbiased=False)
        expected = (x[:, c] - mean) / torch.sqrt(var + bn.eps) * bn.weight[c] + bn.bias[c]
        torch.testing.assert_close(y[:, c][vis[:, c]], expected[vis[:, c]], rtol=1e-4, atol=1e-5)
        assert (y[:, c][~vis[:, c]] == 0).all()
        torch.testing.assert_close(bn.running_mean[c], 0.8 * before_mean[c] + 0.2 * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var[c], 0.8 * before_var[c] + 0.2 * vals.var(unbiased=True),
                                   rtol=1e-5, atol=1e-6)
    # Eval mode under a mask: running statistics, masked positions zero.
    bn.eval()
    with state.active(mask):
        y = bn(x)
    expected = (x - bn.running_mean.view(1, -1, *[1] * (x.ndim - 2))) / torch.sqrt(
        bn.running_var.view(1, -1, *[1] * (x.ndim - 2)) + bn.eps)
    expected = expected * bn.weight.view(1, -1, *[1] * (x.ndim - 2)) + bn.bias.view(1, -1, *[1] * (x.ndim - 2))
    torch.testing.assert_close(y, expected * (~mask), rtol=1e-4, atol=1e-5)


def _loss_by_hand(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> float:
    """Loop over samples and masked units: mean over units of the per-unit MSE."""
    sd = mask.ndim - 1
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for unit in itertools.product(*(range(g) for g in mask.shape[1:])):
            if not mask[(b, *unit)]:
                continue
            region = (b, slice(None), *(slice(u * p, (u + 1) * p) for u in unit))
            t = target[region].double()
            if norm_pix:
                n = t.numel()
                mu = t.sum() / n
                var = ((t - mu) ** 2).sum() / (n - 1)
                t = (t - mu) / (var + 1e-6) ** 0.5
            total += float(((pred[region].double() - t) ** 2).mean())
            count += 1
    assert sd in (2, 3) and count > 0
    return total / count


@pytest.mark.parametrize("sd,shape,p", [(2, (3, 2, 8, 12), 4), (3, (2, 1, 4, 8, 4), 2)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_written_formula(sd: int, shape: tuple[int, ...], p: int, norm_pix: bool) -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(shape), torch.randn(shape)
    grid = tuple(s // p for s in shape[2:])
    mask = mask_grid(MaskConfig(ratio=0.5), shape[0], grid, generator=_gen(2))
    loss = masked_reconstruction_loss(pred, target, mask, (p,) * sd, norm_pix=norm_pix)
    assert float(loss) == pytest.approx(_loss_by_hand(pred, target, mask, p, norm_pix), rel=1e-5)


def test_loss_ignores_visible_positions() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    mask = mask_grid(MaskConfig(ratio=0.5), 2, (4, 4), generator=_gen(4))
    pix = upsample_mask(mask, 4)
    base = masked_reconstruction_loss(pred, target, mask, (4, 4))
    changed_visible = torch.where(pix, pred, pred + 10 * torch.randn_like(pred))
    assert torch.equal(masked_reconstruction_loss(changed_visible, target, mask, (4, 4)), base)
    changed_masked = torch.where(pix, pred + 1.0, pred)
    assert masked_reconstruction_loss(changed_masked, target, mask, (4, 4)) != base
    # gradient only at masked pixels
    pred.requires_grad_()
    masked_reconstruction_loss(pred, target, mask, (4, 4)).backward()
    assert (pred.grad[~pix] == 0).all() and (pred.grad[pix] != 0).any()


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), (4, 2)), ((2, 2, 4, 6, 8), (2, 3, 4))])
def test_patchify_against_loop_and_roundtrip(shape: tuple[int, ...], p: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    patches = patchify_pixels(x, p)
    grid = [s // q for s, q in zip(shape[2:], p, strict=True)]
    assert patches.shape == (shape[0], *grid, shape[1] * torch.Size(p).numel())
    for unit in itertools.product(*(range(g) for g in grid)):
        region = (0, slice(None), *(slice(u * q, (u + 1) * q) for u, q in zip(unit, p, strict=True)))
        assert torch.equal(patches[(0, *unit)], x[region].reshape(-1))
    assert torch.equal(unpatchify_pixels(patches, p, shape[1]), x)


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
    method = _method(2)
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
    [(2, {"mask_strategy": "tube"}, "3D"), (2, {"mask_patch_size": 5}, "divisible"), (2, {"mask_ratio": 0.0}, "mask_ratio"),
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
    method = CNNMIM(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=int(cfg.data.image_size), num_samples=100))
    assert method.spatial_dims == sd and method.hparams.mask_strategy == "random"
    assert all(g >= 4 for g in method.grid)


@pytest.mark.parametrize("data,bs,steps", [("phantom2d:64", 8, 6), ("phantom3d:16", 2, 3)])
def test_cli_pretrain_writes_reconstructions(tmp_path, data: str, bs: int, steps: int) -> None:
    from medssl.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--method", "cnnmim", "--data", data, "--image-size", "32", "--batch-size", str(bs),
                 "--max-steps", str(steps), "--out", str(out), "--quiet", "--set", "train.visualize_every_n_steps=2",
                 "--set", "train.log_every_n_steps=1"]) == 0
    pngs = sorted(p.name for p in (out / "reconstructions").glob("*.png"))
    expected = sorted({f"step_{s:06d}.png" for s in range(2, steps + 1, 2)} | {f"step_{steps:06d}.png"})
    assert pngs == expected
    assert (out / "encoder.safetensors").is_file()
