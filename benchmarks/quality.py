"""What each method's pretraining buys: the same budget for every method, then a linear probe at 1 / 10 / 100 %.

    python benchmarks/quality.py                               # phantom2d, every 2D method, small CPU budget
    python benchmarks/quality.py --3d                          # phantom3d, the methods that run in 3D
    python benchmarks/quality.py --data npz:pneumoniamnist.npz --images-seen 200000 --image-size 64
    python benchmarks/quality.py --methods mocov2 mae --images-seen 512 --seeds 0 --json

Every method is pretrained through :func:`medssl.pretrain` (the trainer users run) for the same number of
images seen (``--images-seen`` ÷ ``--batch-size`` optimiser steps; multi-view methods see more views per image,
which is part of their cost), with its wall time recorded; then every encoder it exports is evaluated through
:func:`medssl.evaluate` with the linear protocol at the label fractions (stratified, patient-level) and seeds
given, on the dataset's own test split. By default each method starts from its bundled small-CPU phantom recipe
where there is one (``--recipes cpu``: model size, views, optimiser; MAE's 512 x 8 decoder would otherwise eat
the budget on a CPU); data, image size, batch and budget always come from the flags. A randomly initialised encoder
of each backbone family is the baseline
row. The output is one Markdown table (mean ± std over seeds of the macro AUC, and the balanced accuracy at
100 %), or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medssl.errors import MedsslError

METHODS_2D = ("mocov2", "medmoco", "gravis", "mae", "miram", "cnnmim", "cass", "dino", "mocov3", "simmim")
METHODS_3D = ("mocov2", "medmoco", "mae", "cnnmim", "dino")
#: the random-init baselines: one CNN, one ViT (the families the methods above train)
BASELINES_2D = {"resnet18": "resnet18", "vit_tiny": "vit_tiny_patch16_224"}
BASELINES_3D = {"resnet18_3d": "resnet18", "vit_tiny_3d": "vit_tiny_3d"}


def recipe_for(method: str, three_d: bool) -> str | None:
    """The bundled small-CPU recipe of a method (``<method>_phantom2d_cpu``, mocov2's demo recipe), if any."""
    from medssl.api import RECIPES_DIR

    names = [f"{method}_phantom{3 if three_d else 2}d_cpu"] + ([] if three_d else [f"demo_{method}_phantom2d"])
    return next((n for n in names if (RECIPES_DIR / f"{n}.yaml").is_file()), None)


def _cell(summary: list[dict[str, Any]], encoder: str, fraction: float, metric: str) -> str:
    for s in summary:
        if s.get("encoder") == encoder and math.isclose(float(s["label_fraction"]), fraction):
            st = s["metrics"].get(metric)
            if st is None or st["mean"] is None or (isinstance(st["mean"], float) and math.isnan(st["mean"])):
                return "n/a"
            return f"{st['mean']:.3f} ± {st['std']:.3f}" if st.get("n", 1) > 1 else f"{st['mean']:.3f}"
    return "n/a"


def evaluate_encoders(data: str, out: Path, args: argparse.Namespace, **source: Any) -> dict[str, Any]:
    from medssl.api import evaluate

    return evaluate(data, out, protocol="linear", label_fractions=args.fractions, seeds=args.seeds,
                    image_size=args.image_size, batch_size=128, device=args.device, progress=False, **source)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medssl.api import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    three_d = args.three_d
    data = args.data or ("phantom3d:192" if three_d else "phantom2d:512")
    methods = args.methods or list(METHODS_3D if three_d else METHODS_2D)
    steps = max(1, args.images_seen // args.batch_size)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="medssl-quality-"))
    rows: list[dict[str, Any]] = []
    try:
        for method in methods:
            run_dir = root / method
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = recipe_for(method, three_d) if args.recipes == "cpu" else None
            row: dict[str, Any] = {"method": method, "steps": steps, "images_seen": steps * args.batch_size,
                                   "recipe": recipe or "method defaults"}
            t0 = time.perf_counter()
            try:
                pretrain(method, data, run_dir, config=recipe, max_steps=steps, batch_size=args.batch_size,
                         image_size=args.image_size, seed=args.seed, progress=False,
                         overrides=["train.log_every_n_steps=10",
                                    "train.collapse_every_n_steps=0", "train.visualize_every_n_steps=0",
                                    *args.set])
            except MedsslError as err:  # a method that cannot run on this data (e.g. cass in 3D)
                row.update(error=str(err).splitlines()[0])
                rows.append(row)
                continue
            row["pretrain_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            res = evaluate_encoders(data, root / f"{method}-eval", args, run=run_dir)
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            row["summary"] = res["summary"]
            rows.append(row)
        baselines = BASELINES_3D if three_d else BASELINES_2D
        for label, backbone in baselines.items():
            if args.no_baseline:
                break
            res = evaluate_encoders(data, root / f"random-{label}", args, init="random", backbone=backbone)
            rows.append({"method": f"random init ({label})", "steps": 0, "images_seen": 0, "pretrain_s": 0.0,
                         "summary": res["summary"]})
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "data": data, "images_seen": steps * args.batch_size, "batch_size": args.batch_size,
        "image_size": args.image_size, "fractions": args.fractions, "seeds": args.seeds,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__, "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    fr = res["fractions"]
    head = (["method", "recipe", "encoder", "images seen", "pretrain s"] + [f"AUC @ {f:g}" for f in fr]
            + [f"bal. acc. @ {max(fr):g}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in res["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | — | — | — | — | " + " | ".join(["skipped"] * (len(fr) + 1))
                         + f" |  <!-- {row['error']} -->")
            continue
        for enc in dict.fromkeys(s.get("encoder") for s in row["summary"]):
            cells = [_cell(row["summary"], enc, f, "auc_macro") for f in fr]
            cells.append(_cell(row["summary"], enc, max(fr), "balanced_accuracy"))
            lines.append(f"| {row['method']} | {row.get('recipe', '—')} | {enc} | {row['images_seen']} "
                         f"| {row['pretrain_s']:.0f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="data spec (default phantom2d:512, or phantom3d:192 with --3d); "
                   "any labelled spec works: npz:FILE, csv:FILE, ...")
    p.add_argument("--3d", dest="three_d", action="store_true", help="3D methods on phantom3d")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method that runs in 2D (3D)")
    p.add_argument("--images-seen", type=int, default=2048, help="pretraining budget per method, in images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--recipes", default="cpu", choices=["cpu", "none"],
                   help="cpu: start from each method's bundled small-CPU phantom recipe where there is one (its "
                   "model / view / optimiser settings; data, size, batch and budget come from these flags); "
                   "none: the method's defaults")
    p.add_argument("--set", nargs="*", default=[], help="extra section.key=value overrides for every method")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init rows")
    p.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args)
    print(json.dumps(res) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
