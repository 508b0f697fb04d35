"""The masked ViT shared by MAE and MIRAM: an encoder that runs on the visible tokens only, and decoders.

:class:`MaskedViT` wraps a plain ViT — timm's ``VisionTransformer`` in 2D, :class:`~medssl.nn.vit3d.ViT3d`
in 3D — without copying or renaming its weights: the exported encoder is the wrapped model itself, so a 2D
encoder loads with a strict ``load_state_dict`` into ``timm.create_model(name, num_classes=0, in_chans=C,
img_size=S, patch_size=P)``. Its masked forward embeds every patch, adds the position embeddings, keeps
only the visible tokens (a gather by index, so the transformer blocks see ``(1 - ratio) * N`` tokens plus
the class token and their cost falls with the mask ratio; He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022) and runs the blocks and the final norm.

:class:`TokenDecoder` is MAE's decoder: a linear map to the decoder width, a learned mask token put back at
the masked positions, fixed sine-cosine position embeddings, transformer blocks and a linear prediction of
each patch's pixels. :class:`UpscaleDecoder` is MIRAM's higher-scale decoder (Vo et al., arXiv
2503.07157): token interpolation of a decoded grid, its own position embeddings and blocks (full or
Nyström attention) and a prediction of the patches of an image ``factor`` times larger.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from medssl.errors import ConfigError
from medssl.nn.attention import transformer_block
from medssl.nn.patches import as_patch_size, interpolate_tokens, sincos_pos_embed
from medssl.nn.vit3d import init_transformer_weights, init_vit_weights

#: tokens per side the default patch size aims at when the model's own patch would give too few tokens
_FALLBACK_SIDE = {2: 8, 3: 4}
_MIN_TOKENS = 48


def native_patch_size(name: str, spatial_dims: int) -> int:
    """The patch size a ViT name implies (``vit_small_patch16_224`` → 16; 3D names → 16)."""
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def resolve_patch_size(name: str, image_size: int, spatial_dims: int, patch_size: int | None = None) -> int:
    """The patch side a masked ViT uses: ``patch_size`` if given, else the model's own when that leaves at
    least 48 tokens (224/16 → 196, 112/16 → 49, 64³/16 → 64), else the side that gives 8 x 8 tokens (2D) or
    4 x 4 x 4 (3D) (32 px → 4, 64 px → 8, 32³ → 8), so that small CPU images still make a useful grid, but
    never below 2 (a one-pixel patch of a grey image has no variance to normalise a norm-pix target by).

    Raises:
        ConfigError: an image size that is not a multiple of the patch size.
    """
    if patch_size is None:
        native = native_patch_size(name, spatial_dims)
        if image_size % native == 0 and (image_size // native) ** spatial_dims >= _MIN_TOKENS:
            patch_size = native
        else:
            patch_size = max(2, image_size // _FALLBACK_SIDE[spatial_dims])
    if patch_size < 1 or image_size % patch_size:
        raise ConfigError(
            f"data.image_size {image_size} is not a multiple of the ViT patch size {patch_size} "
            f"(model.patch_size); set model.patch_size (or --image-size) so that it divides the image"
        )
    return int(patch_size)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]`` for every sample: ``(B, N, D)``, ``(B, K)`` → ``(B, K, D)``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the visible (``False``) tokens of a flat mask, ascending, one row per sample.

    Args:
        mask: ``(B, N)`` bool, ``True`` = masked, the same count per sample (as every strategy of
            :mod:`medssl.transforms.masking` gives).

    Returns:
        ``(B, N_visible)`` int64.

    Raises:
        ValueError: samples with different numbers of visible tokens.
    """
    visible = (~mask).sum(dim=1)
    if mask.shape[0] and bool((visible != visible[0]).any()):
        raise ValueError("every sample must keep the same number of visible tokens")
    n_vis = int(visible[0]) if mask.shape[0] else 0
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :n_vis]


