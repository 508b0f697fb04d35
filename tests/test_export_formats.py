"""``medssl export --format``: the printed snippet loads the file strictly and gives medssl's features."""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

from medssl.cli import main
from medssl.encoders import random_encoder
from medssl.errors import ConfigError
from medssl.export import save_encoder
from medssl.export_formats import export_weights
from medssl.transforms.intensity import normalize


def _perturbed(enc: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial batch-norm statistics, so a mis-mapped buffer changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return enc


def _saved(tmp_path, name, *, in_chans=1, image_size=32, stem="default", spatial_dims=2, patch_size=None,
           global_pool=None):
    enc = _perturbed(random_encoder(name, in_chans=in_chans, image_size=image_size, stem=stem,
                                    spatial_dims=spatial_dims, patch_size=patch_size, global_pool=global_pool))
    meta = {"model_name": name, "in_chans": in_chans, "image_size": image_size, "stem": stem,
            "spatial_dims": spatial_dims, "patch_size": patch_size, "global_pool": global_pool}
    path = save_encoder(enc.backbone, tmp_path / "encoder.safetensors", meta)
    return enc, path


def _check_same_features(enc, result, shape):
    ns: dict = {}
    exec(result.snippet, ns)  # exactly the printed line
    model = ns["model"]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    # MONAI's 3D arrays are medssl's with the spatial axes reversed ((R, A, S) vs (S, A, R))
    theirs_x = x.permute(0, 1, 4, 3, 2) if x.ndim == 5 else x
    with torch.no_grad():
        ours = enc(x)
        theirs = model(normalize(theirs_x))
    if isinstance(theirs, tuple):
        theirs = theirs[0]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,stem,kw", [
    ("resnet18", "default", {}),
    ("resnet18", "cifar", {}),
    ("vit_tiny_patch16_224", "default", {"patch_size": 8, "global_pool": "avg"}),
])
def test_timm_export_loads_with_snippet(tmp_path, name, stem, kw):
    enc, path = _saved(tmp_path, name, stem=stem, **kw)
    res = export_weights(tmp_path / "out.safetensors", "timm", encoder_file=path)
    assert res.snippet.startswith("import timm") and "load_state_dict" in res.snippet
    assert "strict=False" not in res.snippet
    _check_same_features(enc, res, (2, 1, 32, 32))


@pytest.mark.parametrize("name,stem,in_chans", [("resnet18", "default", 1), ("resnet18", "cifar", 1),
                                                 ("resnet50", "default", 3)])
def test_torchvision_export_loads_with_snippet(tmp_path, name, stem, in_chans):
    pytest.importorskip("torchvision")
    enc, path = _saved(tmp_path, name, stem=stem, in_chans=in_chans)
    res = export_weights(tmp_path / "tv.safetensors", "torchvision", encoder_file=path)
    assert f"torchvision.models.{name}()" in res.snippet
    _check_same_features(enc, res, (2, in_chans, 32, 32))


