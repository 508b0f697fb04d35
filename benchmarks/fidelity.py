"""Before / after numbers of the method-fidelity fixes (issue 15), at one small, equal budget per pair.

    nice -n 10 python benchmarks/fidelity.py                      # every pair, phantom2d, writes benchmarks/out/
    python benchmarks/fidelity.py --pairs queue splitbn --steps 20 --seeds 0

Each pair pretrains the same recipe twice through :func:`medssl.pretrain`, once with the behaviour before the fix
(a config switch that restores it) and once with today's default, for the same steps, batch, image size and
pretraining seed; then every exported encoder goes through :func:`medssl.evaluate`'s linear probe at the label
fractions and seeds given (mean ± std of the macro AUC). Pairs:

* ``whitening`` (item 1): medmoco, grouped whitening of pooled features (``whitening_stats=pooled``, groups of
  16 as the old CPU recipe) vs one group over the last feature map's positions.
* ``maskunit`` (item 2): cnnmim, 8 px mask units on a stride-32 ResNet (the old recipe) vs units of the total
  stride (the CIFAR stem, stride 8: today's recipe). Same steps and images; the CIFAR stem costs more compute.
* ``splitbn`` (item 4): mocov2, plain BatchNorm in one process (``bn_splits=0``) vs split BatchNorm.
* ``queue`` (item 5): mocov2, the queue offering a query its own image's older key (``mask_own_keys=false``)
  vs masked.

``--decorrelation`` also measures, on a random-init ResNet-18's pooled phantom2d features, the mean |corr|
between channels of different 64-channel groups and the effective rank, before whitening, after grouped ZCA and
after one-group ZCA (the issue's figures). Results: ``benchmarks/out/fidelity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
#: pair -> (method, recipe, [(label, overrides)] before then after)
PAIRS: dict[str, tuple[str, str, list[tuple[str, list[str]]]]] = {
    "whitening": ("medmoco", "medmoco_phantom2d_cpu", [
        ("before: pooled, groups of 16", ["method.whitening_stats=pooled", "method.whitening_group_size=16"]),
        ("after: feature map, one group", []),
    ]),
    "maskunit": ("cnnmim", "cnnmim_phantom2d_cpu", [
        ("before: 8 px units, stride-32 ResNet", ["model.stem=default", "method.mask_patch_size=8"]),
        ("after: units = total stride (CIFAR stem, 8 px)", []),
    ]),
    "splitbn": ("mocov2", "demo_mocov2_phantom2d", [
        ("before: plain BatchNorm", ["method.bn_splits=0", "model.stem=cifar"]),
        ("after: split BatchNorm", ["model.stem=cifar"]),
    ]),
    "queue": ("mocov2", "demo_mocov2_phantom2d", [
        ("before: own image's key among the negatives", ["method.mask_own_keys=false", "model.stem=cifar"]),
        ("after: own image masked", ["model.stem=cifar"]),
    ]),
}


def _summary_cells(summary: list[dict[str, Any]], fractions: list[float]) -> dict[str, str]:
    """``{fraction: "mean ± std"}`` of the macro AUC over seeds (the first encoder of the run)."""
    out = {}
    for f in fractions:
        rows = [r for r in summary if math.isclose(float(r["label_fraction"]), f)]
        st = rows[0]["metrics"].get("auc_macro") if rows else None
        if st is None or st["mean"] is None or (isinstance(st["mean"], float) and math.isnan(st["mean"])):
            out[f"{f:g}"] = "n/a"
        else:
            out[f"{f:g}"] = f"{st['mean']:.3f} ± {st['std']:.3f}" if st.get("n", 1) > 1 else f"{st['mean']:.3f}"
    return out


def run_pair(name: str, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from medssl.api import evaluate, pretrain

    method, recipe, variants = PAIRS[name]
    rows = []
    for i, (label, overrides) in enumerate(variants):
        run_dir = root / f"{name}-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        pretrain(method, args.data, run_dir, config=recipe, max_steps=args.steps, batch_size=args.batch_size,
                 image_size=args.image_size if method != "cnnmim" else args.cnnmim_image_size, seed=args.seed,
                 progress=False, overrides=["train.log_every_n_steps=10", "train.collapse_every_n_steps=0",
                                            "train.visualize_every_n_steps=0", *overrides])
        pre_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(args.data, root / f"{name}-{i}-eval", protocol="linear", label_fractions=args.fractions,
                       seeds=args.seeds, batch_size=128, progress=False, run=run_dir)
        rows.append({"pair": name, "method": method, "variant": label, "overrides": overrides,
                     "pretrain_s": round(pre_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
                     "summary": res["summary"], "auc": _summary_cells(res["summary"], args.fractions)})
        print(json.dumps(rows[-1]["auc"]), label, file=sys.stderr, flush=True)
    return rows


def _eff_rank(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _cross_group_corr(x: torch.Tensor, group: int = 64) -> float:
    c = torch.corrcoef(x.T).nan_to_num(0.0).abs()
    g = torch.arange(x.shape[1]) // group
    return float(c[g[:, None] != g[None, :]].mean())


def decorrelation(args: argparse.Namespace) -> dict[str, Any]:
    """Pooled features of a random-init ResNet-18 on phantom2d images, whitened three ways (training mode, the
    statistics of the very batch): the issue's cross-group |corr| and effective rank."""
    from medssl.data.specs import open_dataset
    from medssl.methods.medmoco import feature_map_and_pooled
    from medssl.nn.backbones import build_backbone
    from medssl.nn.whitening import Whitening, feature_positions
    from medssl.transforms.intensity import normalize

    torch.manual_seed(0)
    ds = open_dataset(args.data, image_size=args.image_size)
    n = min(len(ds), args.decorrelation_images)
    images = torch.stack([ds[i]["image"] for i in range(n)])
    net = build_backbone("resnet18", in_chans=images.shape[1], image_size=args.image_size, stem="cifar").eval()
    with torch.no_grad():
        fmap, pooled = feature_map_and_pooled(net, normalize(images))
        pooled, fmap = pooled.double(), fmap.double()
        out = {"images": n, "feature_map": list(fmap.shape[1:]),
               "raw": {"cross_group_abs_corr": _cross_group_corr(pooled), "eff_rank": _eff_rank(pooled)}}
        for key, w, stats in (("zca groups of 64, pooled stats", Whitening(512, group_size=64), None),
                              ("zca one group, pooled stats", Whitening(512, group_size=0), None),
                              ("zca one group, feature-map stats", Whitening(512, group_size=0),
                               feature_positions(fmap))):
            y = w.train()(pooled, stats=stats)
            out[key] = {"cross_group_abs_corr": _cross_group_corr(y), "eff_rank": _eff_rank(y)}
    return out


