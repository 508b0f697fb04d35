"""``medssl export --format onnx``: 2D / 3D CNNs and ViTs (and a whitened encoder) run in onnxruntime with a dynamic
batch axis and give PyTorch's features to 1e-4."""

from __future__ import annotations

import numpy as np
import onnx  # the onnx extra; part of the dev requirements, so the test runs in CI
import onnxruntime as ort
import pytest
import torch

from medssl.cli import main
from medssl.encoders import load_encoder, random_encoder
from medssl.export import save_encoder
from medssl.export_onnx import export_onnx


def _perturbed(enc: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial batch-norm statistics, so a mis-exported buffer changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return enc


def _saved(tmp_path, name, *, in_chans=1, image_size=32, spatial_dims=2, patch_size=None, global_pool=None):
    enc = _perturbed(random_encoder(name, in_chans=in_chans, image_size=image_size, spatial_dims=spatial_dims,
                                    patch_size=patch_size, global_pool=global_pool))
    meta = {"model_name": name, "in_chans": in_chans, "image_size": image_size, "stem": "default",
            "spatial_dims": spatial_dims, "patch_size": patch_size, "global_pool": global_pool}
    return save_encoder(enc.backbone, tmp_path / "encoder.safetensors", meta)


def _compare(onnx_path, encoder_path, shape):
    """onnxruntime vs medssl's PyTorch encoder on batches of 1 and 3 (the export traced a batch of 2)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.name == "image" and isinstance(inp.shape[0], str)  # dynamic batch axis
    assert list(inp.shape[1:]) == list(shape)
    ref_model = load_encoder(encoder_path)
    for batch in (1, 3):
        x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = ref_model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape == (batch, ref.shape[1])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,spatial_dims,size,kw", [
    ("resnet18", 2, 32, {}),
    ("vit_tiny_patch16_224", 2, 32, {"patch_size": 8, "global_pool": "avg"}),
    ("resnet10_3d", 3, 16, {}),
    ("vit_tiny_3d", 3, 16, {"patch_size": 8, "global_pool": "token"}),
])
def test_onnx_matches_pytorch(tmp_path, name, spatial_dims, size, kw):
    path = _saved(tmp_path, name, image_size=size, spatial_dims=spatial_dims, **kw)
    res = export_onnx(tmp_path / "enc.onnx", encoder_file=path)
    assert res.format == "onnx" and res.path.is_file()
    assert any("checked with onnxruntime" in n for n in res.notes)
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["model_name"] == name and props["spatial_dims"] == str(spatial_dims)
    _compare(res.path, path, (1, *[size] * spatial_dims))


def test_onnx_includes_the_whitening(tmp_path):
    from medssl.nn.whitening import WhitenedBackbone

    enc = _perturbed(random_encoder("resnet18", in_chans=3, image_size=32))
    lin = torch.nn.Linear(512, 512)
    torch.nn.init.normal_(lin.weight, std=0.05)
    wb = WhitenedBackbone(enc.backbone, lin)
    meta = {"model_name": "resnet18", "in_chans": 3, "image_size": 32, "stem": "default", "spatial_dims": 2}
    path = save_encoder(wb, tmp_path / "encoder.safetensors", meta)
    res = export_onnx(tmp_path / "w.onnx", encoder_file=path)
    assert any("whitening" in n for n in res.notes)
    _compare(res.path, path, (3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    session = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():  # not the backbone's own features: the whitening is in the graph
        plain = enc(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - plain).max() > 1e-3


def test_cli_onnx_from_a_run(tmp_path, capsys):
    from medssl.api import pretrain

    run = pretrain("mocov2", "phantom2d:32", tmp_path / "run", image_size=32, batch_size=8, max_steps=1,
                   progress=False, overrides=["log.backends=[csv]"])
    code = main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "enc.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "max |onnx - torch|" in out
    _compare(tmp_path / "enc.onnx", run / "encoder.safetensors", (1, 32, 32))


@pytest.mark.parametrize("args,expect", [
    (["--out", "{t}/enc.safetensors"], "expected a .onnx file name"),
    (["--out", "{t}/dir.onnx"], "is a directory"),
    (["--out", "{t}/encoder.safetensors/x.onnx"], "is a file, not a directory"),
    (["--out", "{t}/enc.onnx", "--push", "a/b"], "--push and --license apply to --format hf-hub"),
    (["--out", "{t}/enc.onnx", "--license", "other"], "--push and --license apply to --format hf-hub"),
])
def test_hostile_onnx_outputs(tmp_path, capsys, args, expect):
    path = _saved(tmp_path, "resnet18")
    (tmp_path / "dir.onnx").mkdir()
    code = main(["export", "--checkpoint", str(path), "--format", "onnx", *[a.format(t=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err


def test_onnx_into_a_new_folder(tmp_path):
    path = _saved(tmp_path, "resnet18")
    res = export_onnx(tmp_path / "new" / "sub" / "enc.onnx", encoder_file=path, check=False)
    assert res.path.is_file() and not list(res.path.parent.glob(".*"))  # no temporary file left
    assert any("not checked" in n for n in res.notes)


def test_onnx_never_overwrites_the_run(tmp_path, capsys):
    path = _saved(tmp_path, "resnet18")
    (tmp_path / "config.yaml").write_text("method: {name: mocov2}\n")  # makes tmp_path a run directory
    code = main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "events.onnx")])
    assert code == 2 and "must not be overwritten" in capsys.readouterr().err
    code = main(["export", "--run", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "e.onnx")])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
