"""Training throughput of a medssl method against its floor and, where lightly has the method, against lightly.

    python benchmarks/throughput.py --method mocov2 --backbone resnet18 --image-size 64 --batch-size 64 \\
        --steps 10 --threads 2 [--json]
    python benchmarks/throughput.py --method mae --backbone vit_small_patch16_224 --image-size 64 --batch-size 64 \\
        --steps 10 --threads 2 --mask0
    python benchmarks/throughput.py --method mocov2 --device cuda --precision bf16 --channels-last --compile

Contenders, each one full optimisation step, timed interleaved (floor, medssl, medssl-model, lightly, floor, …)
with medians compared, because sequential timing on a shared machine drifts by ±15 %:

* ``floor``: the backbone's essential passes alone on pre-made views, no bookkeeping. mocov2 / medmoco: query
  encoder (backbone + head) forward + backward on both views, key encoder forward on both views, optimiser
  step. mae: ViT encoder on the visible tokens (fixed indices) + decoder over all tokens + prediction of the
  masked ones, optimiser step. gravis: the encoder on all K views. cnnmim: the dense CNN + U-Net decoder on
  the masked input. cass: CNN and ViT forward + backward on the same image.
* ``medssl``: medssl's full training step as the trainer runs it: batched view generation, masks, loss,
  optimiser step and ``after_optimizer_step`` (EMA, queue). ``overhead_ratio`` = this ÷ floor.
* ``medssl_model`` (mocov2, mae, dino): medssl's step on the same pre-made views as the floor and lightly, without
  view generation: the model-for-model comparison. ``model_overhead_ratio`` = this ÷ floor.
* ``lightly`` (mocov2, mae, dino; when lightly is installed): lightly's building blocks doing the same work on the
  same pre-made views, same backbone instance type, batch, size and threads. MoCo v2: ``MoCoProjectionHead``,
  ``NTXentLoss`` with a memory bank of the same size and τ, ``update_momentum`` for both key modules,
  symmetric (query on both views, key on both views) like medssl. MAE: ``MaskedVisionTransformerTIMM`` around
  the same timm ViT, ``MaskedVisionTransformerDecoderTIMM`` of the same width / depth / heads, lightly's
  ``random_token_mask``, norm-pix MSE on the masked patches. DINO: the same backbone with lightly's
  ``DINOProjectionHead`` (same widths) and ``DINOLoss`` (same temperatures, centre momentum), teacher by
  ``update_momentum``, on the same pre-made crops. ``ratio_vs_lightly`` = lightly step time ÷
  medssl-model step time (> 1: medssl is faster).

Every contender uses the same optimiser (medssl's ``build_optimizer``: SGD for mocov2, AdamW for mae) and the
same precision / memory format flags. Augmentation is timed separately: medssl's batched ``ViewSampler``
(two views of the whole batch, one tensor op chain) against lightly's per-image PIL transform
(``MoCoV2Transform`` / ``MAETransform``) over the same images.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.api import make_config
from medssl.engine.optim import build_optimizer
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods import DataInfo, build_method, get_method
from medssl.transforms.intensity import MEAN, STD, normalize
from medssl.transforms.masking import upsample_mask

Step = Callable[[], None]
#: methods with a floor (and, for the first two, a lightly counterpart and a model-only medssl step)
METHODS = ("mocov2", "mae", "medmoco", "gravis", "cnnmim", "cass", "dino", "mocov3", "simmim")
DEFAULT_BACKBONE = {"mae": "vit_small_patch16_224", "mocov3": "vit_small_patch16_224",
                    "simmim": "vit_small_patch16_224"}


def has_lightly() -> bool:
    return importlib.util.find_spec("lightly") is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """Device, precision and memory-format settings shared by every contender."""

    def __init__(self, args: argparse.Namespace, optimize: bool = True) -> None:
        self.device = torch.device(args.device)
        self.bf16 = args.precision == "bf16"  # precision is part of the comparison: every contender gets it
        self.channels_last = args.channels_last and optimize
        self.compile = args.compile and optimize

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move to the device; channels_last and ``torch.compile`` (in place, same state dict) when asked."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            for child in module.children():
                if any(True for _ in child.parameters()):
                    child.compile()
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


def _config(method: str, args: argparse.Namespace, overrides: list[str] | None = None) -> Any:
    overrides = list(overrides or [])
    if method == "cnnmim" and not any(o.startswith("method.mask_patch_size=") for o in overrides):
        # cnnmim's mask unit defaults to the encoder's total stride (32 px), which leaves small benchmark images
        # one unit; the step's cost does not depend on the unit size, so use a 4x4 grid at any size here
        overrides.append(f"method.mask_patch_size={max(1, args.image_size // 4)}")
    return make_config(method=method, data="phantom2d", image_size=args.image_size, backbone=args.backbone,
                       overrides=overrides)


def _method(name: str, args: argparse.Namespace, overrides: list[str] | None = None) -> tuple[nn.Module, Any]:
    cfg = _config(name, args, overrides)
    cls = get_method(name)
    if cfg.optim.lr is None:
        cfg.optim.lr = cls.default_lr
    method = build_method(cfg, DataInfo(in_chans=args.in_chans, spatial_dims=2, image_size=args.image_size,
                                        num_samples=65536)).train()
    return method, cfg


def _optimizer(named: list[tuple[str, nn.Parameter]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    return build_optimizer(named, cfg.optim, lr)


def _opt_step(opts: list[torch.optim.Optimizer]) -> None:
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def medssl_full_step(name: str, args: argparse.Namespace, s: Setup, x: torch.Tensor,
                     overrides: list[str] | None = None) -> Step:
    """medssl's whole training step (views inside) as the trainer runs it."""
    method, cfg = _method(name, args, overrides)
    method = s.prepare(method)
    opts = [_optimizer(p, cfg, float(cfg.optim.lr)) for p in method.parameter_sets().values()]
    batch = {"image": s.images(x), "index": torch.arange(x.shape[0], device=x.device)}
    state = {"step": 0}

    def step() -> None:
        with s.autocast():
            out = method(batch)
        out.loss.backward()
        _opt_step(opts)
        method.after_optimizer_step(state["step"], 10**6)
        state["step"] += 1

    return step


