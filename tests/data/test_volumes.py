"""One orientation for every 3D format, physical-spacing resampling and sub-volume sampling (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.data.patches import PatchDataset, PatchSampling, sample_patches
from medssl.data.readers import read_file
from medssl.data.volumes import resample, resampled_shape

SPACING_XYZ = (0.8, 0.9, 2.5)  # x, y, z (RAS) in mm
ORIGIN = np.array([-10.0, 20.0, 5.0])


def _volume() -> np.ndarray:
    """The reference volume in RAS voxel order (x, y, z), integer-valued so every format stores it exactly."""
    return np.random.default_rng(3).integers(0, 1000, size=(7, 6, 5)).astype(np.float32)


def _ras_affine() -> np.ndarray:
    aff = np.diag([*SPACING_XYZ, 1.0])
    aff[:3, 3] = ORIGIN
    return aff


def _expected() -> np.ndarray:
    return _volume().transpose(2, 1, 0)  # (R, A, S) -> (S, A, R)


def _write_dicom_series(folder: Path, vol: np.ndarray) -> None:
    """A SAGITTAL series: rows run inferior, columns posterior, slices along the normal r x c (LPS -x, to the
    right). Written in shuffled order with names that sort differently from the positions."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    nx, ny, nz = vol.shape
    sx, sy, sz = SPACING_XYZ
    series = generate_uid()
    order = np.random.default_rng(0).permutation(nx)
    for name_k, k in enumerate(order):
        # pixel (row j, column i) of slice k: x = k, y = ny - 1 - i (posterior), z = nz - 1 - j (inferior)
        plane = vol[k, ::-1, ::-1].T.astype(np.uint16)  # (j, i) = (z reversed, y reversed)
        ras = ORIGIN + np.array([k * sx, (ny - 1) * sy, (nz - 1) * sz])  # the first pixel's centre
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, "1.2.3"
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-ras[0], -ras[1], ras[2]]  # LPS
        ds.PixelSpacing = [sz, sy]  # between rows (along c), between columns (along r)
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.InstanceNumber = name_k + 1
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds.save_as(folder / f"im{name_k:02d}.dcm", enforce_file_format=True)


def test_every_format_loads_to_one_orientation_and_spacing(tmp_path: Path) -> None:
    import nibabel as nib
    import nibabel.orientations as nio
    import SimpleITK as sitk

    vol, aff = _volume(), _ras_affine()
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "ras.nii.gz")
    # LPS NIfTI: x and y indices reversed, affine columns negated and the origin moved to the far corner
    lps_aff = aff.copy()
    lps_aff[:3, 0] *= -1
    lps_aff[:3, 1] *= -1
    lps_aff[:3, 3] = ORIGIN + np.array([(vol.shape[0] - 1) * SPACING_XYZ[0], (vol.shape[1] - 1) * SPACING_XYZ[1], 0])
    nib.save(nib.Nifti1Image(vol[::-1, ::-1].copy(), lps_aff), tmp_path / "lps.nii.gz")
    # MHA with a permuted, flipped direction matrix (voxel axes toward A, I, L)
    img = nib.Nifti1Image(vol, aff).as_reoriented(nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt("AIL")))
    data, a2 = np.asarray(img.dataobj), img.affine
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a2
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    itk = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).copy())
    itk.SetSpacing(tuple(float(s) for s in spacing))
    itk.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).reshape(-1)))
    itk.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    assert not np.allclose(np.array(itk.GetDirection()).reshape(3, 3), np.eye(3))
    sitk.WriteImage(itk, str(tmp_path / "ail.mha"))
    _write_dicom_series(tmp_path / "series", vol)

    expected = _expected()
    codes = {}
    for name in ("ras.nii.gz", "lps.nii.gz", "ail.mha", "series"):
        r = read_file(tmp_path / name)
        assert r.spatial_dims == 3, name
        np.testing.assert_array_equal(r.array[0], expected, err_msg=name)
        assert r.spacing == pytest.approx(SPACING_XYZ[::-1]), name
        # the affine maps (d, h, w) to the same RAS point whatever the file's layout
        np.testing.assert_allclose(r.affine @ [2, 3, 4, 1], aff @ [4, 3, 2, 1], atol=1e-4, err_msg=name)
        codes[name] = r.orientation
    assert codes == {"ras.nii.gz": "RAS", "lps.nii.gz": "LPS", "ail.mha": "AIL", "series": "PIR"}