def markdown(res: dict[str, Any]) -> str:
    fr = [f"{f:g}" for f in res["fractions"]]
    lines = ["| pair | method | variant | pretrain s | " + " | ".join(f"AUC @ {f}" for f in fr) + " |",
             "|" + "---|" * (4 + len(fr))]
    for r in res["rows"]:
        lines.append(f"| {r['pair']} | {r['method']} | {r['variant']} | {r['pretrain_s']:.0f} | "
                     + " | ".join(r["auc"][f] for f in fr) + " |")
    if res.get("decorrelation"):
        d = res["decorrelation"]
        lines += ["", f"Decorrelation ({d['images']} phantom images, random-init ResNet-18, pooled features):", "",
                  "| features | mean |corr| across 64-channel groups | effective rank (of 512) |", "|---|---|---|"]
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['cross_group_abs_corr']:.3f} | {v['eff_rank']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS), help="none: only --decorrelation")
    p.add_argument("--data", default="phantom2d:512")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--cnnmim-image-size", type=int, default=64)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--decorrelation", action="store_true")
    p.add_argument("--decorrelation-images", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "out" / "fidelity"))
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"data": args.data, "steps": args.steps, "batch_size": args.batch_size,
                           "image_size": args.image_size, "fractions": args.fractions, "seeds": args.seeds,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    if args.decorrelation:
        res["decorrelation"] = decorrelation(args)
        (root.parent / "fidelity.json").write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res["decorrelation"]), file=sys.stderr, flush=True)
    for name in args.pairs:
        res["rows"] += run_pair(name, args, root)
        (root.parent / "fidelity.json").write_text(json.dumps(res, indent=1, default=str))
    (root.parent / "fidelity.json").write_text(json.dumps(res, indent=1, default=str))
    (root.parent / "fidelity.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
