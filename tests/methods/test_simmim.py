"""SimMIM: the loss counts masked pixels only, the mask token enters at masked positions only, mask units."""

from __future__ import annotations

import pytest
import torch

from medssl.api import make_config
from medssl.errors import ConfigError
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods import DataInfo, build_method
from medssl.transforms.intensity import normalize


def _method(overrides: list[str] | None = None, sd: int = 2, size: int = 32):
    cfg = make_config(method="simmim", data=f"phantom{sd}d", image_size=size,
                      overrides=["model.patch_size=8"] + (overrides or []))
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=16))


def test_l1_loss_is_over_masked_pixels_only() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = reconstruction_loss(pred, target, mask, norm_pix=False, metric="l1")
    by_hand = sum(float((pred[b, i] - target[b, i]).abs().sum()) for b in range(2) for i in range(6) if mask[b, i])
    assert float(loss) == pytest.approx(by_hand / (int(mask.sum()) * 5), rel=1e-6)
    changed = torch.where(mask.unsqueeze(-1), pred, pred + 100.0)  # visible predictions do not count
    assert float(reconstruction_loss(changed, target, mask, norm_pix=False, metric="l1")) == pytest.approx(float(loss))
    with pytest.raises(ValueError, match="metric"):
        reconstruction_loss(pred, target, mask, metric="l3")


def test_step_loss_ignores_visible_patches_and_mask_token_reaches_masked_positions_only() -> None:
    m = _method()
    images = torch.rand(2, 1, 32, 32)
    views = m.make_views({"image": images})
    mask, _ = m.draw_mask(2, images.device)
    assert int(mask.sum()) == 2 * round(0.6 * 16)
    preds, targets, masks, latent = m.forward_scales(views, mask, None)
    assert latent.shape[1] == 1 + 16  # the full sequence: every position
    # the encoder's patch-token input: mask token where masked, the patch embedding elsewhere
    x = normalize(views[1])
    tokens, _ = m.encoder.embed(x, mask, m.mask_token)
    plain, _ = m.encoder.embed(x)
    pos = m.encoder.vit.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[mask], (m.mask_token + pos).expand(2, -1, -1)[mask])
    torch.testing.assert_close(tokens[~mask], plain[~mask])
    loss = reconstruction_loss(preds[1], targets[1], masks[1], norm_pix=False, metric="l1")
    preds_vis = torch.where(mask.unsqueeze(-1), preds[1], torch.zeros_like(preds[1]))
    torch.testing.assert_close(reconstruction_loss(preds_vis, targets[1], masks[1], norm_pix=False, metric="l1"),
                               loss)
    out = m.training_step({"image": images})
    out.loss.backward()
    assert m.mask_token.grad is not None and m.head.weight.grad is not None


def test_mask_units_cover_whole_groups_of_patches_and_bad_units_are_refused() -> None:
    m = _method(["method.mask_unit=16"])  # 2 x 2 patches per unit on a 4 x 4 patch grid
    mask, _ = m.draw_mask(3, torch.device("cpu"))
    grid = mask.view(3, 4, 4)
    blocks = grid.view(3, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 4, 4)
    assert bool((blocks == blocks[..., :1]).all())  # every unit is all masked or all visible
    assert int(mask[0].sum()) == 4 * round(0.6 * 4)
    with pytest.raises(ConfigError, match="method.mask_unit 12 must be a multiple"):
        _method(["method.mask_unit=12"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        _method(["method.mask_ratio=0"])


def test_3d_full_sequence() -> None:
    m = _method(sd=3, size=16, overrides=["model.patch_size=4"])
    out = m.training_step({"image": torch.rand(2, 1, 16, 16, 16)})
    assert torch.isfinite(out.loss.detach())