# -- MoCo v2 family --------------------------------------------------------------------------------------
def moco_floor(name: str, args: argparse.Namespace, s: Setup, v1: torch.Tensor, v2: torch.Tensor) -> Step:
    """Query encoder fwd + bwd on both views, key encoder fwd on both views, optimiser step."""
    m, cfg = _method(name, args)
    query = s.prepare(nn.Sequential(m.backbone, m.projector))
    key = s.prepare(nn.Sequential(m.key_backbone, m.key_projector))
    opt = _optimizer(list(query.named_parameters()), cfg, float(cfg.optim.lr))
    both, swapped = s.images(torch.cat([v1, v2])), s.images(torch.cat([v2, v1]))

    def step() -> None:
        with s.autocast():
            q = query(both)
            with torch.no_grad():
                key(swapped)
        q.float().square().mean().backward()
        _opt_step([opt])

    return step


def mocov2_model_step(args: argparse.Namespace, s: Setup, v1: torch.Tensor, v2: torch.Tensor) -> Step:
    """medssl's MoCo v2 on pre-made views: ``global_step`` + optimiser + EMA and enqueue."""
    method, cfg = _method("mocov2", args)
    method = s.prepare(method)
    opt = _optimizer(method.parameter_sets()["main"], cfg, float(cfg.optim.lr))
    v1, v2 = s.images(v1), s.images(v2)

    def step() -> None:
        with s.autocast():
            out, _ = method.global_step(v1, v2)
        out.loss.backward()
        _opt_step([opt])
        method.after_optimizer_step(0, 10**6)

    return step


