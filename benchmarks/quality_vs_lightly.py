"""medssl's MoCo v2 next to a plain lightly MoCo v2 loop: one recipe, one budget, one scorer, several seeds.

    python benchmarks/prepare_real_data.py                      # digits.npz, dermoscopy.npz (+ pairs)
    python benchmarks/quality_vs_lightly.py --data npz:benchmarks/out/data/digits.npz --steps 300 --seeds 0 1 2
    python benchmarks/quality_vs_lightly.py --data npz:benchmarks/out/data/dermoscopy.npz \\
        --pairs benchmarks/out/data/dermoscopy_pairs.npz --steps 300
    python benchmarks/quality_vs_lightly.py ... --arms medssl medssl-defaults   # recipe gap: the defaults

Arms (run alternately, seed by seed, so load on a shared machine hits both alike):

* ``lightly`` — a plain ~40-line MoCo v2 loop from lightly's building blocks (``MoCoProjectionHead``,
  ``NTXentLoss`` with a memory bank, ``update_momentum``) and torchvision transforms, on the same timm backbone
  (``timm.create_model(name, num_classes=0, in_chans=C)``, medssl's CIFAR stem when ``--stem cifar``);
* ``medssl`` — ``medssl.pretrain("mocov2", ...)`` with the same recipe mapped onto its config keys (the
  overrides are printed);
* ``medssl-splitbn`` — ``medssl`` with BatchNorm split per view (diagnosis: see :class:`SplitBN`);
* ``medssl-defaults`` — ``medssl.pretrain("mocov2", ...)`` with only data, image size, batch, steps and seed set:
  what a user's first run gets;
* ``medssl-olddefaults`` — the same with the defaults before issue 20 set explicitly (lr 0.03 at every batch,
  blur sigma (0.1, 2) px at every size, timm's zero-initialised last BN of each block);
* ``medssl-recipe:NAME`` — a bundled recipe (e.g. ``mocov2_small_cpu``) with data, image size, steps and seed
  set (its own batch size unless ``--batch-size`` is given explicitly);
* ``random`` and ``pixels`` — a randomly initialised backbone and the raw pixels (as the models see them,
  ``(x − 0.5) / 0.5``), no pretraining.

One scorer for every arm, written out here (independent of medssl's evaluation code): the frozen encoder's
features of every image (eval mode); on a labelled spec, weighted kNN (cosine, k = 20, τ = 0.1: votes
``exp(sim / τ)``) and a linear probe (scikit-learn ``LogisticRegression`` on standardised features) trained on
1 / 10 / 100 % of the train split (stratified, at least one image per class, label seeds 0-2), scored by
accuracy on the test split; with ``--pairs`` (dermoscopy) the ROC AUC of the cosine similarity of each pair.

``--queue Q`` is the number of stored keys in both arms, which is not the same freshness: lightly's memory bank
takes both views' keys every step (its ``NTXentLoss`` is called twice), 2B per step, medssl's queue B (one key per
image, MoCo's definition). For equal turnover run the ``medssl`` arm alone with ``--queue Q/2`` (docs/benchmarks.md:
so run, medssl matches the lightly loop on digits in every column).

Results: one JSON line per (arm, seed) appended to ``--out`` (default benchmarks/out/quality_vs_lightly.jsonl),
then a Markdown table of mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.01, 0.1, 1.0)

Featurizer = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------- data
def load_images(spec: str, image_size: int) -> dict[str, Any]:
    """Every image of ``spec`` at ``image_size`` as one ``[0, 1]`` tensor, with labels and splits."""
    from medssl.data.specs import open_dataset

    ds = open_dataset(spec, image_size=image_size)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))]).float()
    splits = np.asarray(ds.splits).astype(str)
    labels = None if ds.labels is None or ds.multilabel else np.asarray(ds.labels)
    return {"x": x, "splits": splits, "labels": labels, "channels": int(x.shape[1])}


# ------------------------------------------------------------------------------------------------- scorer
def features(fn: Featurizer, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]).float() for i in range(0, len(x), batch)]).numpy()


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified subset of ``fraction`` of the indices of ``y``, at least one per class."""
    if fraction >= 1.0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx))))
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))


