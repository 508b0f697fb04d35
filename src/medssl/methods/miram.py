"""MIRAM: masked image reconstruction across multiple scales (MAE + decoders at 2x and 4x the resolution).

Vo et al., "MIRAM: Masked Image Reconstruction Across Multiple Scales for Breast Lesion Risk Prediction",
arXiv 2503.07157 (2025).

The encoder and the 1x decoder are MAE's (:mod:`medssl.methods.mae`). A 2x decoder
(:class:`~medssl.nn.masked_vit.UpscaleDecoder`) takes the 1x decoder's token grid, repeats every token 2x2
(token interpolation), adds its own position embeddings, runs its own blocks and predicts the patches of an
image twice the input size; an optional 4x decoder does the same on the 2x decoder's grid. The hypothesis
is that reconstructing at high resolution makes the encoder attend to fine detail, so the 2x / 4x targets
are the *same crop read from the source at 2x / 4x the resolution* (:mod:`medssl.data.highres`), not the
input upsampled — the authors' released code nearest-upsampled the input, a target with no more detail
than the input; medssl does not. ``L = Σ_scales MSE_scale`` with equal weights, norm-pix targets, masked
patches only at every scale (a 2x patch is masked when the input patch it lies in is masked; the authors'
code averaged over all patches).

The high-resolution decoders have 4x (2x scale) and 16x (4x scale) as many tokens as the 1x grid; their
attention is ``full`` or ``nystrom`` (linear cost, :mod:`medssl.nn.attention`). Documented choices where
the paper gives no detail: the higher scales are a cascade (4x refines the 2x grid), each scale's decoder
has the 1x decoder's width and heads and ``hr_decoder_depth`` blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.checks import FieldError, check_choice, check_range
from medssl.config import ModelConfig
from medssl.data.highres import highres_key
from medssl.errors import DataError
from medssl.methods.base import DataInfo, ViewSpec
from medssl.methods.mae import MAE, MAEConfig, Scales
from medssl.methods.registry import register
from medssl.nn.attention import ATTENTIONS
from medssl.nn.masked_vit import UpscaleDecoder
from medssl.nn.patches import patchify
from medssl.transforms.intensity import normalize
from medssl.transforms.masking import upsample_mask
from medssl.transforms.spatial import crop_resize
from medssl.transforms.views import ViewConfig

#: the allowed ``scales`` settings: the scales reconstructed besides 1x
SCALE_CHOICES = ((2,), (2, 4))


@dataclass
class MIRAMConfig(MAEConfig):
    """MIRAM hyper-parameters (MAE's plus the higher scales).

    Attributes:
        scales: the higher scales reconstructed besides 1x: ``[2]`` or ``[2, 4]``.
        hr_decoder_depth: blocks of each higher-scale decoder.
        hr_attention: attention of the higher-scale decoders: ``full`` or ``nystrom``.
        num_landmarks: Nyström landmarks per head (64 in Nyströmformer).
    """

    scales: tuple[int, ...] = (2,)
    hr_decoder_depth: int = 2
    hr_attention: str = "full"
    num_landmarks: int = 64

    def __post_init__(self) -> None:
        """Validate MAE's fields and the higher scales'.

        Raises:
            FieldError: naming the first invalid field.
        """
        super().__post_init__()
        self.scales = tuple(int(s) for s in self.scales)
        if self.scales not in SCALE_CHOICES:
            raise FieldError("scales", f"must be [2] or [2, 4] (the scales besides 1x), got {list(self.scales)}")
        check_range("hr_decoder_depth", self.hr_decoder_depth, ge=1)
        check_choice("hr_attention", self.hr_attention, ATTENTIONS)
        check_range("num_landmarks", self.num_landmarks, ge=1)


@register
class MIRAM(MAE[MIRAMConfig]):
    """MAE with extra decoders reconstructing the image at 2x (and 4x) resolution."""

    name = "miram"
    description = ("MIRAM: MAE + decoders reconstructing the source at 2x/4x resolution, token interpolation "
                   "(Vo et al. 2025)")
    config_cls = MIRAMConfig
    paper = "Vo et al., MIRAM: Masked Image Reconstruction Across Multiple Scales, arXiv 2503.07157"
    view_spec = ViewSpec(needs_highres=True, highres_factors=(2,))

    @classmethod
    def view_spec_for(cls, method_cfg: Mapping[str, Any]) -> ViewSpec:
        """High-resolution copies at every scale of ``method_cfg['scales']``.

        Raises:
            ConfigError: invalid MIRAM settings, naming ``method.<key>``.
        """
        return ViewSpec(needs_highres=True, highres_factors=cls.parse_hparams(method_cfg).scales)

    def __init__(self, hparams: MIRAMConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        super().__init__(hparams, model, views, data)
        m = self.hparams
        self.scales = m.scales
        self.hr_decoders = nn.ModuleDict()
        grid = self.encoder.grid
        for s in self.scales:
            dec = UpscaleDecoder(m.decoder_dim, grid, 2, self.patch_numel, depth=m.hr_decoder_depth,
                                 num_heads=m.decoder_heads, attention=m.hr_attention, num_landmarks=m.num_landmarks)
            self.hr_decoders[f"x{s}"] = dec
            grid = dec.grid

    def make_views(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Scales:
        """The augmented image at every scale: one crop box and flip per sample, applied to the input and to
        its high-resolution copies (``batch['image_highres']`` ...), resampled to ``scale x`` the input size.

        Raises:
            DataError: the batch lacks a high-resolution copy.
        """
        v = self.views(batch["image"], generator=generator)
        out = {1: v.images}
        for s in self.scales:
            key = highres_key(s)
            if key not in batch:
                raise DataError(
                    f"miram needs batch['{key}'], the image read at {s}x the size; the trainer adds it "
                    "(ViewSpec.needs_highres); from Python wrap the dataset in medssl.data.highres.HighResDataset"
                )
            size = [n * s for n in v.images.shape[2:]]
            out[s] = crop_resize(batch[key], v.boxes, size, flips=v.flips, mode="bilinear").clamp(0.0, 1.0)
        return out

    def add_scales(self, tokens: torch.Tensor, views: Scales, preds: Scales, targets: Scales, masks: Scales) -> None:
        """Each higher-scale decoder refines the previous scale's tokens (a cascade); a high-resolution patch is
        masked when the input patch it lies in is."""
        mask = masks[1]
        grid_mask = mask.reshape(mask.shape[0], *self.encoder.grid)
        for s in self.scales:
            dec = self.hr_decoders[f"x{s}"]
            tokens = dec.forward_tokens(tokens)
            preds[s] = dec.predict(tokens)
            targets[s] = patchify(normalize(views[s]), self.patch, self.spatial_dims)
            masks[s] = upsample_mask(grid_mask, s).reshape(mask.shape[0], -1)