def lightly_mocov2_step(args: argparse.Namespace, s: Setup, v1: torch.Tensor, v2: torch.Tensor) -> Step:
    """lightly's MoCo v2 building blocks, symmetric like medssl, on the same views and backbone type."""
    import copy

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    m, cfg = _method("mocov2", args)  # the same timm backbone medssl builds (fresh weights)
    hp = m.hparams
    d = m.projector[0].in_features

    class MoCo(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = MoCoProjectionHead(d, d, hp.proj_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = s.prepare(MoCo(m.backbone))
    criterion = NTXentLoss(temperature=hp.temperature, memory_bank_size=(m.queue_size, hp.proj_dim)).to(s.device)
    opt = _optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg, float(cfg.optim.lr))
    both, swapped = s.images(torch.cat([v1, v2])), s.images(torch.cat([v2, v1]))

    def step() -> None:
        update_momentum(model.backbone, model.backbone_momentum, m=hp.momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=hp.momentum)
        with s.autocast():
            q = model(both)
            k = model.forward_momentum(swapped)
            loss = criterion(q.float(), k.float())
        loss.backward()
        _opt_step([opt])

    return step


# -- MAE ---------------------------------------------------------------------------------------------------
def _mae_overrides(args: argparse.Namespace, ratio: float | None = None) -> list[str]:
    out = [f"method.decoder_dim={args.decoder_dim}", f"method.decoder_depth={args.decoder_depth}",
           f"method.decoder_heads={args.decoder_heads}"]
    if ratio is not None:
        out.append(f"method.mask_ratio={ratio}")
    return out


def mae_floor(args: argparse.Namespace, s: Setup, v: torch.Tensor) -> Step:
    """Encoder on fixed visible tokens, decoder over all tokens, prediction of the masked ones, optimiser step.

    Written from the timm ViT's parts directly (patch embedding, blocks, norm) and plain index ops.
    """
    m, cfg = _method("mae", args, _mae_overrides(args))
    vit, dec = m.encoder.vit, m.decoder
    parts = s.prepare(nn.ModuleDict({"vit": vit, "dec": dec}))
    opt = _optimizer(list(parts.named_parameters()), cfg, float(cfg.optim.lr))
    n = m.encoder.num_patches
    b = v.shape[0]
    keep = n - int(round(m.hparams.mask_ratio * n))
    perm = torch.rand(b, n, device=v.device).argsort(dim=1)
    ids_keep, ids_mask = perm[:, :keep].sort(dim=1).values, perm[:, keep:]
    v = s.images(v)

    def step() -> None:
        with s.autocast():
            t = vit.patch_embed(v) + vit.pos_embed[:, 1:]
            t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
            cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
            h = vit.norm(vit.blocks(torch.cat([cls, t], dim=1)))
            e = dec.embed(h)
            full = dec.mask_token.to(e.dtype).expand(b, n, e.shape[-1])
            full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, e.shape[-1]), e[:, 1:])
            d = dec.blocks(torch.cat([e[:, :1], full], dim=1) + dec.pos_embed)[:, 1:]
            d = torch.gather(d, 1, ids_mask.unsqueeze(-1).expand(-1, -1, d.shape[-1]))
            pred = dec.pred(dec.norm(d))
        pred.float().square().mean().backward()
        _opt_step([opt])

    return step


def mae_model_step(args: argparse.Namespace, s: Setup, v: torch.Tensor, ratio: float) -> Step:
    """medssl's MAE on a pre-made view: mask draw, encoder, decoder, norm-pix loss, optimiser step."""
    method, cfg = _method("mae", args, _mae_overrides(args, ratio))
    method = s.prepare(method)
    opt = _optimizer(method.parameter_sets()["main"], cfg, float(cfg.optim.lr))
    views = {1: s.images(v * STD + MEAN)}  # forward_scales normalises

    def step() -> None:
        with s.autocast():
            mask, ids = method.draw_mask(v.shape[0], v.device)
            preds, targets, masks, _ = method.forward_scales(views, mask, ids)
            loss = reconstruction_loss(preds[1], targets[1], masks[1], norm_pix=method.hparams.norm_pix_loss)
        loss.backward()
        _opt_step([opt])

    return step


