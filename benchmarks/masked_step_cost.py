"""Step cost of the masked-image methods: mae at mask 0.75 vs 0.0, and miram (full / Nyström) vs mae.

    python benchmarks/masked_step_cost.py --image-size 32 --batch-size 16 --decoder-dim 128 --decoder-depth 2 [--json]
    python benchmarks/masked_step_cost.py --backbone vit_base_patch16_224 --image-size 112 --patch-size 16 \\
        --batch-size 8 --rounds 5        # MIRAM's paper geometry (ViT-B/16 at 112 px), MAE's 512 x 8 decoder

Each variant is one full training step (views, masks, forward, loss, backward, AdamW step) on random images,
built exactly as the trainer builds it. Variants are timed interleaved (a, b, c, a, b, c, ...) and medians
compared, because sequential timing on a shared machine drifts. Also timed: the encoder alone (forward +
backward) at each mask ratio, which is what should scale with the number of visible tokens.

    python benchmarks/masked_step_cost.py --attention-sweep 256,1024,4096 --decoder-dim 512 --decoder-heads 16

times one decoder block (forward + backward) with full vs Nyström attention at those token counts instead:
where the linear-cost attention starts to pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from medssl.api import make_config
from medssl.data.highres import highres_key
from medssl.engine.optim import build_optimizer
from medssl.methods import DataInfo, build_method
from medssl.nn.masked_vit import visible_indices
from medssl.transforms.masking import MaskConfig, mask_grid


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _variants(a: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    common = [f"method.decoder_dim={a.decoder_dim}", f"method.decoder_depth={a.decoder_depth}",
              f"method.decoder_heads={a.decoder_heads}"]
    if a.patch_size:
        common.append(f"model.patch_size={a.patch_size}")
    hr = [f"method.hr_decoder_depth={a.hr_depth}", f"method.num_landmarks={a.landmarks}"]
    return {
        "mae@0.75": ("mae", [*common, "method.mask_ratio=0.75"]),
        "mae@0.0": ("mae", [*common, "method.mask_ratio=0.0"]),
        "miram-full": ("miram", [*common, *hr, "method.mask_ratio=0.75", "method.hr_attention=full"]),
        "miram-nystrom": ("miram", [*common, *hr, "method.mask_ratio=0.75", "method.hr_attention=nystrom"]),
    }


def build_step(method_name: str, overrides: list[str], a: argparse.Namespace, device: torch.device
               ) -> tuple[Callable[[], None], Callable[[], None], int]:
    """A full training step and an encoder-only forward + backward, with their fixed random batch."""
    cfg = make_config(method=method_name, data="phantom2d", image_size=a.image_size, backbone=a.backbone,
                      overrides=overrides)
    method = build_method(cfg, DataInfo(1, 2, a.image_size, 1000)).to(device).train()
    params = method.parameter_sets()["main"]
    cfg.optim.name, cfg.optim.weight_decay = "adamw", 0.05
    opt = build_optimizer(params, cfg.optim, 1e-4)
    s = a.image_size
    batch = {"image": torch.rand(a.batch_size, 1, s, s, device=device)}
    for f in getattr(method, "scales", ()):
        batch[highres_key(f)] = torch.rand(a.batch_size, 1, s * f, s * f, device=device)

    def step() -> None:
        loss = method.training_step(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mcfg = MaskConfig("random", method.hparams.mask_ratio, method.patch)
    x = batch["image"]

    def encoder_only() -> None:
        mask = mask_grid(mcfg, a.batch_size, method.encoder.grid).reshape(a.batch_size, -1)
        ids = visible_indices(mask).to(device) if mask.any() else None
        method.encoder(x, ids).float().square().mean().backward()
        opt.zero_grad(set_to_none=True)

    n_tokens = method.encoder.num_patches
    return step, encoder_only, n_tokens


def attention_sweep(a: argparse.Namespace, device: torch.device, lengths: list[int]) -> dict:
    """Median forward + backward time of one block, full vs Nyström attention, per sequence length."""
    from medssl.nn.attention import transformer_block

    blocks = {k: transformer_block(a.decoder_dim, a.decoder_heads, attention=k, num_landmarks=a.landmarks).to(device)
              for k in ("full", "nystrom")}
    out = {}
    for n in lengths:
        x = torch.randn(a.batch_size, n, a.decoder_dim, device=device)
        times: dict[str, list[float]] = {k: [] for k in blocks}
        for r in range(a.warmup + a.rounds):
            for k, blk in blocks.items():
                _sync(device)
                t0 = time.perf_counter()
                blk(x).square().mean().backward()
                _sync(device)
                if r >= a.warmup:
                    times[k].append(time.perf_counter() - t0)
                blk.zero_grad(set_to_none=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[n] = {"full_s": round(med["full"], 4), "nystrom_s": round(med["nystrom"], 4),
                  "nystrom_over_full": round(med["nystrom"] / med["full"], 3)}
    return {"device": str(device), "torch_threads": torch.get_num_threads(), "dim": a.decoder_dim,
            "heads": a.decoder_heads, "landmarks": a.landmarks,
            "batch_size": a.batch_size, "rounds": a.rounds, "block_fwd_bwd": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=0, help="0 = medssl's default for the image size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--hr-depth", type=int, default=2)
    p.add_argument("--landmarks", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default); 1 on a shared, oversubscribed CPU, where "
                   "OpenMP threads waiting on each other dominate small ops")
    p.add_argument("--attention-sweep", default="", help="comma-separated token counts: time one block only")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.attention_sweep:
        sweep = attention_sweep(a, device, [int(v) for v in a.attention_sweep.split(",")])
        print(json.dumps(sweep) if a.json else sweep)
        return 0
    built = {name: build_step(m, o, a, device) for name, (m, o) in _variants(a).items()}
    times: dict[str, list[float]] = {k: [] for k in built}
    enc_times: dict[str, list[float]] = {k: [] for k in ("mae@0.75", "mae@0.0")}
    for r in range(a.warmup + a.rounds):
        for name, (step, enc, _) in built.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if r >= a.warmup:
                times[name].append(time.perf_counter() - t0)
            if name in enc_times:
                _sync(device)
                t0 = time.perf_counter()
                enc()
                _sync(device)
                if r >= a.warmup:
                    enc_times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    enc_med = {k: statistics.median(v) for k, v in enc_times.items()}
    n_tokens = built["mae@0.75"][2]
    res = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "backbone": a.backbone,
        "image_size": a.image_size, "tokens": n_tokens, "batch_size": a.batch_size,
        "decoder": f"{a.decoder_dim}x{a.decoder_depth}", "hr_decoder_depth": a.hr_depth, "landmarks": a.landmarks,
        "rounds": a.rounds,
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "encoder_fwd_bwd_s": {k: round(v, 4) for k, v in enc_med.items()},
        "ratio_mae_mask0_vs_mask075_step": round(med["mae@0.0"] / med["mae@0.75"], 3),
        "ratio_mae_mask0_vs_mask075_encoder": round(enc_med["mae@0.0"] / enc_med["mae@0.75"], 3),
        "visible_token_ratio": round((n_tokens + 1) / (n_tokens - round(0.75 * n_tokens) + 1), 3),
        "ratio_miram_full_vs_mae": round(med["miram-full"] / med["mae@0.75"], 3),
        "ratio_miram_nystrom_vs_mae": round(med["miram-nystrom"] / med["mae@0.75"], 3),
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
