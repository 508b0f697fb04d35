"""A 3D Vision Transformer for volumes: cube patches, 3D position embeddings, timm transformer blocks.

timm has no 3D ViT, so medssl builds one from timm's own ``Block`` with the module names of timm's 2D
``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv`` ...,
``norm``), so that 2D and 3D weights read the same way. The patch embedding is a ``Conv3d`` with kernel =
stride = the cube side (Dosovitskiy et al. 2021, with the 3D patches of UNETR / MONAI's ViT, Hatamizadeh
et al. 2022); the position embeddings are fixed 3D sine-cosine (MAE's choice, He et al. 2022), stored as
a non-trainable parameter so that they travel with the weights.

Names: ``vit_tiny_3d`` (192 wide, 12 blocks, 3 heads), ``vit_small_3d`` (384, 12, 6), ``vit_base_3d``
(768, 12, 12), ``vit_large_3d`` (1024, 24, 16); patch side 16 unless given. A timm ViT name
(``vit_tiny_patch16_224``) selects its 3D counterpart with that name's patch size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from medssl.errors import ConfigError
from medssl.nn.patches import as_patch_size, grid_shape, sincos_pos_embed

#: name -> (width, depth, heads)
VIT3D_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_3d": (192, 12, 3),
    "vit_small_3d": (384, 12, 6),
    "vit_base_3d": (768, 12, 12),
    "vit_large_3d": (1024, 24, 16),
}
DEFAULT_PATCH_3D = 16
_TIMM_NAME = re.compile(r"^vit_(tiny|small|base|large)_patch(\d+)")


class PatchEmbed3d(nn.Module):
    """Cube patches → tokens: ``Conv3d`` with kernel = stride = patch, flattened to ``(B, N, D)``."""

    def __init__(self, image_size: int | Sequence[int], patch_size: int | Sequence[int], in_chans: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.patch_size = as_patch_size(patch_size, 3)
        self.img_size = as_patch_size(image_size, 3)
        try:
            self.grid_size = grid_shape(self.img_size, self.patch_size)
        except ValueError as e:
            raise ConfigError(f"3D ViT: {e}; choose an image size that is a multiple of the patch size") from None
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"3D ViT built for volumes {self.img_size}, got {tuple(x.shape[2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT3d(nn.Module):
    """A ViT over cube patches, returning the class token's features ``(B, num_features)``.

    Args:
        image_size: volume side (or ``(D, H, W)``), a multiple of ``patch_size``.
        patch_size: cube side (or one per axis).
        in_chans: input channels.
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        global_pool: features returned by ``forward``: ``token`` (the class token) or ``avg`` (the mean of the
            patch tokens), after the final norm.
    """

    def __init__(self, image_size: int | Sequence[int], patch_size: int | Sequence[int] = DEFAULT_PATCH_3D,
                 in_chans: int = 1, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, global_pool: str = "token") -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"model.global_pool must be 'token' or 'avg', got '{global_pool}'")
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed3d(image_size, patch_size, in_chans, embed_dim)
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.embed_dim = self.num_features = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = None
        pos = sincos_pos_embed(embed_dim, self.patch_embed.grid_size, num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_vit_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``(B, 1 + N, D)``."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        return tokens[:, 1:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]


def init_vit_weights(vit: nn.Module) -> None:
    """MAE's initialisation of a whole ViT (He et al. 2022), the one medssl uses for every ViT it trains from
    scratch, 2D (timm) and 3D (:class:`ViT3d`): xavier-uniform linear layers (``qkv`` included, as one
    ``(3D, D)`` matrix), zero biases, unit LayerNorms; the patch embedding's convolution xavier-uniform as the
    ``(D, C·patch)`` matrix it is; class / register tokens normal with std 0.02. Position embeddings are left
    alone (MAE fixes them to sine-cosine; see :class:`~medssl.nn.masked_vit.MaskedViT`).
    """
    for name in ("cls_token", "reg_token"):
        token = getattr(vit, name, None)
        if isinstance(token, torch.Tensor):
            nn.init.normal_(token, std=0.02)
    init_transformer_weights(vit)
    proj = getattr(getattr(vit, "patch_embed", None), "proj", None)
    if proj is not None and getattr(proj, "weight", None) is not None:
        w = proj.weight
        with torch.no_grad():
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def init_transformer_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers, zero biases, unit LayerNorms (MAE's initialisation), for every submodule."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def vit3d_name(name: str) -> tuple[str, int | None] | None:
    """The 3D ViT a name selects and the patch size it implies: ``vit_tiny_3d`` → (``vit_tiny_3d``, None),
    ``vit_small_patch16_224`` → (``vit_small_3d``, 16); ``None`` when the name is no ViT we can build in 3D."""
    if name in VIT3D_SIZES:
        return name, None
    m = _TIMM_NAME.match(name)
    if m:
        return f"vit_{m.group(1)}_3d", int(m.group(2))
    return None


def build_vit3d(name: str, *, in_chans: int, image_size: int | None, patch_size: int | None = None,
                global_pool: str = "token") -> ViT3d:
    """Build a 3D ViT by name (see the module docstring).

    Raises:
        ConfigError: an unknown name, no image size, or an image size that is not a multiple of the patch.
    """
    found = vit3d_name(name)
    if found is None:
        raise ConfigError(f"backbone '{name}' has no 3D ViT version; 3D ViTs: {', '.join(VIT3D_SIZES)}")
    if image_size is None:
        raise ConfigError(f"3D ViT '{name}' needs the volume size (data.image_size)")
    key, implied = found
    dim, depth, heads = VIT3D_SIZES[key]
    return ViT3d(image_size, patch_size or implied or DEFAULT_PATCH_3D, in_chans=in_chans, embed_dim=dim,
                 depth=depth, num_heads=heads, global_pool=global_pool)
