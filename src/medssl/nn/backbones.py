"""Backbones: any timm model by name, built for the data's channels and size.

The backbone is a plain timm model created with ``num_classes=0`` (pooled features out), so its
``state_dict`` is in timm's key layout and loads into ``timm.create_model(name, num_classes=0,
in_chans=C)`` without key surgery. The one structural option is the CIFAR-style stem for small inputs.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from medssl.errors import ConfigError
from medssl.transforms.intensity import normalize

STEMS = ("default", "cifar")
#: the stem and stage modules of a ResNet (timm 2D, medssl 3D)
RESNET_PARTS = ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv, no pool.

    For 28-64 px inputs (MedMNIST, patches) the default stem reduces the image 4x before the first block
    and throws away the detail the task depends on (He et al. 2016, CIFAR variant). To rebuild such an
    exported encoder in plain timm::

        m = timm.create_model(name, num_classes=0, in_chans=C)
        m.conv1 = torch.nn.Conv2d(C, m.conv1.out_channels, 3, 1, 1, bias=False)
        m.maxpool = torch.nn.Identity()
        m.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))

    Raises:
        ConfigError: when the model has no ResNet-style ``conv1`` / ``maxpool`` stem.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"stem=cifar needs a ResNet-style backbone with a single conv1 + maxpool stem "
            f"(e.g. resnet18, resnet50); {type(model).__name__} has none"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def set_zero_init_last(model: nn.Module, zero: bool) -> int:
    """Set the scale (BatchNorm weight) of the last norm of every timm residual block to 0 (``zero``) or 1.

    timm ResNets zero-initialise it by default (``zero_init_last``, Goyal et al. 2017): each block starts as the
    identity. medssl measured that this start hurts short contrastive pretraining of small images (docs/methods/
    mocov2.md), hence ``model.zero_init_last``. Blocks are found by timm's ``zero_init_last`` method; their last
    norm is ``bn3`` (bottleneck) or ``bn2`` (basic block). Returns how many blocks were set (0 for other models).
    """
    n = 0
    for m in model.modules():
        if m is model or not callable(getattr(m, "zero_init_last", None)):
            continue
        bn = getattr(m, "bn3", None) if isinstance(getattr(m, "bn3", None), nn.Module) else getattr(m, "bn2", None)
        if getattr(bn, "weight", None) is None:
            continue
        with torch.no_grad():
            bn.weight.fill_(0.0 if zero else 1.0)
        n += 1
    return n


def is_vit(name: str) -> bool:
    """Whether a timm model name is a transformer that takes an ``img_size`` argument."""
    return any(t in name for t in ("vit", "deit", "eva", "beit", "swin", "cait", "xcit"))


def timm_kwargs(
    name: str, *, in_chans: int, image_size: int | None = None, patch_size: int | None = None,
    global_pool: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model(name, **kwargs)`` that build medssl's 2D backbone (without
    the CIFAR stem): ``num_classes=0``, ``in_chans`` and, for ViTs, ``img_size`` / ``patch_size`` /
    ``global_pool`` (with ``fc_norm=False`` so ``norm`` stays on the tokens and the key layout is timm's default).

    Raises:
        ConfigError: a ``global_pool`` other than ``token`` / ``avg``.
    """
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_chans}
    if image_size is not None and is_vit(name):
        kwargs["img_size"] = image_size
    if patch_size is not None and is_vit(name):
        kwargs["patch_size"] = patch_size
    if global_pool is not None and is_vit(name):
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"model.global_pool must be 'token' or 'avg', got '{global_pool}'")
        kwargs["global_pool"] = global_pool
        if name.startswith(("vit_", "deit")):  # timm VisionTransformer: keep `norm` on the tokens, no fc_norm
            kwargs["fc_norm"] = False
    return kwargs


def build_backbone(
    name: str,
    *,
    in_chans: int,
    image_size: int | None = None,
    stem: str = "default",
    pretrained: bool = False,
    spatial_dims: int = 2,
    patch_size: int | None = None,
    global_pool: str | None = None,
    zero_init_last: bool | None = None,
    init_from: str | None = None,
    init_adapt: str = "sum",
    init_inflate: bool = False,
    init_key: str = "model.init_from",
    dynamic_img_size: bool = False,
) -> nn.Module:
    """Create a timm backbone that returns pooled features ``(B, num_features)``.

    Args:
        name: timm model name.
        in_chans: input channels of the data (1 for grayscale).
        image_size: input side length; needed by ViTs for their position embeddings.
        stem: ``default`` or ``cifar`` (see :func:`apply_cifar_stem`).
        pretrained: load ImageNet weights (needs network access; fails with a clear message offline).
        spatial_dims: 2 or 3; 3D backbones come from :mod:`medssl.nn.backbones3d` (ResNets) and
            :mod:`medssl.nn.vit3d` (ViTs).
        patch_size: ViT patch side (``None`` = the model's own); ignored by CNNs.
        global_pool: ViT pooling, ``token`` or ``avg`` (mean of the patch tokens after the final norm, built
            with ``fc_norm=False`` so the key layout stays timm's default); ``None`` = the model's own.
        zero_init_last: start every residual block's last norm at scale 0 (``True``, timm's default) or 1
            (``False``), see :func:`set_zero_init_last`; ``None`` = as built. Not applied to pretrained weights
            (ImageNet or ``init_from``).
        init_from: start from these weights (:func:`medssl.nn.init_from.load_init_weights`: a local file,
            ``timm:NAME`` or ``hf-hub:ORG/NAME``), with ``init_adapt`` / ``init_inflate``; ``init_key`` is the config
            key named in its errors.
        dynamic_img_size: a 2D timm ViT that also takes other image sizes (its position embeddings resampled on
            the fly; DINO's local crops). The weights are the same.

    Raises:
        ConfigError: unknown name, unsupported stem, or weights that cannot be downloaded.
        CheckpointError: ``init_from`` weights that cannot be read or do not fit.
    """
    model = _build(name, in_chans=in_chans, image_size=image_size, stem=stem, pretrained=pretrained,
                   spatial_dims=spatial_dims, patch_size=patch_size, global_pool=global_pool,
                   dynamic_img_size=dynamic_img_size)
    if zero_init_last is not None and not pretrained:
        set_zero_init_last(model, zero_init_last)
    if init_from is not None:
        from medssl.nn.init_from import load_init_weights

        load_init_weights(model, init_from, key=init_key, adapt=init_adapt, inflate=init_inflate)
    return model