def lightly_mae_step(args: argparse.Namespace, s: Setup, v: torch.Tensor, ratio: float) -> Step:
    """lightly's MAE pieces around the same timm ViT, with a decoder of the same width, depth and heads."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

    m, cfg = _method("mae", args, _mae_overrides(args, ratio))
    vit = m.encoder.vit
    patch = int(vit.patch_embed.patch_size[0])

    class MAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            self.sequence_length = self.backbone.sequence_length
            self.decoder_embed = nn.Linear(vit.embed_dim, args.decoder_dim)
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=args.decoder_dim, depth=args.decoder_depth,
                num_heads=args.decoder_heads)
            self.decoder_pred = nn.Linear(args.decoder_dim, patch**2 * args.in_chans)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            b = images.shape[0]
            if ratio > 0:
                idx_keep, idx_mask = utils.random_token_mask(size=(b, self.sequence_length), mask_ratio=ratio,
                                                             device=images.device)
            else:  # MSE over every patch: "masked" = all patch tokens
                idx_keep = torch.arange(self.sequence_length, device=images.device).expand(b, -1)
                idx_mask = idx_keep[:, 1:]
            x = self.backbone.encode(images=images, idx_keep=idx_keep)
            x = self.decoder_embed(x)
            tokens = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
            tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
            x = self.decoder.decode(self.decoder.add_pos_embed(tokens))
            pred = self.decoder_pred(utils.get_at_index(x, idx_mask))
            target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
            return pred, target

    model = s.prepare(MAE())
    opt = _optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg, float(cfg.optim.lr))
    v = s.images(v)

    def step() -> None:
        with s.autocast():
            pred, target = model(v)
            target = utils.normalize_mean_var(target.float())  # norm-pix, as medssl's MAE
            loss = F.mse_loss(pred.float(), target)
        loss.backward()
        _opt_step([opt])

    return step


# -- other methods' floors ----------------------------------------------------------------------------------
def gravis_floor(args: argparse.Namespace, s: Setup, views: torch.Tensor) -> Step:
    """The encoder (backbone + head) forward + backward on all K views, optimiser step."""
    m, cfg = _method("gravis", args)
    enc = s.prepare(nn.Sequential(m.backbone, m.projector))
    opt = _optimizer(list(enc.named_parameters()), cfg, float(cfg.optim.lr))
    views = s.images(views)

    def step() -> None:
        with s.autocast():
            z = enc(views)
        z.float().square().mean().backward()
        _opt_step([opt])

    return step


def cnnmim_floor(args: argparse.Namespace, s: Setup, v: torch.Tensor) -> Step:
    """The dense CNN (no sparse masking) + U-Net decoder forward + backward on a masked input."""
    m, cfg = _method("cnnmim", args)
    m = s.prepare(m)
    opt = _optimizer(list(m.named_parameters()), cfg, float(cfg.optim.lr))
    mask = m.draw_mask(v.shape[0], v.device)
    x_in = s.images(v * (~upsample_mask(mask, m.patch)).to(v.dtype))

    def step() -> None:
        with s.autocast():
            pred = m.decoder(m.encode(x_in, None), out_shape=v.shape[2:])
        pred.float().square().mean().backward()
        _opt_step([opt])

    return step


def cass_floor(args: argparse.Namespace, s: Setup, v: torch.Tensor) -> Step:
    """CNN and ViT (each with its head) forward + backward on the same image, both optimisers step."""
    m, cfg = _method("cass", args)
    m = s.prepare(m)
    opts = [_optimizer(p, cfg, float(cfg.optim.lr)) for p in m.parameter_sets().values()]
    v = s.images(v)

    def step() -> None:
        with s.autocast():
            a, b = m.embed_cnn(v), m.embed_vit(v)
        (a.float().square().mean() + b.float().square().mean()).backward()
        _opt_step(opts)

    return step


# -- comparators: DINO, MoCo v3, SimMIM ----------------------------------------------------------------------
DINO_SMALL = ["method.out_dim=4096", "method.local_crops=4"]


def dino_crops(args: argparse.Namespace, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, _ = _method("dino", args, DINO_SMALL)
    glob, loc = m.crops(x)
    assert loc is not None
    return glob, loc


def dino_floor(args: argparse.Namespace, s: Setup, glob: torch.Tensor, loc: torch.Tensor) -> Step:
    """Student (backbone + head) fwd + bwd on global and local crops, teacher fwd on the global crops."""
    m, cfg = _method("dino", args, DINO_SMALL)
    student = s.prepare(nn.Sequential(m.backbone, m.head))
    teacher = s.prepare(nn.Sequential(m.teacher_backbone, m.teacher_head))
    opt = _optimizer([(n, p) for n, p in student.named_parameters() if p.requires_grad], cfg, float(cfg.optim.lr))
    glob, loc = s.images(glob), s.images(loc)

    def step() -> None:
        with s.autocast():
            a, b = student(glob), student(loc)
            with torch.no_grad():
                teacher(glob)
        (a.float().square().mean() + b.float().square().mean()).backward()
        _opt_step([opt])

    return step


def dino_model_step(args: argparse.Namespace, s: Setup, glob: torch.Tensor, loc: torch.Tensor) -> Step:
    """medssl's DINO on pre-made crops: student, teacher, loss, optimiser, EMA + centre update."""
    method, cfg = _method("dino", args, DINO_SMALL + ["method.freeze_last_layer=0"])
    method = s.prepare(method)
    opt = _optimizer(method.parameter_sets()["main"], cfg, float(cfg.optim.lr))
    glob, loc = s.images(glob), s.images(loc)

    def step() -> None:
        with s.autocast():
            out = method.crops_step(glob, loc)
        out.loss.backward()
        _opt_step([opt])
        method.after_optimizer_step(0, 10**6)

    return step


