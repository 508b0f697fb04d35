"""Training throughput of a medssl method against its floor (the backbone's essential passes alone).

    python benchmarks/throughput.py --method mocov2 --backbone resnet18 --image-size 64 --batch-size 64 --steps 20 [--json]

The floor for mocov2 is: query encoder (backbone + head) forward + backward on both views, plus key encoder
forward on both views, plus an SGD step — the passes any MoCo v2 implementation must make. medssl's full step
adds view generation, the queue, InfoNCE and the EMA update. Steps are timed interleaved (floor, medssl,
floor, …) and the medians compared, because sequential timing on a shared machine drifts by ±15 %.
The side-by-side comparison with lightly (issue 8) is not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from medssl.config import build_config
from medssl.engine.optim import build_optimizer
from medssl.methods import DataInfo, get_method
from medssl.nn.backbones import build_backbone, feature_dim
from medssl.nn.ema import make_ema_copy
from medssl.nn.heads import projection_mlp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mocov2_floor(backbone_name: str, in_chans: int, size: int, batch: int, device: torch.device) -> Callable[[torch.Tensor], None]:
    """The essential passes of a MoCo v2 step, with no augmentation, queue or loss bookkeeping."""
    backbone = build_backbone(backbone_name, in_chans=in_chans, image_size=size).to(device)
    head = projection_mlp(feature_dim(backbone), feature_dim(backbone), 128).to(device)
    query = torch.nn.Sequential(backbone, head)
    key = make_ema_copy(query)
    opt = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9)

    def step(x: torch.Tensor) -> None:
        views = torch.cat([x, x.flip(-1)])
        q = query(views)
        with torch.no_grad():
            key(views)
        q.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def medssl_step(method_name: str, backbone_name: str, in_chans: int, size: int, batch: int,
                device: torch.device) -> Callable[[torch.Tensor], None]:
    """One full medssl training step (views, loss, optimiser, after-step updates)."""
    cfg = build_config({"method": {"name": method_name}, "model": {"backbone": backbone_name}})
    cls = get_method(method_name)
    method = cls(cfg, DataInfo(in_chans=in_chans, spatial_dims=2, image_size=size, num_samples=65536)).to(device)
    opt = build_optimizer(list(method.named_parameters()), cfg.optim, cls.default_lr)
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        out = method({"image": x})
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(state["step"], 10**6)
        state["step"] += 1

    return step


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, args.in_chans, args.image_size, args.image_size, device=device)
    contenders = {
        "floor": mocov2_floor(args.backbone, args.in_chans, args.image_size, args.batch_size, device),
        "medssl": medssl_step(args.method, args.backbone, args.in_chans, args.image_size, args.batch_size, device),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.warmup):
        for fn in contenders.values():
            fn(x)
    for _ in range(args.steps):
        for name, fn in contenders.items():
            _sync(device)
            t = time.perf_counter()
            fn(x)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "method": args.method, "backbone": args.backbone, "image_size": args.image_size,
        "batch_size": args.batch_size, "device": str(device), "threads": torch.get_num_threads(),
        "steps": args.steps, "images_per_s": args.batch_size / med["medssl"],
        "floor_images_per_s": args.batch_size / med["floor"], "overhead_ratio": med["medssl"] / med["floor"],
        "peak_memory_mb": peak_mb,
        "peak_memory_note": "CUDA max allocated" if device.type == "cuda" else "process max RSS (whole run)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mocov2", choices=["mocov2"])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print("| method | backbone | size | batch | img/s | floor img/s | overhead | peak MB |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {res['method']} | {res['backbone']} | {res['image_size']} | {res['batch_size']} | "
              f"{res['images_per_s']:.1f} | {res['floor_images_per_s']:.1f} | {res['overhead_ratio']:.3f} | "
              f"{res['peak_memory_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