def knn_accuracy(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, k: int = 20,
                 tau: float = 0.1) -> float:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight ``exp(sim / τ)``."""
    a = ftr / np.linalg.norm(ftr, axis=1, keepdims=True).clip(1e-12)
    b = fte / np.linalg.norm(fte, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T
    k = min(k, len(ytr))
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, nn, axis=1) / tau)
    classes = np.unique(ytr)
    votes = np.stack([(w * (ytr[nn] == c)).sum(1) for c in classes], axis=1)
    return float((classes[votes.argmax(1)] == yte).mean())


def linear_accuracy(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(ytr)) < 2:
        return float("nan")
    sc = StandardScaler().fit(ftr)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(ftr), ytr)
    return float((clf.predict(sc.transform(fte)) == yte).mean())


def pair_auc(fn: Featurizer, pairs: dict[str, np.ndarray]) -> float:
    from sklearn.metrics import roc_auc_score

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0

    fa, fb = features(fn, as_x(pairs["a"])), features(fn, as_x(pairs["b"]))
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)).clip(1e-12)
    return float(roc_auc_score(pairs["similar"], cos))


def score(fn: Featurizer, data: dict[str, Any], pairs: dict[str, np.ndarray] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if data["labels"] is not None:
        f = features(fn, data["x"])
        tr, te = data["splits"] == "train", data["splits"] == "test"
        ftr, ytr, fte, yte = f[tr], data["labels"][tr], f[te], data["labels"][te]
        for frac in FRACTIONS:
            knn, lin = [], []
            for s in range(1 if frac >= 1.0 else 3):
                sub = label_subset(ytr, frac, s)
                knn.append(knn_accuracy(ftr[sub], ytr[sub], fte, yte))
                lin.append(linear_accuracy(ftr[sub], ytr[sub], fte, yte))
            out[f"knn@{frac:g}"] = float(np.mean(knn))
            out[f"linear@{frac:g}"] = float(np.mean(lin))
    if pairs is not None:
        out["pair_auc"] = pair_auc(fn, pairs)
    return out


# ------------------------------------------------------------------------------------------------- the recipe
def medssl_overrides(a: argparse.Namespace) -> list[str]:
    """The recipe as medssl config overrides (one set of hyper-parameters for both arms)."""
    sigma = f"[{a.blur_sigma[0]},{a.blur_sigma[1]}]"
    return [
        f"model.backbone={a.backbone}", f"model.stem={a.stem}", f"model.zero_init_last={str(a.zero_init_last).lower()}",
        f"data.image_size={a.image_size}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
        "optim.name=sgd", f"optim.lr={a.lr}", f"optim.weight_decay={a.wd}", "optim.momentum=0.9",
        f"optim.warmup_steps={a.warmup_steps}", f"optim.min_lr_ratio={1.0 if a.schedule == 'constant' else 0.0}",
        f"views.crop_scale=[{a.crop_min},1.0]", "views.flip_p=0.5", "views.flip_axes=[-1]",
        f"views.intensity_p={a.jitter_p}", f"views.brightness={a.brightness}", f"views.contrast={a.contrast}",
        "views.gamma=[1.0,1.0]", f"views.blur_p={a.blur_p}", f"views.blur_sigma={sigma}", "views.noise_std=0.0",
        f"method.temperature={a.tau}", f"method.queue_size={a.queue}", f"method.momentum={a.ema}",
        "method.symmetric=true", "method.proj_dim=128", "method.proj_hidden=0",
    ]


def run_medssl(a: argparse.Namespace, seed: int, out: Path, *, overrides: list[str] | None = None,
               config: str | None = None) -> tuple[Featurizer, dict[str, Any]]:
    from medssl.api import pretrain
    from medssl.encoders import load_encoder

    common = [f"train.seed={seed}", "train.log_every_n_steps=25", "train.collapse_every_n_steps=25",
              "train.visualize_every_n_steps=0", "checkpoint.on_sigterm=false"]
    run = pretrain("mocov2" if config is None else None, a.data, out, config=config, progress=False,
                   overrides=[*(overrides or []), *common, *a.set])
    enc = load_encoder(run / "encoder.safetensors").eval()
    return enc, {"metrics": _last_metrics(run)}


class SplitBN:
    """Diagnosis only: run MoCo v2's query and key encoders on each view's half of the concatenated ``2B`` batch
    separately, so BatchNorm normalises each view over its own ``B`` images (as the lightly loop does) instead of
    over both views of every image together. The ``medssl-splitbn`` arm trains under this patch."""

    def __enter__(self) -> None:
        from medssl.methods.mocov2 import MoCoV2

        self.cls, self.q, self.k = MoCoV2, MoCoV2.embed_query, MoCoV2.embed_key
        q, k = self.q, self.k

        def embed_query(m: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
            if not m.training or not m.hparams.symmetric:
                return q(m, x)
            da, db = (q(m, h) for h in x.chunk(2))
            return {n: torch.cat([da[n], db[n]]) for n in da}

        def embed_key(m: Any, x: torch.Tensor) -> torch.Tensor:
            if not m.hparams.symmetric:
                return k(m, x)
            return torch.cat([k(m, h) for h in x.chunk(2)])

        MoCoV2.embed_query, MoCoV2.embed_key = embed_query, embed_key

    def __exit__(self, *exc: Any) -> None:
        self.cls.embed_query, self.cls.embed_key = self.q, self.k


def _last_metrics(run: Path) -> dict[str, Any]:
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    keep = ("loss", "pos_sim", "embedding_std", "projector_eff_rank", "projector_std", "collapse_alarm")
    last = next((r for r in reversed(rows) if r.get("projector_eff_rank")), rows[-1] if rows else {})
    fired = any(r.get("collapse_alarm") == "1" for r in rows)
    return {**{k: last.get(k) for k in keep if last.get(k) not in (None, "")}, "alarm_fired": fired}


def build_backbone(a: argparse.Namespace, channels: int) -> torch.nn.Module:
    import timm

    from medssl.nn.backbones import apply_cifar_stem

    net = timm.create_model(a.backbone, num_classes=0, in_chans=channels, zero_init_last=a.zero_init_last)
    if a.stem == "cifar":
        apply_cifar_stem(net)
    return net


def run_lightly(a: argparse.Namespace, seed: int, data: dict[str, Any]) -> tuple[Featurizer, dict[str, Any]]:
    """The plain loop: lightly's head, loss (memory bank) and momentum update; torchvision augmentations."""
    import copy

    import torchvision.transforms.v2 as T
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    torch.manual_seed(seed)
    np.random.seed(seed)
    x = data["x"][data["splits"] == "train"]
    backbone = build_backbone(a, data["channels"])
    head = MoCoProjectionHead(backbone.num_features, backbone.num_features, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    aug = [T.RandomResizedCrop(a.image_size, scale=(a.crop_min, 1.0), antialias=True), T.RandomHorizontalFlip()]
    aug.append(T.RandomApply([T.ColorJitter(brightness=a.brightness, contrast=a.contrast)], p=a.jitter_p))
    if a.blur_p > 0:
        k = 2 * math.ceil(3 * a.blur_sigma[1]) + 1
        aug.append(T.RandomApply([T.GaussianBlur(k, sigma=tuple(a.blur_sigma))], p=a.blur_p))
    transform = T.Compose(aug)
    # medssl caps the queue at the number of training images (more would hold stale copies of the current images
    # as negatives); the same cap here keeps the recipe the same
    crit = NTXentLoss(temperature=a.tau, memory_bank_size=(min(a.queue, len(x)), 128))
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=a.wd)

    def lr_at(step: int) -> float:
        if a.warmup_steps and step < a.warmup_steps:
            return a.lr * (step + 1) / a.warmup_steps
        if a.schedule == "constant":
            return a.lr
        p = (step - a.warmup_steps) / max(a.steps - a.warmup_steps, 1)
        return a.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    def view(b: torch.Tensor) -> torch.Tensor:
        return (torch.stack([transform(im) for im in b]).clamp(0, 1) - 0.5) / 0.5

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    pos, step = 0, 0
    backbone.train(), head.train(), backbone_m.train(), head_m.train()
    while step < a.steps:
        if pos + a.batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        b = x[order[pos:pos + a.batch_size]]
        pos += a.batch_size
        x0, x1 = view(b), view(b)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        update_momentum(backbone, backbone_m, a.ema)
        update_momentum(head, head_m, a.ema)
        q0, q1 = head(backbone(x0)), head(backbone(x1))
        with torch.no_grad():
            k0, k1 = head_m(backbone_m(x0)), head_m(backbone_m(x1))
        loss = 0.5 * (crit(q0, k1) + crit(q1, k0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == a.steps:
            print(f"lightly step {step}/{a.steps} loss {loss.item():.3f}", flush=True)
    from medssl.eval.collapse import collapse_stats

    st = collapse_stats(torch.cat([q0, q1]).detach())  # the last step's projector outputs, as medssl logs them
    backbone.eval()
    return (lambda im: backbone((im - 0.5) / 0.5)), {"metrics": {
        "loss": float(loss), "projector_eff_rank": st.effective_rank, "projector_std": st.std}}


# ------------------------------------------------------------------------------------------------- main
def run_arm(arm: str, a: argparse.Namespace, seed: int, data: dict[str, Any], root: Path) -> tuple[Featurizer, dict]:
    if arm == "lightly":
        return run_lightly(a, seed, data)
    if arm == "medssl":
        return run_medssl(a, seed, root / f"medssl-{seed}", overrides=medssl_overrides(a))
    if arm == "medssl-splitbn":
        with SplitBN():
            return run_medssl(a, seed, root / f"splitbn-{seed}", overrides=medssl_overrides(a))
    if arm == "medssl-defaults":
        return run_medssl(a, seed, root / f"defaults-{seed}", overrides=[
            f"data.image_size={a.image_size}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}"])
    if arm == "medssl-olddefaults":  # the defaults before issue 20
        return run_medssl(a, seed, root / f"olddefaults-{seed}", overrides=[
            f"data.image_size={a.image_size}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
            "optim.lr=0.03", "views.blur_sigma=[0.1,2.0]", "model.zero_init_last=true"])
    if arm.startswith("medssl-recipe:"):
        name = arm.split(":", 1)[1]
        ov = [f"data.image_size={a.image_size}", f"train.max_steps={a.steps}"]
        if a.batch_size_given:
            ov.append(f"train.batch_size={a.batch_size}")
        return run_medssl(a, seed, root / f"{name}-{seed}", overrides=ov, config=name)
    if arm == "random":
        torch.manual_seed(seed)
        net = build_backbone(a, data["channels"]).eval()
        return (lambda im: net((im - 0.5) / 0.5)), {}
    if arm == "pixels":
        return (lambda im: ((im - 0.5) / 0.5).flatten(1)), {}
    raise SystemExit(f"unknown arm {arm!r}")


def table(rows: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds per arm (a repeated (arm, seed) counts once: its last line)."""
    rows = list({(r["arm"], r["seed"]): r for r in rows}.values())
    keys = sorted({k for r in rows for k in r["scores"]}, key=lambda k: (k.split("@")[0], float(k.split("@")[1])
                                                                        if "@" in k else 0))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | seeds | " + " | ".join(keys) + " | pretrain s | projector std at the end |",
             "|---|---|" + "---|" * (len(keys) + 2)]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        cells = []
        for k in keys:
            v = np.array([r["scores"][k] for r in rs if k in r["scores"]], dtype=float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        stds = [float(r["metrics"]["projector_std"]) for r in rs if "projector_std" in (r.get("metrics") or {})]
        fired = f"{np.mean(stds):.2f}" if stds else "—"
        secs = np.mean([r["pretrain_s"] for r in rs])
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {secs:.0f} | {fired} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    table_only = "--table" in (argv if argv is not None else sys.argv)
    p.add_argument("--data", required=not table_only, help="any labelled spec (npz:, folder:, csv:) or an "
                   "unlabelled one "
                   "with --pairs")
    p.add_argument("--pairs", type=Path, help="an npz of pairs (a, b, similar): score by pair AUC")
    p.add_argument("--arms", nargs="+", default=["medssl", "lightly"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", default="default", choices=["default", "cifar"])
    p.add_argument("--zero-init-last", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                   help="timm's zero-initialised last BN of each residual block (true/false)")
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--crop-min", type=float, default=0.3)
    p.add_argument("--brightness", type=float, default=0.4)
    p.add_argument("--contrast", type=float, default=0.4)
    p.add_argument("--jitter-p", type=float, default=0.8)
    p.add_argument("--blur-p", type=float, default=0.0)
    p.add_argument("--blur-sigma", type=float, nargs=2, default=[0.1, 2.0])
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--queue", type=int, default=4096)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--set", nargs="*", default=[], help="extra medssl overrides for the medssl arms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="a label stored with every result line")
    p.add_argument("--out", type=Path, default=HERE / "out" / "quality_vs_lightly.jsonl")
    p.add_argument("--table", nargs="*", metavar="TAG", help="only print the table of the result lines in --out "
                   "with these tags (no training)")
    a = p.parse_args(argv)
    if a.table is not None:
        rows = [json.loads(line) for line in a.out.open()]
        print(table([r for r in rows if not a.table or r.get("tag") in a.table]))
        return 0
    a.batch_size_given = a.batch_size is not None
    a.batch_size = a.batch_size or 64
    torch.set_num_threads(a.threads)
    data = load_images(a.data, a.image_size)
    pairs = dict(np.load(a.pairs)) if a.pairs else None
    if data["labels"] is None and pairs is None:
        raise SystemExit(f"{a.data} has no labels: give --pairs to score it")
    if "medssl" in a.arms:
        print("medssl overrides: " + " ".join(medssl_overrides(a)), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medssl-vs-lightly-") as tmp:
        for seed in a.seeds:
            for arm in a.arms:
                t0 = time.perf_counter()
                fn, extra = run_arm(arm, a, seed, data, Path(tmp))
                secs = time.perf_counter() - t0
                row = {"arm": arm, "seed": seed, "data": a.data, "tag": a.tag, "steps": a.steps,
                       "batch_size": a.batch_size, "image_size": a.image_size, "pretrain_s": round(secs, 1),
                       "scores": score(fn, data, pairs), **extra,
                       "recipe": {k: v for k, v in vars(a).items() if k not in ("out", "arms", "seeds")},
                       "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {a.threads} threads"}
                rows.append(row)
                with a.out.open("a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(json.dumps({k: row[k] for k in ("arm", "seed", "pretrain_s", "scores")}), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
