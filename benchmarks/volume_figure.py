"""The picture of docs/volumes.md: one anisotropic volume from file to tensor.

A synthetic prostate-like volume (an ellipsoid gland with an off-centre lesion and a rectum-like tube,
0.5 x 0.5 x 3 mm voxels as the prostate T2w seed) is written as an LPS NIfTI, then read the way medssl reads
it. Rows: the array as stored in the file; medssl's canonical ``(S, A, R)`` array at native spacing (the
sagittal and coronal views are squashed 6x: one voxel is 3 mm high but drawn as 0.5 mm); after
``data.spacing: [1, 1, 1]`` (anatomy right); four ``patches`` crops of 32^3 voxels, half foreground-centred.

    python benchmarks/volume_figure.py            # writes docs/img/volumes.png (~100 KB)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def synthetic_volume() -> tuple[np.ndarray, np.ndarray]:
    """(x, y, z) array in LPS voxel order and its RAS affine: 120 x 120 x 20 voxels of 0.5 x 0.5 x 3 mm."""
    nx, ny, nz = 120, 120, 20
    sp = np.array([0.5, 0.5, 3.0])
    # RAS mm coordinates of the voxel centres of an LPS-stored grid (x and y indices run to L and P)
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    r, a, s = -(i - nx / 2) * sp[0], -(j - ny / 2) * sp[1], (k - nz / 2) * sp[2]
    rng = np.random.default_rng(0)
    vol = 0.05 * rng.random((nx, ny, nz))
    body = (r / 28) ** 2 + (a / 26) ** 2 < 1
    vol[body] += 0.25
    gland = (r / 18) ** 2 + ((a - 3) / 13) ** 2 + (s / 16) ** 2 < 1
    vol[gland] += 0.45
    lesion = ((r - 7) / 5) ** 2 + ((a - 6) / 4) ** 2 + ((s - 5) / 6) ** 2 < 1
    vol[lesion] -= 0.3
    rectum = (r / 6) ** 2 + ((a + 17) / 5) ** 2 < 1
    vol[rectum] = 0.9
    affine = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    affine[:3, 3] = [nx / 2 * sp[0], ny / 2 * sp[1], -nz / 2 * sp[2]]
    return (vol * 1000).astype(np.float32), affine


def _mid(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal middle slices of a (D, H, W) array, displayed with superior / anterior up."""
    d, h, w = (n // 2 for n in vol.shape)
    return [vol[d][::-1], vol[:, h][::-1], vol[:, :, w][::-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "volumes.png"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from medssl.data.manifest import load_file_image
    from medssl.data.patches import PatchSampling, sample_patches
    from medssl.data.readers import IntensityConfig, read_file

    data, affine = synthetic_volume()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t2w.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        stored = np.asarray(nib.load(path).dataobj)
        native = read_file(path)
        resampled = load_file_image(path, IntensityConfig(), 3, 1, 64, spacing=(1.0, 1.0, 1.0), native_size=True)
    crops, _, starts = sample_patches(resampled, None, PatchSampling((32, 32, 32), 4, foreground_p=0.5,
                                                                     foreground_threshold=0.3),
                                      np.random.default_rng(1))
    nx, ny, nz = stored.shape
    rows = [
        ("file array (x, y, z) as stored, LPS", [stored[:, :, nz // 2].T, stored[:, ny // 2].T, stored[nx // 2].T]),
        (f"medssl (S, A, R), native {native.spacing[0]:g} x {native.spacing[1]:g} x {native.spacing[2]:g} mm",
         _mid(native.array[0])),
        ("after data.spacing [1, 1, 1] mm", _mid(resampled[0].numpy())),
    ]
    fig, axes = plt.subplots(4, 4, figsize=(7.2, 7.4), gridspec_kw={"width_ratios": [1, 1, 1, 0.05]})
    for r, (title, slices) in enumerate(rows):
        for c, img in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", aspect="equal", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r > 0:
                ax.set_title(["axial", "coronal", "sagittal"][c], fontsize=7)
        axes[r, 0].set_ylabel(title, fontsize=7)
        axes[r, 3].axis("off")
    for c in range(3):
        ax = axes[3, c]
        crop = crops[c, 0].numpy()
        ax.imshow(crop[crop.shape[0] // 2][::-1], cmap="gray", interpolation="nearest")
        ax.set_title(f"patch {c + 1}, corner {tuple(int(v) for v in starts[c])}", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[3, 0].set_ylabel("32^3 patches (axial middle)", fontsize=7)
    axes[3, 3].axis("off")
    fig.suptitle("one 0.5 x 0.5 x 3 mm volume from file to tensor (medssl)", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB); resampled shape {tuple(resampled.shape[1:])}, "
          f"native {tuple(native.shape)} at {native.spacing} mm")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
