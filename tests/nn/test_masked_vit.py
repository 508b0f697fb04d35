"""Patches, position embeddings, the masked ViT (2D timm, 3D own), decoders and Nyström attention."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import safetensors.torch as st
import timm
import torch
from timm.models.vision_transformer import Attention

from medssl.api import make_config
from medssl.encoders import load_encoder
from medssl.errors import ConfigError
from medssl.export import export_encoders
from medssl.methods import DataInfo, build_method
from medssl.nn.attention import NystromAttention, iterative_pinv, transformer_block
from medssl.nn.masked_vit import (
    MaskedViT,
    TokenDecoder,
    UpscaleDecoder,
    gather_tokens,
    resolve_patch_size,
    visible_indices,
)
from medssl.nn.patches import interpolate_tokens, patchify, sincos_pos_embed, unpatchify
from medssl.nn.vit3d import build_vit3d
from medssl.transforms.masking import MaskConfig, mask_grid


def _tiny_vit2d(depth: int = 2) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=0, depth=depth)


# -- patchify / unpatchify -----------------------------------------------------------------------------------
def test_patchify_matches_loop_reference_2d():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    out = patchify(x, p, 2)
    assert out.shape == (2, 2 * 3, p * p * 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (C, p, p)
                expected = patch.permute(1, 2, 0).reshape(-1)  # (p, p, C) row-major
                torch.testing.assert_close(out[b, i * 3 + j], expected, rtol=0, atol=0)


def test_patchify_matches_loop_reference_3d():
    x = torch.randn(1, 2, 4, 6, 8)
    p = 2
    out = patchify(x, p, 3)
    g = (2, 3, 4)
    assert out.shape == (1, 24, 8 * 2)
    k = 0
    for d in range(g[0]):
        for h in range(g[1]):
            for w in range(g[2]):
                patch = x[0, :, d * p:(d + 1) * p, h * p:(h + 1) * p, w * p:(w + 1) * p]
                torch.testing.assert_close(out[0, k], patch.permute(1, 2, 3, 0).reshape(-1), rtol=0, atol=0)
                k += 1


@pytest.mark.parametrize("shape,patch,sd", [((2, 1, 32, 32), 4, 2), ((3, 3, 8, 16), (2, 4), 2),
                                            ((2, 1, 16, 16, 16), 4, 3), ((1, 2, 8, 4, 12), (2, 2, 3), 3)])
def test_unpatchify_inverts_patchify(shape, patch, sd):
    x = torch.randn(shape)
    ps = (patch,) * sd if isinstance(patch, int) else patch
    grid = tuple(n // p for n, p in zip(shape[2:], ps, strict=True))
    y = unpatchify(patchify(x, patch, sd), patch, grid, shape[1])
    assert torch.equal(x, y)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 10, 10), 4, 2)


# -- per-axis patch sizes (moved from tests/methods/test_cnnmim.py, where cnnmim had its own patchify) -----------
@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), (4, 2)), ((2, 2, 4, 6, 8), (2, 3, 4))])
def test_patchify_per_axis_patch_against_loop_and_roundtrip(shape: tuple[int, ...], p: tuple[int, ...]) -> None:
    sd = len(p)
    x = torch.randn(shape)
    patches = patchify(x, p, sd)
    grid = [s // q for s, q in zip(shape[2:], p, strict=True)]
    assert patches.shape == (shape[0], math.prod(grid), shape[1] * math.prod(p))
    for k, unit in enumerate(itertools.product(*(range(g) for g in grid))):  # row-major grid order
        region = (0, slice(None), *(slice(u * q, (u + 1) * q) for u, q in zip(unit, p, strict=True)))
        expected = x[region].permute(*range(1, sd + 1), 0).reshape(-1)  # (*patch, C), channels last
        assert torch.equal(patches[0, k], expected)
    assert torch.equal(unpatchify(patches, p, grid, shape[1]), x)


# -- position embeddings, token interpolation -------------------------------------------------------------------
def test_sincos_2d_against_formula():
    dim, grid = 8, (3, 5)
    emb = sincos_pos_embed(dim, grid, num_prefix_tokens=1)[0]
    assert emb.shape == (1 + 15, dim)
    assert torch.all(emb[0] == 0)
    per = dim // 2  # channels per axis
    omega = [1.0 / 10000 ** (k / (per / 2)) for k in range(per // 2)]
    for h in range(3):
        for w in range(5):
            row = emb[1 + h * 5 + w].double()
            expected = []
            for pos in (h, w):
                expected += [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]
            torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sincos_3d_splits_width_per_axis_and_pads():
    emb = sincos_pos_embed(20, (2, 2, 2))[0]  # 2 * (20 // 6) = 6 channels per axis, 2 zero channels
    assert emb.shape == (8, 20)
    assert torch.all(emb[:, 18:] == 0)
    # the depth block changes along depth only: tokens 0 (d=0) and 4 (d=1) differ there, 0 and 1 (w) do not
    assert not torch.allclose(emb[0, :6], emb[4, :6]) and torch.allclose(emb[0, :6], emb[1, :6])
    assert torch.allclose(emb[0, 12:18], emb[4, 12:18]) and not torch.allclose(emb[0, 12:18], emb[1, 12:18])


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 2)])
def test_interpolate_tokens_repeats_each_token_over_its_area(grid):
    b, d, f = 2, 5, 2
    tokens = torch.randn(b, math.prod(grid), d)
    out = interpolate_tokens(tokens, grid, f)
    fine = tuple(g * f for g in grid)
    assert out.shape == (b, math.prod(fine), d)
    coarse_idx = np.arange(math.prod(grid)).reshape(grid)
    for j, pos in enumerate(np.ndindex(*fine)):
        src = coarse_idx[tuple(p // f for p in pos)]
        assert torch.equal(out[:, j], tokens[:, src])


# -- masked encoder --------------------------------------------------------------------------------------------
def test_resolve_patch_size():
    assert resolve_patch_size("vit_base_patch16_224", 224, 2) == 16
    assert resolve_patch_size("vit_base_patch16_224", 112, 2) == 16  # MIRAM's ViT-B/16 at 112 px: 49 tokens
    assert resolve_patch_size("vit_tiny_patch16_224", 32, 2) == 4
    assert resolve_patch_size("vit_tiny_3d", 32, 3) == 8
    assert resolve_patch_size("vit_tiny_3d", 64, 3) == 16
    with pytest.raises(ConfigError, match="multiple"):
        resolve_patch_size("vit_tiny_patch16_224", 30, 2, patch_size=4)


def test_visible_indices_and_gather():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    ids = visible_indices(mask)
    assert ids.tolist() == [[1, 3], [0, 1]]
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(gather_tokens(x, ids), torch.stack([x[0, [1, 3]], x[1, [0, 1]]]))
    with pytest.raises(ValueError, match="same number"):
        visible_indices(torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize("sd", [2, 3])
def test_encoder_receives_exactly_the_visible_tokens(sd):
    vit = _tiny_vit2d() if sd == 2 else build_vit3d("vit_tiny_3d", in_chans=1, image_size=16, patch_size=4)
    enc = MaskedViT(vit, sd)
    n = enc.num_patches
    assert n == (64 if sd == 2 else 64)
    seen = []
    enc.vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    size = (32, 32) if sd == 2 else (16, 16, 16)
    x = torch.randn(3, 1, *size)
    for ratio in (0.0, 0.5, 0.75):
        mask = mask_grid(MaskConfig("random", ratio, 4), 3, enc.grid).reshape(3, -1)
        ids = visible_indices(mask) if mask.any() else None
        out = enc(x, ids)
        n_vis = n - round(ratio * n)
        assert seen[-1] == (3, 1 + n_vis, enc.embed_dim)
        assert out.shape == (3, 1 + n_vis, enc.embed_dim)


def test_masked_forward_equals_reference_on_gathered_tokens():
    vit = _tiny_vit2d().eval()
    enc = MaskedViT(vit, 2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        # all tokens: the plain timm forward
        torch.testing.assert_close(enc(x), vit.forward_features(x))
        # a subset: embed by hand, keep the chosen tokens with a Python loop, run blocks + norm
        keep = [[0, 5, 9, 63], [1, 2, 40, 62]]
        ids = torch.tensor(keep)
        tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        cls = vit.cls_token + vit.pos_embed[:, :1]
        ref = torch.stack([torch.cat([cls[0], tokens[b, keep[b]]]) for b in range(2)])
        ref = vit.norm(vit.blocks(ref))
        torch.testing.assert_close(enc(x, ids), ref)


def test_fixed_pos_embed_is_sincos_and_frozen():
    enc = MaskedViT(_tiny_vit2d(), 2)
    torch.testing.assert_close(enc.vit.pos_embed.data, sincos_pos_embed(192, (8, 8), num_prefix_tokens=1))
    assert not enc.vit.pos_embed.requires_grad


def test_vit3d_features_and_cost_with_mask():
    vit = build_vit3d("vit_small_patch8_224", in_chans=2, image_size=16)  # timm name -> vit_small_3d, patch 8
    assert vit.embed_dim == 384 and vit.patch_embed.patch_size == (8, 8, 8) and vit.patch_embed.num_patches == 8
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert tokens.shape == (2, 9, 384)
        torch.testing.assert_close(vit(x), tokens[:, 0])
        vit.global_pool = "avg"
        torch.testing.assert_close(vit(x), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ConfigError, match="no 3D ViT"):
        build_vit3d("resnet18", in_chans=1, image_size=16)


# -- decoders ------------------------------------------------------------------------------------------------
def test_token_decoder_puts_mask_tokens_at_masked_positions():
    dec = TokenDecoder(encoder_dim=6, grid=(2, 2), patch_numel=5, dim=8, depth=0, num_heads=2)
    latent = torch.randn(1, 1 + 2, 6)
    ids = torch.tensor([[1, 3]])
    with torch.no_grad():
        out = dec.forward_tokens(latent, ids)  # depth 0: embedded tokens + position embeddings only
        emb = dec.embed(latent)
        pos = dec.pos_embed[0, 1:]
        torch.testing.assert_close(out[0, 1], emb[0, 1] + pos[1])
        torch.testing.assert_close(out[0, 3], emb[0, 2] + pos[3])
        torch.testing.assert_close(out[0, 0], dec.mask_token[0, 0] + pos[0])
        torch.testing.assert_close(out[0, 2], dec.mask_token[0, 0] + pos[2])
    assert dec.predict(out).shape == (1, 4, 5)


@pytest.mark.parametrize("attention", ["full", "nystrom"])
def test_upscale_decoder_shapes(attention):
    dec = UpscaleDecoder(dim=16, coarse_grid=(4, 4), factor=2, patch_numel=16, depth=1, num_heads=2,
                         attention=attention, num_landmarks=8)
    tokens = dec.forward_tokens(torch.randn(2, 16, 16))
    assert dec.grid == (8, 8) and tokens.shape == (2, 64, 16)
    assert dec.predict(tokens).shape == (2, 64, 16)


# -- attention -----------------------------------------------------------------------------------------------
def test_iterative_pinv_matches_linalg_pinv():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 6, 6) * 2, dim=-1).double()
    torch.testing.assert_close(iterative_pinv(a, iterations=30), torch.linalg.pinv(a), atol=1e-6, rtol=1e-5)


def _nystrom_like(full: Attention, landmarks: int) -> NystromAttention:
    ny = NystromAttention(32, num_heads=4, num_landmarks=landmarks)
    ny.load_state_dict({k: v for k, v in full.state_dict().items() if k.split(".")[0] in ("qkv", "proj")})
    return ny


def test_nystrom_equals_full_attention_with_all_landmarks():
    torch.manual_seed(0)
    full = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 32)
    ny = _nystrom_like(full, landmarks=10).eval()
    ny.pinv_iterations = 20
    with torch.no_grad():
        ref, out = full(x), ny(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_nystrom_with_few_landmarks_approximates_smooth_attention():
    torch.manual_seed(0)
    full = Attention(32, num_heads=4, qkv_bias=True).eval()
    # a smooth sequence (neighbouring tokens alike), the case segment-mean landmarks are made for
    t = torch.linspace(0, 1, 64)
    x = torch.stack([torch.sin(2 * math.pi * (k + 1) * t / 4) for k in range(32)], dim=-1).unsqueeze(0)
    ny = _nystrom_like(full, landmarks=16).eval()
    with torch.no_grad():
        ref, out = full(x), ny(x)
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)


def test_transformer_block_rejects_unknown_attention():
    with pytest.raises(ConfigError, match="attention"):
        transformer_block(16, 2, attention="linformer")


# -- export ------------------------------------------------------------------------------------------------
def test_exported_2d_encoder_loads_strictly_into_fresh_timm_vit(tmp_path):
    cfg = make_config(method="mae", data="phantom2d", image_size=32,
                      overrides=["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"])
    method = build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=16))
    assert cfg.model.backbone == "vit_tiny_patch16_224" and cfg.model.patch_size == 4
    assert cfg.model.global_pool == "avg"
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained-looking weights, not timm's init
    path = export_encoders(method, tmp_path)[0]
    # timm's default ViT (class-token pooling) takes the weights as they are
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32, patch_size=4)
    fresh.load_state_dict(st.load_file(str(path)), strict=True)
    # and so does the mean-pooled one the metadata describes, whose features medssl evaluates
    pooled = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32, patch_size=4,
                               global_pool="avg", fc_norm=False)
    pooled.load_state_dict(st.load_file(str(path)), strict=True)
    enc = load_encoder(path)
    x = torch.rand(2, 1, 32, 32)
    xn = (x - 0.5) / 0.5
    with torch.no_grad():
        tokens = fresh.eval().forward_features(xn)
        torch.testing.assert_close(enc(x), tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(pooled.eval()(xn), enc(x))
        torch.testing.assert_close(fresh(xn), tokens[:, 0])
        torch.testing.assert_close(method.encoder.vit.eval()(xn), enc(x))


def test_global_pool_choice_is_validated():
    from medssl.nn.backbones import build_backbone

    with pytest.raises(ConfigError, match="global_pool"):
        build_backbone("vit_tiny_patch16_224", in_chans=1, image_size=32, patch_size=4, global_pool="max")
    with pytest.raises(ConfigError, match="global_pool"):
        build_backbone("vit_tiny_3d", in_chans=1, image_size=16, patch_size=8, spatial_dims=3, global_pool="max")
