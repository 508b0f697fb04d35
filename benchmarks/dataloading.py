"""Read + augment throughput of medssl's data path: PNG, DICOM (plain and JPEG 2000), NIfTI volumes.

    python benchmarks/dataloading.py [--n 64] [--size 512] [--volume 128x128x64] [--workers 0 1 2] [--json]

For each format it writes ``--n`` distinct files (content differs, so the content-hash cache cannot merge
them) built from a real pydicom test image, then times one pass over a ``csv:`` manifest through the
DataLoader plus the batched view augmentation the methods run (``ViewSampler``), in three cache states:

* ``nocache``: decode every time (``data.cache=false``);
* ``fill``: first pass with the cache on (decode + write the cache entry);
* ``cached``: second pass, items read back memory-mapped.

Each cell is images (or volumes) per second, with 0, 1 and 2 DataLoader workers. The model is not run.
"read only" counts only the time the loop waited for the DataLoader (with workers: the reading they could not
hide behind the augmentation), so "cached ÷ no cache (read)" is what the cache saves the training loop.

The 3D path (``--volumes3d N``, docs/volumes.md): ``N`` anisotropic NIfTI volumes (``--volume3d-shape`` at
3 x 0.8 x 0.8 mm) read + resampled to ``--spacing`` + cut into ``--patch``³ crops (``data.volume_mode:
patches``, half foreground-centred), cold (no cache) and cached, with ``samples_per_volume`` 1 and 4: volumes/s
and crops/s, next to the time of one forward + backward pass of a 3D ResNet-10 on a batch of those crops (the
floor of a 3D CPU training step), so the table says whether loading bounds the step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _base_image(size: int) -> np.ndarray:
    """A real CT slice (pydicom's CT_small.dcm, 128²) upsampled to ``size``² as int16."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    x = torch.from_numpy(ds.pixel_array.astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return up.numpy().astype(np.int16)


def make_dicoms(folder: Path, n: int, size: int, compress: bool) -> list[Path]:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    folder.mkdir(parents=True, exist_ok=True)
    base = _base_image(size)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        arr = (base + rng.integers(-20, 20, base.shape)).astype(np.int16)
        ds.Rows, ds.Columns = size, size
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = arr.tobytes()
        if compress:
            ds.compress(JPEG2000Lossless, arr)
        p = folder / f"img{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def make_pngs(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    base = _base_image(size).astype(np.float32)
    base = (base - base.min()) / (base.max() - base.min()) * 230
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        p = folder / f"img{i:04d}.png"
        Image.fromarray((base + rng.integers(0, 20, base.shape)).astype(np.uint8)).save(p)
        out.append(p)
    return out


def make_niftis(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    body = ((zz**2 + yy**2 + xx**2) < 0.8).astype(np.float32) * 800
    out = []
    for i in range(n):
        vol = (body + rng.normal(0, 30, shape)).astype(np.int16).transpose(2, 1, 0)  # (x, y, z) on disk
        p = folder / f"vol{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), p)
        out.append(p)
    return out


def write_manifest(files: list[Path], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id"])
        for i, p in enumerate(files):
            w.writerow([str(p), f"p{i}"])
    return path


def one_pass(spec: str, image_size: int, workers: int, cache_dir: Path | None, batch: int
             ) -> tuple[float, float, int]:
    """Seconds for one pass over the dataset (load + views), seconds the loop waited for the loader, item count.

    The wait is what reading costs a training loop: with workers it is only the part the workers could not hide
    behind the (here: augmentation) work of the main process.
    """
    from medssl.config import DataConfig
    from medssl.data.specs import open_from_config
    from medssl.transforms.views import ViewConfig, ViewSampler

    dcfg = DataConfig(spec=spec, image_size=image_size, cache=cache_dir is not None, volume_mode="resize",
                      cache_dir=str(cache_dir) if cache_dir else None)
    ds = open_from_config(dcfg)
    views = ViewSampler(ViewConfig(), image_size, ds.spatial_dims)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False,
                                         persistent_workers=False, collate_fn=_collate)
    t0 = time.perf_counter()
    n, wait = 0, 0.0
    it = iter(loader)
    while True:
        tw = time.perf_counter()
        images = next(it, None)
        wait += time.perf_counter() - tw
        if images is None:
            break
        views(images)
        views(images)
        n += images.shape[0]
    return time.perf_counter() - t0, wait, n


def _collate(items: list[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items])


def _collate_crops(items: list[dict[str, Any]]) -> torch.Tensor:
    return torch.cat([it["image"] for it in items])


def make_anisotropic_niftis(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    """``n`` (D, H, W) volumes at 3 x 0.8 x 0.8 mm (z, y, x), stored LPS as many scanners write them."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    body = (((zz / 0.9) ** 2 + yy**2 + xx**2) < 0.7).astype(np.float32) * 800
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])
    out = []
    for i in range(n):
        vol = (body + rng.normal(0, 30, shape)).astype(np.int16).transpose(2, 1, 0)  # (x, y, z) on disk
        p = folder / f"vol{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), p)
        out.append(p)
    return out


def volume_pass(spec: str, spacing: float, patch: int, spv: int, workers: int, cache_dir: Path | None,
                crops_per_batch: int) -> tuple[float, int, int]:
    """Seconds for one pass of the 3D patch path (read + resample + sample ``spv`` crops per volume), volumes and
    crops read."""
    from medssl.config import DataConfig
    from medssl.data.patches import PatchDataset, PatchSampling
    from medssl.data.specs import open_from_config

    dcfg = DataConfig(spec=spec, spacing=spacing, volume_mode="patches", patch_size=patch, samples_per_volume=spv,
                      cache=cache_dir is not None, cache_dir=str(cache_dir) if cache_dir else None)
    ds = PatchDataset(open_from_config(dcfg), PatchSampling(tuple(dcfg.patch_size), spv, 0.5, 0.1))
    loader = torch.utils.data.DataLoader(ds, batch_size=max(1, crops_per_batch // spv), num_workers=workers,
                                         shuffle=False, persistent_workers=False, collate_fn=_collate_crops)
    t0 = time.perf_counter()
    n_vol = n_crops = 0
    for crops in loader:
        n_crops += crops.shape[0]
        n_vol += crops.shape[0] // spv
    return time.perf_counter() - t0, n_vol, n_crops


def step_seconds(patch: int, batch: int, repeats: int = 3) -> float:
    """Median seconds of one forward + backward of a 3D ResNet-10 on ``batch`` crops of ``patch``³ (the floor of a
    3D training step; methods add their heads, views and optimiser)."""
    from medssl.encoders import random_encoder

    enc = random_encoder("resnet10_3d", in_chans=1, image_size=patch, spatial_dims=3).train()
    x = torch.rand(batch, 1, patch, patch, patch)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        enc(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def run_3d(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="medssl-bench-vol-"))
    shape = tuple(int(v) for v in args.volume3d_shape.split("x"))
    rows = []
    try:
        files = make_anisotropic_niftis(tmp / "nii", args.volumes3d, shape)  # type: ignore[arg-type]
        spec = f"csv:{write_manifest(files, tmp / 'vols.csv')}"
        step = step_seconds(args.patch, args.batch_size)
        for spv in (1, 4):
            for workers in args.workers:
                cache = tmp / f"cache-{spv}-{workers}"
                t_cold, n_vol, n_crops = volume_pass(spec, args.spacing, args.patch, spv, workers, None,
                                                     args.batch_size)
                volume_pass(spec, args.spacing, args.patch, spv, workers, cache, args.batch_size)
                t_hit, _, _ = volume_pass(spec, args.spacing, args.patch, spv, workers, cache, args.batch_size)
                shutil.rmtree(cache, ignore_errors=True)
                rows.append({"format": f"NIfTI {args.volume3d_shape} @ 3x0.8x0.8 mm -> {args.spacing:g} mm, "
                                       f"{args.patch}^3 patches", "samples_per_volume": spv, "workers": workers,
                             "volumes": n_vol, "crops": n_crops,
                             "cold_volumes_per_s": n_vol / t_cold, "cached_volumes_per_s": n_vol / t_hit,
                             "cold_crops_per_s": n_crops / t_cold, "cached_crops_per_s": n_crops / t_hit,
                             "step_s": step, "step_crops_per_s": args.batch_size / step,
                             "loading_bounds_step_cold": n_crops / t_cold < args.batch_size / step,
                             "loading_bounds_step_cached": n_crops / t_hit < args.batch_size / step})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="medssl-bench-data-"))
    vol = tuple(int(v) for v in args.volume.split("x"))
    rows = []
    try:
        sets = {
            "PNG 8-bit": (make_pngs(tmp / "png", args.n, args.size), args.image_size),
            "DICOM 16-bit": (make_dicoms(tmp / "dcm", args.n, args.size, compress=False), args.image_size),
            "DICOM JPEG 2000": (make_dicoms(tmp / "j2k", args.n, args.size, compress=True), args.image_size),
            f"NIfTI {args.volume}": (make_niftis(tmp / "nii", max(args.n // 4, 4), vol), args.volume_size),
        }
        for name, (files, size) in sets.items():
            spec = f"csv:{write_manifest(files, tmp / (name.replace(' ', '_') + '.csv'))}"
            for workers in args.workers:
                cache = tmp / f"cache-{name}-{workers}".replace(" ", "_")
                t_none, w_none, n = one_pass(spec, size, workers, None, args.batch_size)
                t_fill, _, _ = one_pass(spec, size, workers, cache, args.batch_size)
                t_hit, w_hit, _ = one_pass(spec, size, workers, cache, args.batch_size)
                shutil.rmtree(cache, ignore_errors=True)
                rows.append({"format": name, "workers": workers, "items": n, "output_size": size,
                             "nocache_per_s": n / t_none, "fill_per_s": n / t_fill, "cached_per_s": n / t_hit,
                             "speedup_cached": t_none / t_hit,
                             "nocache_read_per_s": n / w_none, "cached_read_per_s": n / w_hit,
                             "speedup_cached_read": w_none / w_hit})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="2D files per format (volumes: n/4)")
    ap.add_argument("--size", type=int, default=512, help="side of the 2D source images")
    ap.add_argument("--image-size", type=int, default=224, help="2D model input side")
    ap.add_argument("--volume", default="128x128x64", help="source volume shape DxHxW")
    ap.add_argument("--volume-size", type=int, default=64, help="3D model input side")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--volumes3d", type=int, default=0, help="3D patch path: number of volumes (0 = skip)")
    ap.add_argument("--only3d", action="store_true", help="run the 3D patch path only")
    ap.add_argument("--volume3d-shape", default="48x192x192", help="3D source shape DxHxW (3 x 0.8 x 0.8 mm)")
    ap.add_argument("--spacing", type=float, default=1.5, help="3D: data.spacing (isotropic, mm)")
    ap.add_argument("--patch", type=int, default=64, help="3D: patch side in voxels")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [] if args.only3d else run(args)
    rows3d = run_3d(args) if args.volumes3d or args.only3d else []
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "rows": rows, "rows_3d": rows3d}))
        return
    if rows3d:
        print("| 3D source | samples / volume | workers | volumes/s cold | volumes/s cached | crops/s cold | "
              "crops/s cached | 3D ResNet-10 fwd+bwd crops/s | loading bounds the step (cold / cached) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows3d:
            print(f"| {r['format']} | {r['samples_per_volume']} | {r['workers']} | {r['cold_volumes_per_s']:.2f} | "
                  f"{r['cached_volumes_per_s']:.2f} | {r['cold_crops_per_s']:.2f} | {r['cached_crops_per_s']:.2f} | "
                  f"{r['step_crops_per_s']:.2f} | {'yes' if r['loading_bounds_step_cold'] else 'no'} / "
                  f"{'yes' if r['loading_bounds_step_cached'] else 'no'} |")
        if not rows:
            return
    print("| format | workers | items | no cache /s | first pass (fill) /s | cached /s | cached ÷ no cache | "
          "read only, no cache /s | read only, cached /s | cached ÷ no cache (read) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['workers']} | {r['items']} | {r['nocache_per_s']:.1f} | {r['fill_per_s']:.1f} | "
              f"{r['cached_per_s']:.1f} | {r['speedup_cached']:.1f}× | {r['nocache_read_per_s']:.1f} | "
              f"{r['cached_read_per_s']:.1f} | {r['speedup_cached_read']:.1f}× |")


if __name__ == "__main__":
    main()