class MaskedViT(nn.Module):
    """Run a ViT on the visible tokens of a masked image (see the module docstring).

    Args:
        vit: timm ``VisionTransformer`` (2D) or :class:`~medssl.nn.vit3d.ViT3d` (3D), built for the input size.
        spatial_dims: 2 or 3.
        fixed_pos_embed: replace the position embeddings by fixed sine-cosine ones and freeze them (MAE's
            choice); leave off for pretrained weights.
        init_weights: re-initialise the ViT as MAE does (:func:`~medssl.nn.vit3d.init_vit_weights`: xavier-uniform
            linear layers, ``qkv`` included) — timm's 2D ViTs come with their own initialisation (truncated
            normal, std 0.02), medssl's 3D ViT with MAE's already; leave off for pretrained weights.

    Raises:
        ConfigError: a model this wrapper cannot drive (no patch embedding / blocks, dynamic image size).
    """

    def __init__(self, vit: nn.Module, spatial_dims: int, fixed_pos_embed: bool = True,
                 init_weights: bool = False) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "norm", "pos_embed", "cls_token"):
            if not hasattr(vit, attr):
                raise ConfigError(f"masked ViT: {type(vit).__name__} has no '{attr}' (not a ViT?)")
        if getattr(vit, "dynamic_img_size", False):
            raise ConfigError("masked ViT: dynamic_img_size ViTs are not supported")
        self.vit = vit
        self.spatial_dims = spatial_dims
        self.patch_size = as_patch_size(tuple(vit.patch_embed.patch_size), spatial_dims)
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_patches = math.prod(self.grid)
        self.embed_dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        if init_weights:
            init_vit_weights(vit)
        if fixed_pos_embed and vit.pos_embed is not None:
            prefix = 0 if getattr(vit, "no_embed_class", False) else self.num_prefix_tokens
            with torch.no_grad():
                vit.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.grid, num_prefix_tokens=prefix))
            vit.pos_embed.requires_grad_(False)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with their position embeddings ``(B, N, D)`` and prefix tokens ``(B, P, D)``.

        With ``mask`` ``(B, N)`` (``True`` = masked) and ``mask_token`` ``(1, 1, D)``, the embeddings of the masked
        patches are replaced by the mask token before the position embeddings are added (SimMIM's full-sequence
        encoder).
        """
        vit = self.vit
        tokens = vit.patch_embed(x)
        if mask is not None and mask_token is not None:
            w = mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
        b = tokens.shape[0]
        prefix = [vit.cls_token.expand(b, -1, -1)] if vit.cls_token is not None else []
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        pre = torch.cat(prefix, dim=1) if prefix else tokens[:, :0]
        pos = vit.pos_embed
        if pos is not None:
            if getattr(vit, "no_embed_class", False):
                tokens = tokens + pos
            else:
                pre = pre + pos[:, : pre.shape[1]]
                tokens = tokens + pos[:, pre.shape[1] :]
        return tokens, pre

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the visible tokens.

        Args:
            x: normalised images ``(B, C, *spatial)``.
            ids_keep: ``(B, N_visible)`` indices of the visible patches (:func:`visible_indices`);
                ``None`` = all patches.
            mask: with ``mask_token``: masked patches enter as the mask token (see :meth:`embed`).
            mask_token: ``(1, 1, D)``.

        Returns:
            ``(B, P + N_visible, D)``: prefix tokens then the visible tokens in ``ids_keep`` order, after the
            final norm.
        """
        tokens, pre = self.embed(x, mask, mask_token)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        h = torch.cat([pre, tokens], dim=1)
        h = getattr(self.vit, "pos_drop", nn.Identity())(h)
        h = getattr(self.vit, "norm_pre", nn.Identity())(h)
        return self.vit.norm(self.vit.blocks(h))


class TokenDecoder(nn.Module):
    """MAE's decoder (He et al. 2022): latent tokens + mask tokens → pixels of every patch.

    Args:
        encoder_dim: width of the encoder's tokens.
        grid: the patch grid.
        patch_numel: pixels per patch times channels (the prediction width).
        dim: decoder width (512 in MAE).
        depth: decoder blocks (8 in MAE).
        num_heads: heads (16 in MAE).
        num_prefix_tokens: prefix tokens the encoder outputs (1: the class token).
        mlp_ratio: MLP width / ``dim``.
    """

    def __init__(self, encoder_dim: int, grid: Sequence[int], patch_numel: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, num_prefix_tokens: int = 1, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.grid = tuple(grid)
        self.num_patches = math.prod(self.grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, self.grid, num_prefix_tokens), requires_grad=False)
        self.blocks = nn.Sequential(*[transformer_block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_numel)
        init_transformer_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_tokens(self, latent: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Decoded patch tokens ``(B, N, dim)`` (after the blocks, before the norm; prefix tokens dropped).

        Args:
            latent: encoder output ``(B, P + N_visible, encoder_dim)``.
            ids_keep: the indices the encoder kept (``None`` = all patches).
        """
        x = self.embed(latent)
        p = self.num_prefix_tokens
        pre, vis = x[:, :p], x[:, p:]
        if ids_keep is None:
            full = vis
        else:
            b, _, d = vis.shape
            full = self.mask_token.to(vis.dtype).expand(b, self.num_patches, d)
            full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), vis)
        h = self.blocks(torch.cat([pre, full], dim=1) + self.pos_embed)
        return h[:, p:]

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch ``(B, N, patch_numel)`` from decoded tokens."""
        return self.pred(self.norm(tokens))


class UpscaleDecoder(nn.Module):
    """MIRAM's decoder at ``factor`` times the previous scale (Vo et al. 2025).

    Takes a decoded token grid, repeats each token ``factor`` times per axis (token interpolation, see
    :func:`~medssl.nn.patches.interpolate_tokens`), adds its own fixed sine-cosine position embeddings of
    the finer grid, runs its own blocks and predicts the patches (same patch size in pixels) of an image
    ``factor`` times larger per axis.

    Args:
        dim: token width (that of the decoder it follows).
        coarse_grid: the grid it receives.
        factor: token repetition per axis.
        patch_numel: pixels per patch times channels.
        depth: blocks.
        num_heads: heads.
        attention: ``full`` or ``nystrom`` (linear cost, :mod:`medssl.nn.attention`).
        num_landmarks: Nyström landmarks.
        mlp_ratio: MLP width / ``dim``.
    """

    def __init__(self, dim: int, coarse_grid: Sequence[int], factor: int, patch_numel: int, depth: int = 2,
                 num_heads: int = 16, attention: str = "full", num_landmarks: int = 64,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.coarse_grid = tuple(coarse_grid)
        self.factor = int(factor)
        self.grid = tuple(g * self.factor for g in self.coarse_grid)
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, self.grid), requires_grad=False)
        self.blocks = nn.Sequential(*[
            transformer_block(dim, num_heads, mlp_ratio, attention=attention, num_landmarks=num_landmarks)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_numel)
        init_transformer_weights(self)

    def forward_tokens(self, coarse: torch.Tensor) -> torch.Tensor:
        """Decoded tokens of the finer grid ``(B, prod(grid), dim)`` from ``(B, prod(coarse_grid), dim)``."""
        x = interpolate_tokens(coarse, self.coarse_grid, self.factor) + self.pos_embed
        return self.blocks(x)

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch of the finer image ``(B, prod(grid), patch_numel)``."""
        return self.pred(self.norm(tokens))