def lightly_dino_step(args: argparse.Namespace, s: Setup, glob: torch.Tensor, loc: torch.Tensor) -> Step:
    """lightly's DINO building blocks around the same backbone, same head widths and temperatures."""
    import copy

    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    m, cfg = _method("dino", args, DINO_SMALL)
    hp = m.hparams
    d = m.head.mlp[0].in_features

    class DINO(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student_backbone = m.backbone
            self.student_head = DINOProjectionHead(d, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim)
            self.teacher_backbone = copy.deepcopy(m.backbone)
            self.teacher_head = DINOProjectionHead(d, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim)
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)

    model = s.prepare(DINO())
    crit = DINOLoss(output_dim=hp.out_dim, warmup_teacher_temp=hp.warmup_teacher_temp, teacher_temp=hp.teacher_temp,
                    warmup_teacher_temp_epochs=0, student_temp=hp.student_temp,
                    center_momentum=hp.center_momentum).to(s.device)
    opt = _optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg, float(cfg.optim.lr))
    glob, loc = s.images(glob), s.images(loc)
    n_loc = loc.shape[0] // (glob.shape[0] // 2)

    def step() -> None:
        update_momentum(model.student_backbone, model.teacher_backbone, m=hp.momentum)
        update_momentum(model.student_head, model.teacher_head, m=hp.momentum)
        with s.autocast():
            with torch.no_grad():
                t = model.teacher_head(model.teacher_backbone(glob)).chunk(2)
            st = model.student_head(model.student_backbone(glob)).chunk(2)
            sl = model.student_head(model.student_backbone(loc)).chunk(n_loc)
            loss = crit([x.float() for x in t], [x.float() for x in st + sl], epoch=0)
        loss.backward()
        _opt_step([opt])

    return step


def mocov3_floor(args: argparse.Namespace, s: Setup, v1: torch.Tensor, v2: torch.Tensor) -> Step:
    """Query encoder (backbone + projector + predictor) fwd + bwd on both views, key encoder fwd on both."""
    m, cfg = _method("mocov3", args)
    query = s.prepare(nn.Sequential(m.backbone, m.projector, m.predictor))
    key = s.prepare(nn.Sequential(m.key_backbone, m.key_projector))
    opt = _optimizer([(n, p) for n, p in query.named_parameters() if p.requires_grad], cfg, float(cfg.optim.lr))
    both = s.images(torch.cat([v1, v2]))

    def step() -> None:
        with s.autocast():
            q = query(both)
            with torch.no_grad():
                key(both)
        q.float().square().mean().backward()
        _opt_step([opt])

    return step


def simmim_floor(args: argparse.Namespace, s: Setup, v: torch.Tensor) -> Step:
    """The ViT over every patch token (timm's own forward) + a linear head on the tokens, optimiser step."""
    m, cfg = _method("simmim", args)
    parts = s.prepare(nn.ModuleDict({"vit": m.encoder.vit, "head": m.head}))
    opt = _optimizer(list(parts.named_parameters()), cfg, float(cfg.optim.lr))
    v = s.images(v)

    def step() -> None:
        with s.autocast():
            tokens = parts["vit"].forward_features(v)
            pred = parts["head"](tokens[:, 1:])
        pred.float().abs().mean().backward()
        _opt_step([opt])

    return step