def _monai_resnet_keys(layers: tuple[int, ...]) -> set[str]:
    """The state-dict keys of monai.networks.nets.ResNet (basic blocks, feed_forward=False,
    bias_downsample=False), written out from MONAI's module structure."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{b}" for b in bn)}
    for s, n in enumerate(layers, start=1):
        for i in range(n):
            p = f"layer{s}.{i}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight", *(f"{p}.bn1.{b}" for b in bn),
                     *(f"{p}.bn2.{b}" for b in bn)}
            if i == 0 and s > 1:
                keys |= {f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in bn)}
    return keys


@pytest.mark.parametrize("stem", ["default", "cifar"])
def test_monai_export_keys_and_features(tmp_path, stem):
    enc, path = _saved(tmp_path, "resnet10_3d", stem=stem, spatial_dims=3, image_size=16)
    res = export_weights(tmp_path / "m.safetensors", "monai", encoder_file=path)
    assert set(st.load_file(str(res.path))) == _monai_resnet_keys((1, 1, 1, 1))
    assert "monai.networks.nets.resnet10(spatial_dims=3, n_input_channels=1" in res.snippet
    pytest.importorskip("monai")
    _check_same_features(enc, res, (2, 1, 16, 16, 16))


def test_unsupported_pairs_name_the_supported_ones(tmp_path):
    _, path = _saved(tmp_path, "resnet18_3d", spatial_dims=3, image_size=16)
    with pytest.raises(ConfigError, match="supported pairs.*torchvision: 2D resnet18"):
        export_weights(tmp_path / "a.safetensors", "timm", encoder_file=path)
    with pytest.raises(ConfigError, match="supported pairs"):
        export_weights(tmp_path / "b.safetensors", "torchvision", encoder_file=path)
    (tmp_path / "v").mkdir()
    _, vit = _saved(tmp_path / "v", "vit_tiny_3d", spatial_dims=3, image_size=16, patch_size=8)
    with pytest.raises(ConfigError, match="monai: no faithful MONAI counterpart for vit_tiny_3d"):
        export_weights(tmp_path / "c.safetensors", "monai", encoder_file=vit)
    (tmp_path / "c").mkdir()
    _, p2 = _saved(tmp_path / "c", "convnext_atto", image_size=32)
    with pytest.raises(ConfigError, match="torchvision: no torchvision counterpart for convnext_atto"):
        export_weights(tmp_path / "d.safetensors", "torchvision", encoder_file=p2)


def test_cli_export_prints_snippet(tmp_path, capsys):
    enc, path = _saved(tmp_path, "resnet18")
    run = tmp_path / "run"
    run.mkdir()
    path.rename(run / "encoder.safetensors")
    out = tmp_path / "exp" / "enc.safetensors"
    assert main(["export", "--run", str(run), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(ln.strip() for ln in printed.splitlines() if ln.strip().startswith("import timm"))
    ns: dict = {}
    exec(line, ns)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ns["model"](normalize(x)), enc(x), rtol=1e-5, atol=1e-5)
    assert main(["export", "--run", str(run), "--format", "monai", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "supported pairs" in capsys.readouterr().err


def test_out_may_not_be_a_file_of_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    enc, path = _saved(run, "resnet18")
    (run / "config.yaml").write_text("method: {name: mocov2}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (tmp_path / "link.safetensors").symlink_to(path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out in (path, run / "checkpoints" / ".." / "encoder.safetensors", tmp_path / "link.safetensors",
                run / "whitening.safetensors", run / "encoder_vit.safetensors", run / "checkpoints" / "x.safetensors"):
        with pytest.raises(ConfigError, match="must not be overwritten"):
            export_weights(out, "timm", run=run)
    with pytest.raises(ConfigError, match="must not be overwritten"):  # the run's file given as --checkpoint
        export_weights(path, "timm", encoder_file=path)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a new file in a new sub-folder of the run is not the run's: allowed, written atomically (no temp left)
    res = export_weights(run / "exports" / "timm.safetensors", "timm", run=run)
    _check_same_features(enc, res, (2, 1, 32, 32))
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["timm.safetensors"]


def test_monai_export_gives_medssl_features_on_a_volume_loaded_the_monai_way(tmp_path):
    """One NIfTI file (LPS, anisotropic), loaded by medssl (canonical (S, A, R), resampled, percentile-scaled)
    into the medssl encoder, and by the printed MONAI transforms into the exported MONAI model: same features."""
    pytest.importorskip("monai")
    import nibabel as nib
    import numpy as np

    from medssl.config import DataConfig
    from medssl.data.manifest import load_file_image
    from medssl.data.readers import IntensityConfig
    from medssl.export import volume_metadata

    rng = np.random.default_rng(0)
    vol = rng.random((30, 26, 11)).astype(np.float32) * 500  # x, y, z voxels of 0.7 x 0.8 x 2.5 mm
    vol[5:20, 8:14, 3:7] += 800  # an asymmetric bright block: a transposed kernel would see it differently
    aff = np.diag([-0.7, -0.8, 2.5, 1.0])  # LPS storage
    aff[:3, 3] = [20.0, 30.0, -10.0]
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "v.nii.gz")
    data = DataConfig(spec="x", spacing=[2.0, 1.0, 1.5])
    # the crop size must not shadow a ViT's token patch_size in the encoder metadata
    crops = volume_metadata(DataConfig(spec="x", patch_size=16), 3)
    assert crops["volume_patch_size"] == "16,16,16" and "patch_size" not in crops
    meta = {"model_name": "resnet10_3d", "in_chans": 1, "image_size": 16, "stem": "default", "spatial_dims": 3,
            **volume_metadata(data, 3)}
    enc = _perturbed(random_encoder("resnet10_3d", in_chans=1, image_size=16, spatial_dims=3))
    path = save_encoder(enc.backbone, tmp_path / "encoder.safetensors", meta)
    res = export_weights(tmp_path / "m.safetensors", "monai", encoder_file=path)
    assert res.preprocess and 'Orientation(axcodes="RAS")' in res.preprocess and "pixdim=(1.5, 1, 2)" in res.preprocess
    m = st.safe_open(str(res.path), "pt").metadata()
    assert m["axis_order"] == "RAS" and m["medssl_axis_order"] == "SAR" and m["spacing_xyz"] == "1.5,1,2"

    ours_x = load_file_image(tmp_path / "v.nii.gz", IntensityConfig(), 3, 1, 16, spacing=(2.0, 1.0, 1.5),
                             native_size=True)
    ns: dict = {"path": str(tmp_path / "v.nii.gz")}
    exec(res.snippet, ns)
    exec(res.preprocess, ns)
    theirs_x = ns["x"]
    assert tuple(theirs_x.shape[2:]) == tuple(ours_x.shape[1:])[::-1]  # (R, A, S) vs (S, A, R)
    torch.testing.assert_close((theirs_x[0] * 0.5 + 0.5).permute(0, 3, 2, 1).float(), ours_x, atol=2e-3, rtol=0)
    with torch.no_grad():
        ours = enc(ours_x[None])
        theirs = ns["model"](theirs_x.as_tensor() if hasattr(theirs_x, "as_tensor") else theirs_x)
        unpermuted = ns["model"](normalize(ours_x[None]))  # medssl's array straight into MONAI: not the same
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(unpermuted, ours, rtol=1e-3, atol=1e-3)