def _build(name: str, *, in_chans: int, image_size: int | None, stem: str, pretrained: bool, spatial_dims: int,
           patch_size: int | None, global_pool: str | None, dynamic_img_size: bool) -> nn.Module:
    if spatial_dims == 3:
        from medssl.nn.vit3d import build_vit3d, vit3d_name

        if vit3d_name(name) is not None:
            return build_vit3d(name, in_chans=in_chans, image_size=image_size, patch_size=patch_size,
                               global_pool=global_pool or "token")
        from medssl.nn.backbones3d import build_backbone_3d

        return build_backbone_3d(name, in_chans=in_chans, stem=stem)
    if stem not in STEMS:
        raise ConfigError(f"model.stem must be one of {STEMS}, got '{stem}'")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown backbone '{name}': not a timm model name{hint}")
    kwargs = timm_kwargs(name, in_chans=in_chans, image_size=image_size, patch_size=patch_size,
                         global_pool=global_pool)
    if dynamic_img_size and is_vit(name):
        kwargs["dynamic_img_size"] = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # network errors come in many types (OSError, HF hub errors, URLError)
        if pretrained:
            raise ConfigError(
                f"could not load ImageNet weights for '{name}' through timm ({type(e).__name__}: {e}). "
                "Without network access, use model.pretrained=false or place the weights in the HF cache."
            ) from None
        raise ConfigError(f"could not build backbone '{name}': {e}") from None
    if stem == "cifar":
        apply_cifar_stem(model)
    return model


def patch_size_of(backbone: nn.Module) -> int | None:
    """The patch side of a transformer backbone (``patch_embed.patch_size``); ``None`` for a CNN."""
    ps = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if ps is None:
        return None
    return int(ps[0]) if isinstance(ps, tuple | list) else int(ps)


def _stride(module: nn.Module) -> int:
    s = getattr(module, "stride", 1)
    return int(s[0]) if isinstance(s, tuple | list) else int(s)


def output_stride(backbone: nn.Module) -> int | None:
    """How far apart, in input pixels, neighbouring positions of a CNN's last feature map are.

    For a ResNet (timm 2D, medssl 3D): ``stride(conv1) · stride(maxpool) · Π_stages stride(first block)``
    (32 with the default stem, 8 with the ``cifar`` stem); for other timm CNNs the ``reduction`` of their last
    ``feature_info`` entry (a timm ViT's is its patch size). ``None`` when unknown.
    """
    if all(hasattr(backbone, part) for part in RESNET_PARTS):
        total = 1
        for stem in ("conv1", "maxpool"):
            for m in getattr(backbone, stem).modules():
                total *= _stride(m)
        for stage in RESNET_PARTS[2:]:
            first = next(iter(getattr(backbone, stage).children()), None)
            if first is not None:
                total *= max(_stride(m) for m in first.modules())
        return total
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and "reduction" in info[-1]:
        return int(info[-1]["reduction"])
    return None


def check_image_fits(backbone: nn.Module, name: str, image_size: int, key: str = "model.backbone") -> None:
    """Refuse an image size the backbone cannot use, before anything trains on it.

    * a transformer needs ``image_size`` to be a multiple of its patch size (otherwise the last partial
      row and column of patches is silently dropped, or there is no patch at all);
    * a CNN needs ``image_size >= output_stride / 2`` (:func:`output_stride`): its last stage may then see a
      single position, but no earlier stage does. Smaller images leave stride-2 layers computing from zero
      padding alone, which trains without error to meaningless features (e.g. ``--image-size 1``).

    Args:
        backbone: the built backbone.
        name: its model name.
        image_size: the side of the images it will see.
        key: the config key that chose the backbone (named in the message).

    Raises:
        ConfigError: naming ``data.image_size`` and ``key`` (and what would fit).
    """
    patch = patch_size_of(backbone)
    if patch is not None:
        if image_size % patch:
            lower, upper = max(patch, image_size // patch * patch), (image_size // patch + 1) * patch
            raise ConfigError(
                f"data.image_size {image_size} is not a multiple of the patch size {patch} of {key} "
                f"'{name}' (the ViT would drop the last {image_size % patch} px); choose --image-size {lower} "
                f"or {upper}"
            )
        return
    stride = output_stride(backbone)
    if stride is not None and image_size < stride / 2:
        hint = " or model.stem=cifar (stride 8)" if hasattr(backbone, "maxpool") and stride > 8 else ""
        raise ConfigError(
            f"data.image_size {image_size} is too small for {key} '{name}' (output stride {stride}): "
            f"it needs at least {(stride + 1) // 2} px; use a larger --image-size{hint}"
        )


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features a backbone returns."""
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ConfigError(f"cannot tell the feature width of {type(backbone).__name__}")


class Encoder(nn.Module):
    """What evaluation and users call: ``[0, 1]`` images in, pooled features out.

    Wraps a backbone with the intensity normalisation it was trained with, so callers never have to
    remember it.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def num_features(self) -> int:
        return feature_dim(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize(images))
