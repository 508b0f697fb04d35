"""Small-batch robustness: CASS vs MoCo v2 pretrained at several batch sizes for the same number of images.

    python benchmarks/cass_batch_size.py --images 4096 --batch-sizes 8,16,64 --data phantom2d --image-size 32 [--json]

CASS's selling point (Singh et al. 2022) is that it needs no large batch: no negatives, no queue, only the
agreement of a CNN and a ViT on the same image. This script pretrains ``cass`` and ``mocov2`` at each batch size
for ``--images`` images (``images // batch`` optimiser steps, so every run sees the same data volume), then
evaluates every encoder with the linear probe on the same labelled dataset (macro AUC, mean ± std over
``--seeds``), next to randomly initialised CNN and ViT baselines.

Settings come from the bundled recipes (``cass_phantom2d_cpu``, ``demo_mocov2_phantom2d``) with the image size,
batch size and step count of the benchmark; the learning rate is the recipe's at every batch size (no scaling
rule), since robustness without re-tuning is the claim being tested. Phantoms are a pipeline check, not a
medical result; numbers are recorded in docs/methods/cass.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPES = {"cass": "cass_phantom2d_cpu", "mocov2": "demo_mocov2_phantom2d"}


def _csv(text: str, cast: type) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def _auc_rows(res: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """encoder label -> (mean, std) of the macro AUC over seeds, at the first label fraction."""
    out = {}
    for s in res["summary"]:
        m = s["metrics"]["auc_macro"]
        out.setdefault(s["encoder"], (float(m["mean"]), float(m["std"])))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from medssl.api import evaluate as _evaluate
    from medssl.api import pretrain

    def evaluate(*a: Any, **kw: Any) -> dict[str, Any]:
        # One BLAS thread for the probe: on a shared, oversubscribed CPU, multi-threaded OpenBLAS inside
        # scikit-learn's L-BFGS spun for ~100x longer (293 s vs 3 s for one 560 x 512 probe at load 15 on 2 cores).
        with threadpool_limits(limits=1, user_api="blas"):
            return _evaluate(*a, **kw)

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cass_batch_size_"))
    work.mkdir(parents=True, exist_ok=True)
    eval_kw = dict(protocol=args.protocol, label_fractions=(args.label_fraction,), seeds=tuple(args.seeds),
                   image_size=args.image_size, progress=False)
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for bs in args.batch_sizes:
            steps = max(1, args.images // bs)
            overrides = [f"model.backbone={args.cnn}", "train.log_every_n_steps=1000000"]
            if method == "cass":
                overrides.append(f"method.vit_backbone={args.vit}")
            run_dir = work / f"{method}_bs{bs}"
            t0 = time.perf_counter()
            pretrain(method, args.data, run_dir, config=RECIPES[method], overrides=overrides, progress=False,
                     image_size=args.image_size, batch_size=bs, max_steps=steps, seed=args.seed)
            seconds = time.perf_counter() - t0
            res = evaluate(args.eval_data or args.data, work / f"eval_{method}_bs{bs}", run=run_dir, **eval_kw)
            for enc, (mean, std) in _auc_rows(res).items():
                rows.append({"method": method, "encoder": enc, "batch_size": bs, "steps": steps,
                             "images": steps * bs, "pretrain_s": round(seconds, 1), "auc": mean, "auc_std": std})
            print(f"{method} batch {bs}: {steps} steps in {seconds:.0f} s", file=sys.stderr, flush=True)
    if not args.no_random:
        for backbone in dict.fromkeys([args.cnn, args.vit] if "cass" in args.methods else [args.cnn]):
            res = evaluate(args.eval_data or args.data, work / f"eval_random_{backbone}", init="random",
                           backbone=backbone, **eval_kw)
            (mean, std), = _auc_rows(res).values()
            rows.append({"method": "random-init", "encoder": backbone, "batch_size": None, "steps": 0, "images": 0,
                         "pretrain_s": 0.0, "auc": mean, "auc_std": std})
    import torch

    return {
        "data": args.data, "eval_data": args.eval_data or args.data, "image_size": args.image_size,
        "images_per_run": args.images, "protocol": args.protocol, "label_fraction": args.label_fraction,
        "seeds": args.seeds, "cnn": args.cnn, "vit": args.vit, "threads": torch.get_num_threads(),
        "runs_dir": str(work), "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    head = (f"{res['images_per_run']} pretraining images per run, {res['data']} at {res['image_size']} px; "
            f"{res['protocol']} probe on {res['eval_data']} with {100 * res['label_fraction']:g} % of the labels, "
            f"seeds {','.join(map(str, res['seeds']))}\n\n")
    lines = ["| method | encoder | batch | steps | pretrain s | AUC (macro) |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        auc = "n/a" if math.isnan(r["auc"]) else f"{r['auc']:.3f} ± {r['auc_std']:.3f}"
        bs = "—" if r["batch_size"] is None else str(r["batch_size"])
        lines.append(f"| {r['method']} | {r['encoder']} | {bs} | {r['steps']} | {r['pretrain_s']:.0f} | {auc} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", type=lambda t: _csv(t, str), default=["cass", "mocov2"])
    p.add_argument("--batch-sizes", type=lambda t: _csv(t, int), default=[8, 16, 64])
    p.add_argument("--images", type=int, default=4096, help="images seen per pretraining run (steps = images // batch)")
    p.add_argument("--data", default="phantom2d")
    p.add_argument("--eval-data", help="labelled data for the probe (default: --data)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--cnn", default="resnet18")
    p.add_argument("--vit", default="vit_tiny_patch16_224")
    p.add_argument("--protocol", default="linear", choices=["linear", "knn"])
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument("--seeds", type=lambda t: _csv(t, int), default=[0])
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baselines")
    p.add_argument("--out", help="keep the runs and evaluations here (default: a temporary directory)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 avoids OpenMP spin-waits on a shared, busy CPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(RECIPES)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))} (choose from {', '.join(RECIPES)})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run(args)
    print(json.dumps(res) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