def test_resampling_matches_simpleitk_on_an_anisotropic_volume() -> None:
    import SimpleITK as sitk

    vol = np.random.default_rng(1).random((7, 20, 18)).astype(np.float32)  # (z, y, x)
    spacing, target = (3.0, 0.5, 0.6), (1.0, 1.0, 1.0)
    ref_img = sitk.GetImageFromArray(vol)
    ref_img.SetSpacing(spacing[::-1])
    for mode, interp in (("linear", sitk.sitkLinear), ("nearest", sitk.sitkNearestNeighbor)):
        out = resample(vol[None], spacing, target, mode=mode)[0].numpy()
        shape = out.shape
        assert shape == resampled_shape(vol.shape, spacing, target)
        ref = sitk.GetArrayFromImage(sitk.Resample(ref_img, shape[::-1], sitk.Transform(), interp, (0.0, 0.0, 0.0),
                                                   target[::-1], (1, 0, 0, 0, 1, 0, 0, 0, 1), -1.0))
        inside = ref != -1.0  # ITK leaves points past the last voxel's half-width out; medssl repeats the border
        assert inside.mean() > 0.9
        np.testing.assert_allclose(out[inside], ref[inside], atol=1e-5, err_msg=mode)
        # the physical extent between the first and last voxel centres is kept to within half an output voxel
        for n_in, s_in, n_out, s_out in zip(vol.shape, spacing, shape, target, strict=True):
            assert abs((n_out - 1) * s_out - (n_in - 1) * s_in) <= s_out / 2
    mask = (vol > 0.5).astype(np.int64)[None]
    near = resample(mask, spacing, target, mode="nearest")
    assert near.dtype == torch.int64 and set(np.unique(near.numpy())) <= {0, 1}


def _sampling(**kw) -> PatchSampling:
    return PatchSampling(**{"patch_size": (4, 6, 8), "samples_per_volume": 3, **kw})


def test_patch_sampler_shapes_coverage_padding_and_foreground() -> None:
    image = torch.rand(2, 10, 12, 16)
    crops, mcrops, starts = sample_patches(image, None, _sampling(), np.random.default_rng(0))
    assert crops.shape == (3, 2, 4, 6, 8) and mcrops is None
    for crop, (a, b, c) in zip(crops, starts, strict=True):
        torch.testing.assert_close(crop, image[:, a:a + 4, b:b + 6, c:c + 8])
    # coverage: over many draws every voxel is in some crop, corners reach both ends
    seen = torch.zeros(10, 12, 16, dtype=torch.bool)
    rng = np.random.default_rng(1)
    all_starts = np.concatenate([sample_patches(image, None, _sampling(), rng)[2] for _ in range(2000)])
    for a, b, c in np.unique(all_starts, axis=0):
        seen[a:a + 4, b:b + 6, c:c + 8] = True
    assert seen.all() and (all_starts.min(axis=0) == 0).all() and (all_starts.max(axis=0) == [6, 6, 8]).all()
    # a volume smaller than the patch is zero-padded, centred
    small = torch.ones(1, 2, 12, 16)
    crops, _, starts = sample_patches(small, None, _sampling(), np.random.default_rng(0))
    assert crops.shape == (3, 1, 4, 6, 8) and (starts[:, 0] == -1).all()
    assert crops[:, :, 1:3].min() == 1 and crops[:, :, 0].max() == 0 and crops[:, :, 3].max() == 0
    # foreground: a bright 2^3 blob in a dark volume is in every crop with foreground_p=1, rarely without
    dark = torch.zeros(1, 40, 40, 40)
    dark[:, 30:32, 5:7, 20:22] = 1.0
    hit = [sample_patches(dark, None, _sampling(foreground_p=1.0), np.random.default_rng(s))[0].amax(dim=(1, 2, 3, 4))
           for s in range(5)]
    assert all(bool((h == 1).all()) for h in hit)
    miss = [sample_patches(dark, None, _sampling(), np.random.default_rng(s))[0].amax() for s in range(5)]
    assert sum(float(m) for m in miss) < 3
    # with a mask, the mask decides (intensity ignored) and the mask crops follow the image crops
    mask = torch.zeros(40, 40, 40, dtype=torch.int64)
    mask[2:4, 30:32, 1:3] = 1
    crops, mcrops, starts = sample_patches(dark, mask, _sampling(foreground_p=1.0), np.random.default_rng(0))
    assert mcrops is not None and (mcrops.amax(dim=(1, 2, 3)) == 1).all()


def test_patch_dataset_is_deterministic_per_epoch_and_item() -> None:
    from medssl.data.specs import VolumeOptions, open_dataset

    base = open_dataset("phantom3d:6", volume=VolumeOptions(native_size=True))
    assert base.image_size == 32
    ds = PatchDataset(base, _sampling(patch_size=(8, 8, 8), samples_per_volume=2, seed=5))
    a, b = ds[(3, 1)], ds[(3, 1)]
    torch.testing.assert_close(a["image"], b["image"])
    assert a["image"].shape == (2, 1, 8, 8, 8) and a["mask"].shape == (2, 8, 8, 8) and a["index"] == 3
    other_epoch = ds[(3, 2)]["image"]
    assert not torch.equal(a["image"], other_epoch)
    same_seed = PatchDataset(base, _sampling(patch_size=(8, 8, 8), samples_per_volume=2, seed=5))
    torch.testing.assert_close(same_seed[(3, 1)]["image"], a["image"])
    assert ds.image_size == 8 and ds.samples_per_volume == 2
