"""MAE and MIRAM: steps in 2D / 3D, true high-resolution targets, identical crops across scales, CLI runs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medssl.api import make_config
from medssl.cli import main
from medssl.data.base import resize_image
from medssl.data.folder import FolderDataset
from medssl.data.highres import HighResDataset, highres_key
from medssl.data.manifest import drop_bad
from medssl.data.phantoms import PhantomDataset, render_phantom2d
from medssl.engine.loader import _collate_images
from medssl.errors import ConfigError, DataError
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods import DataInfo, build_method
from medssl.methods.mae import MAE
from medssl.methods.miram import MIRAM
from medssl.transforms.masking import upsample_mask
from medssl.transforms.spatial import view_to_source

SMALL_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
NO_AUG = ["views.crop_scale=[1.0,1.0]", "views.crop_ratio=[1.0,1.0]", "views.flip_p=0"]


def _method(name: str, size: int, sd: int = 2, overrides: tuple[str, ...] = ()) -> MAE:
    cfg = make_config(method=name, data="phantom2d" if sd == 2 else "phantom3d", image_size=size,
                      overrides=[*SMALL_DECODER, *overrides])
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64))


def _batch(dataset, factors=(2,), n=4):
    data = HighResDataset(dataset, factors)
    return _collate_images([data[i] for i in range(n)])


# -- MAE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sd,size", [(2, 32), (3, 16)])
def test_mae_step_trains_encoder_and_decoder(sd, size):
    torch.manual_seed(0)
    method = _method("mae", size, sd)
    assert method.backbone_name == ("vit_tiny_patch16_224" if sd == 2 else "vit_tiny_3d")
    out = method.training_step({"image": torch.rand(2, 1, *(size,) * sd)})
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    out.loss.backward()
    enc = method.encoder.vit
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert method.decoder.mask_token.grad.abs().sum() > 0
    assert enc.pos_embed.grad is None and not enc.pos_embed.requires_grad
    assert out.embeddings["backbone"].shape == (2, enc.embed_dim)


def test_mae_rejects_a_cnn_backbone():
    cfg = make_config(method="mae", data="phantom2d", image_size=32, backbone="resnet50")
    with pytest.raises(ConfigError, match="ViT"):
        build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=8))


def test_mae_loss_equals_reconstruction_loss_of_its_pieces():
    method = _method("mae", 32)
    images = torch.rand(3, 1, 32, 32)
    torch.manual_seed(5)
    loss = method.training_step({"image": images}).loss
    torch.manual_seed(5)
    views = method.make_views({"image": images})
    mask, ids = method.draw_mask(3, images.device)
    assert int(mask.sum()) == 3 * 48  # 75 % of 8 x 8
    preds, targets, masks, _ = method.forward_scales(views, mask, ids)
    torch.testing.assert_close(loss, reconstruction_loss(preds[1], targets[1], masks[1]))


# -- MIRAM: data ------------------------------------------------------------------------------------------------
def test_miram_2x_target_is_the_source_rendered_at_2x():
    ds = PhantomDataset("phantom2d", 8, image_size=16)
    batch = _batch(ds)
    assert batch["image_highres"].shape == (4, 1, 32, 32)
    method = _method("miram", 16, overrides=NO_AUG)
    views = method.make_views(batch)
    rendered = torch.from_numpy(render_phantom2d(np.arange(4), 32)[0]).unsqueeze(1)
    torch.testing.assert_close(views[2], rendered, atol=1e-6, rtol=0)
    torch.testing.assert_close(views[1], batch["image"], atol=1e-6, rtol=0)
    # and it is not the input upsampled: real detail differs from any interpolation of the 16 px image
    for mode in ("nearest", "bilinear"):
        up = F.interpolate(batch["image"], scale_factor=2, mode=mode)
        assert (views[2] - up).abs().mean() > 0.01
    # the 2x target holds finer detail: more energy in its highest frequencies than the upsampled input
    up = F.interpolate(batch["image"], scale_factor=2, mode="bilinear")
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    assert F.conv2d(views[2], lap).abs().mean() > 1.5 * F.conv2d(up, lap).abs().mean()


def test_miram_crop_and_flip_are_identical_across_scales():
    """A linear ramp sampled at 1x / 2x / 4x: every view pixel must equal the ramp at the source point its
    pixel centre maps to through the one crop box + flip of its sample (border-clamped like grid_sample)."""
    method = _method("miram", 8, overrides=["method.scales=[2,4]", "views.crop_scale=[0.2,0.7]",
                                            "views.flip_p=0.5", "views.flip_axes=[-1,-2]"])

    def ramp(n: int) -> torch.Tensor:
        c = (torch.arange(n) + 0.5) / n
        return (0.2 + 0.5 * c.view(n, 1) + 0.25 * c.view(1, n)).expand(6, 1, n, n).clone()

    batch = {"image": ramp(8), highres_key(2): ramp(16), highres_key(4): ramp(32)}
    views = method.make_views(batch, generator=torch.Generator().manual_seed(3))
    geom = method.views(batch["image"], generator=torch.Generator().manual_seed(3))  # the same draws
    assert geom.flips.any() and (~geom.flips).any()
    for s in (1, 2, 4):
        n = 8 * s
        assert views[s].shape == (6, 1, n, n)
        c = (torch.arange(n) + 0.5) / n
        pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).view(1, -1, 2).expand(6, -1, -1)
        src = view_to_source(pts, geom.boxes, geom.flips).clamp(0.5 / n, 1 - 0.5 / n)
        expected = (0.2 + 0.5 * src[..., 0] + 0.25 * src[..., 1]).view(6, 1, n, n)
        torch.testing.assert_close(views[s], expected, atol=1e-5, rtol=0)


def test_highres_copy_of_a_file_dataset_reads_the_source_again(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 64), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    ds = FolderDataset(tmp_path, image_size=16)
    data = HighResDataset(ds, (2, 4))
    item = data[1]
    for f in (2, 4):
        src = FolderDataset(tmp_path, image_size=16 * f)[1]["image"]
        torch.testing.assert_close(item[highres_key(f)], src)
        # the source read at f x is not the 16 px item resized (a 64 px source holds more detail)
        assert (item[highres_key(f)] - resize_image(item["image"], 16 * f)).abs().mean() > 0.02
    torch.testing.assert_close(item["image"], ds[1]["image"])
    # through the item cache (keyed by image size) and through drop_bad's subset view: the same copies
    cached = FolderDataset(tmp_path, image_size=16)
    assert cached.enable_cache(tmp_path / "cache")
    cached[1]  # fills the 16 px entry
    sub = drop_bad(cached)
    for d in (cached, sub):
        got = HighResDataset(d, (2,))[1]
        torch.testing.assert_close(got[highres_key(2)], item[highres_key(2)])
        torch.testing.assert_close(got["image"], item["image"])


def test_miram_without_highres_copy_is_a_clear_error():
    method = _method("miram", 16)
    with pytest.raises(DataError, match="image_highres"):
        method.training_step({"image": torch.rand(2, 1, 16, 16)})


# -- MIRAM: model and loss --------------------------------------------------------------------------------------
def test_miram_loss_is_the_equal_weight_sum_of_masked_losses_per_scale():
    ds = PhantomDataset("phantom2d", 8, image_size=16)
    batch = _batch(ds, factors=(2, 4))
    method = _method("miram", 16, overrides=["method.scales=[2,4]", "model.patch_size=4"])
    torch.manual_seed(1)
    out = method.training_step(batch)
    torch.manual_seed(1)
    views = method.make_views(batch)
    mask, ids = method.draw_mask(4, batch["image"].device)
    preds, targets, masks, _ = method.forward_scales(views, mask, ids)
    assert {s: tuple(p.shape) for s, p in preds.items()} == {1: (4, 16, 16), 2: (4, 64, 16), 4: (4, 256, 16)}
    grid_mask = mask.view(4, 4, 4)
    for s in (2, 4):
        assert torch.equal(masks[s], upsample_mask(grid_mask, s).view(4, -1))
        assert masks[s].float().mean() == mask.float().mean()
    parts = [reconstruction_loss(preds[s], targets[s], masks[s]) for s in (1, 2, 4)]
    torch.testing.assert_close(out.loss, sum(parts))
    assert out.logs["loss_2x"] == pytest.approx(float(parts[1].detach()), rel=1e-5)
    out.loss.backward()
    assert method.hr_decoders["x4"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert method.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_miram_nystrom_decoder_and_scale_validation():
    method = _method("miram", 16, overrides=["method.hr_attention=nystrom", "method.num_landmarks=16"])
    assert type(method.hr_decoders["x2"].blocks[0].attn).__name__ == "NystromAttention"
    batch = _batch(PhantomDataset("phantom2d", 4, image_size=16), n=2)
    assert torch.isfinite(method.training_step(batch).loss)
    assert MIRAM.view_spec_for({"scales": [2, 4]}).highres_factors == (2, 4)
    with pytest.raises(ConfigError, match="scales"):
        MIRAM.view_spec_for({"scales": [3]})
    with pytest.raises(ConfigError, match="hr_attention"):
        _method("miram", 16, overrides=["method.hr_attention=linear"])


def test_visualize_panels_per_scale():
    method = _method("miram", 16)
    batch = _batch(PhantomDataset("phantom2d", 8, image_size=16), n=6)
    with torch.no_grad():
        panels = method.visualize(batch, step=1)
    assert [p.scale for p in panels] == ["1x", "2x"]
    assert set(panels[0].columns) == {"input", "mask", "reconstruction", "target"}
    assert panels[1].columns["target"].shape == (4, 1, 32, 32)
    mask = panels[0].columns["mask"]
    assert mask.dtype == torch.bool and mask.float().mean() == pytest.approx(0.75)
    # visible pixels of the reconstruction are the target's; the masked input is zero where masked
    recon, target = panels[0].columns["reconstruction"], panels[0].columns["target"]
    torch.testing.assert_close(recon[~mask], target[~mask])
    assert torch.all(panels[0].columns["input"][mask] == 0)


# -- CLI --------------------------------------------------------------------------------------------------------
CLI_SMALL = ["--set", "method.decoder_dim=32", "--set", "method.decoder_depth=1", "--set", "method.decoder_heads=2",
             "--quiet"]


@pytest.mark.slow
def test_cli_mae_and_miram_pretrain_and_evaluate(tmp_path):
    for m in ("mae", "miram"):
        assert main(["pretrain", "--method", m, "--data", "phantom2d:64", "--image-size", "32", "--batch-size", "8",
                     "--max-steps", "6", "--out", str(tmp_path / m), *CLI_SMALL]) == 0
        assert (tmp_path / m / "encoder.safetensors").is_file()
    assert list((tmp_path / "miram" / "reconstructions").glob("*.png"))
    with (tmp_path / "miram" / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["loss"]) == pytest.approx(float(row["loss_1x"]) + float(row["loss_2x"]), rel=1e-4)
    assert main(["evaluate", "--run", str(tmp_path / "mae"), "--data", "phantom2d:64", "--init", "random",
                 "--label-fractions", "1.0", "--seeds", "0", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()


@pytest.mark.slow
def test_cli_mae_3d(tmp_path):
    assert main(["pretrain", "--method", "mae", "--data", "phantom3d:16", "--image-size", "32", "--batch-size", "2",
                 "--max-steps", "3", "--out", str(tmp_path / "mae3d"), *CLI_SMALL]) == 0
    assert (tmp_path / "mae3d" / "encoder.safetensors").is_file()
    assert list((tmp_path / "mae3d" / "reconstructions").glob("*.png"))