# -- augmentation cost ----------------------------------------------------------------------------------------
def augmentation_ms(method: str, args: argparse.Namespace, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per batch of two views (mocov2) / one view (mae): medssl batched vs lightly per-image PIL."""
    from medssl.transforms.views import ViewSampler

    m, cfg = _method(method, args, _mae_overrides(args) if method == "mae" else None)
    sampler: ViewSampler = m.views
    n_views = 1 if method == "mae" else 2
    timers: dict[str, Callable[[], Any]] = {"medssl_views": lambda: [sampler(x) for _ in range(n_views)]}
    if has_lightly() and method in ("mocov2", "mae"):
        from PIL import Image

        norm = {"mean": [MEAN] * args.in_chans, "std": [STD] * args.in_chans}
        if method == "mocov2":
            from lightly.transforms import MoCoV2Transform

            tf = MoCoV2Transform(input_size=args.image_size, normalize=norm)
        else:
            from lightly.transforms import MAETransform

            tf = MAETransform(input_size=args.image_size, normalize=norm)
        mode = "L" if args.in_chans == 1 else "RGB"
        arr = (x.detach().cpu().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pil = [Image.fromarray(a[..., 0] if mode == "L" else a, mode=mode) for a in arr]
        timers["lightly_transform"] = lambda: [tf(im) for im in pil]
    times: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(rounds + 1):
        for k, fn in timers.items():
            _sync(x.device)
            t0 = time.perf_counter()
            fn()
            _sync(x.device)
            if r:
                times[k].append(time.perf_counter() - t0)
    return {f"{k}_ms_per_batch": 1000 * statistics.median(v) for k, v in times.items()}


# -- driver ----------------------------------------------------------------------------------------------------
def build_contenders(args: argparse.Namespace, s: Setup, base: Setup, x: torch.Tensor) -> dict[str, Step]:
    """The timed steps by name; medssl's get ``s``, the floor and lightly ``base`` (``--opt-scope``)."""
    from medssl.transforms.views import ViewSampler

    name = args.method
    torch.manual_seed(1)
    built = _method(name, args, _mae_overrides(args) if name == "mae" else DINO_SMALL if name == "dino" else None)[0]
    sampler: ViewSampler = built.global_views if name == "dino" else built.views
    v1 = normalize(sampler(x).images)
    v2 = normalize(sampler(x).images)
    lightly = has_lightly() and not args.no_lightly
    c: dict[str, Step] = {}
    if name in ("mocov2", "medmoco"):
        c["floor"] = moco_floor(name, args, base, v1, v2)
        c["medssl"] = medssl_full_step(name, args, s, x)
        if name == "mocov2":
            c["medssl_model"] = mocov2_model_step(args, s, v1, v2)
            if lightly:
                c["lightly"] = lightly_mocov2_step(args, base, v1, v2)
    elif name == "mae":
        ratio = 0.75
        c["floor"] = mae_floor(args, base, v1)
        c["medssl"] = medssl_full_step(name, args, s, x, _mae_overrides(args, ratio))
        c["medssl_model"] = mae_model_step(args, s, v1, ratio)
        if lightly:
            c["lightly"] = lightly_mae_step(args, base, v1, ratio)
        if args.mask0:
            c["medssl_model@0"] = mae_model_step(args, s, v1, 0.0)
            if lightly:
                c["lightly@0"] = lightly_mae_step(args, base, v1, 0.0)
    elif name == "gravis":
        k = get_method("gravis").config_cls().num_views
        views = torch.cat([v1, v2] + [normalize(sampler(x).images) for _ in range(k - 2)])
        c["floor"] = gravis_floor(args, base, views)
        c["medssl"] = medssl_full_step(name, args, s, x)
    elif name == "cnnmim":
        c["floor"] = cnnmim_floor(args, base, v1)
        c["medssl"] = medssl_full_step(name, args, s, x)
    elif name == "cass":
        c["floor"] = cass_floor(args, base, v1)
        c["medssl"] = medssl_full_step(name, args, s, x)
    elif name == "dino":
        glob, loc = dino_crops(args, x)
        c["floor"] = dino_floor(args, base, glob, loc)
        c["medssl"] = medssl_full_step(name, args, s, x, DINO_SMALL)
        c["medssl_model"] = dino_model_step(args, s, glob, loc)
        if lightly:
            c["lightly"] = lightly_dino_step(args, base, glob, loc)
    elif name == "mocov3":
        c["floor"] = mocov3_floor(args, base, v1, v2)
        c["medssl"] = medssl_full_step(name, args, s, x)
    elif name == "simmim":
        c["floor"] = simmim_floor(args, base, v1)
        c["medssl"] = medssl_full_step(name, args, s, x)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(name)
    return c


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.backbone is None:
        args.backbone = DEFAULT_BACKBONE.get(args.method, "resnet18")
    s = Setup(args)
    base = Setup(args, optimize=args.opt_scope == "all")
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, args.in_chans, args.image_size, args.image_size, device=s.device)
    contenders = build_contenders(args, s, base, x)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for r in range(args.warmup + args.steps):
        for name, fn in contenders.items():
            _sync(s.device)
            t = time.perf_counter()
            fn()
            _sync(s.device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if s.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    b = args.batch_size
    res: dict[str, Any] = {
        "method": args.method, "backbone": args.backbone, "image_size": args.image_size, "batch_size": b,
        "device": str(s.device), "precision": args.precision, "channels_last": args.channels_last,
        "compile": args.compile, "opt_scope": args.opt_scope, "threads": torch.get_num_threads(), "steps": args.steps,
        "images_per_s": b / med["medssl"],
        "floor_images_per_s": b / med["floor"],
        "overhead_ratio": med["medssl"] / med["floor"],
        "peak_memory_mb": peak_mb,
        "peak_memory_note": "CUDA max allocated" if s.device.type == "cuda" else "process max RSS (whole run)",
        "step_s": dict(med),  # median seconds per step of every contender
    }
    if "medssl_model" in med:
        res["model_images_per_s"] = b / med["medssl_model"]
        res["model_overhead_ratio"] = med["medssl_model"] / med["floor"]
    if "lightly" in med:
        res["lightly_images_per_s"] = b / med["lightly"]
        res["ratio_vs_lightly"] = med["lightly"] / med["medssl_model"]
        res["lightly_overhead_ratio"] = med["lightly"] / med["floor"]
    if "medssl_model@0" in med:
        res["mask_cost_ratio"] = med["medssl_model"] / med["medssl_model@0"]
    if "lightly@0" in med:
        res["lightly_mask_cost_ratio"] = med["lightly"] / med["lightly@0"]
    if args.method in ("mocov2", "mae") and not args.no_augmentation:
        res.update(augmentation_ms(args.method, args, x, max(3, args.steps // 2)))
    return res


def markdown(res: dict[str, Any]) -> str:
    cols = [("method", "method", "{}"), ("backbone", "backbone", "{}"), ("size", "image_size", "{}"),
            ("batch", "batch_size", "{}"), ("threads", "threads", "{}"), ("img/s", "images_per_s", "{:.1f}"),
            ("floor img/s", "floor_images_per_s", "{:.1f}"), ("overhead", "overhead_ratio", "{:.3f}"),
            ("model overhead", "model_overhead_ratio", "{:.3f}"), ("lightly img/s", "lightly_images_per_s", "{:.1f}"),
            ("medssl ÷ lightly", "ratio_vs_lightly", "{:.3f}"), ("mask cost", "mask_cost_ratio", "{:.3f}"),
            ("lightly mask cost", "lightly_mask_cost_ratio", "{:.3f}"), ("peak MB", "peak_memory_mb", "{:.0f}")]
    cols = [c for c in cols if c[1] in res]
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    rule = "|" + "---|" * len(cols)
    row = "| " + " | ".join(f.format(res[k]) for _, k, f in cols) + " |"
    lines = [head, rule, row]
    aug = {k: v for k, v in res.items() if k.endswith("_ms_per_batch")}
    if aug:
        lines.append("")
        lines.append("augmentation, ms per batch: " + ", ".join(f"{k[:-13]} {v:.1f}" for k, v in aug.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mocov2", choices=METHODS)
    p.add_argument("--backbone", default=None, help="default: resnet18 (vit_small_patch16_224 for mae)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each runs every contender once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"], help="bf16 autocast for every contender")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile (in place) the modules")
    p.add_argument("--opt-scope", default="all", choices=["all", "medssl"],
                   help="who gets --channels-last / --compile: every contender, or only medssl's steps (then the "
                   "floor and lightly stay eager and contiguous: what medssl's option buys over a plain loop)")
    p.add_argument("--decoder-dim", type=int, default=512, help="mae decoder width (both implementations)")
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--mask0", action="store_true", help="mae: also time mask ratio 0.0 (mask cost ratio)")
    p.add_argument("--flush-denormal", action="store_true",
                   help="CPU: flush subnormal floats to zero (rules out denormal slow-downs of one initialisation)")
    p.add_argument("--no-lightly", action="store_true", help="skip lightly even when it is installed")
    p.add_argument("--no-augmentation", action="store_true", help="skip the augmentation timing")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args)
    res["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"
    res["lightly_installed"] = has_lightly()
    print(json.dumps(res) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
