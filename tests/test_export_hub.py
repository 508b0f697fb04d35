"""``medssl export --format hf-hub``: the folder loads through timm's own hub paths (``local-dir:``, ``hf-hub:`` with
the download mocked to read the folder, ``pretrained_cfg_overlay=dict(file=...)``) and gives medssl's features; the
model card; ``--push`` through a mocked huggingface_hub, and a clear exit 2 when the upload fails."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

from medssl.cli import main
from medssl.encoders import load_encoder, random_encoder
from medssl.eval.results import format_table, summarize, write_results
from medssl.export import save_encoder
from medssl.export_hub import export_hf_hub


def _perturbed(enc: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
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
    tmp_path.mkdir(parents=True, exist_ok=True)
    return save_encoder(enc.backbone, tmp_path / "encoder.safetensors", meta)


def _same_features(model, encoder_file, in_chans, size, from_config=True):
    """timm's model on normalised images == medssl's encoder on [0, 1] images. ``from_config``: the model came from
    config.json, so timm's own data config (input size, mean, std) must be medssl's."""
    cfg = timm.data.resolve_data_config({}, model=model)
    if from_config:
        assert cfg["input_size"] == (in_chans, size, size)
    else:  # a plain name keeps timm's ImageNet data config: the card says to normalise by 0.5 / 0.5
        cfg = {"mean": (0.5,) * in_chans, "std": (0.5,) * in_chans}
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    x = torch.rand(3, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        theirs = model((x - mean) / std)
        ours = load_encoder(encoder_file)(x)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def run_with_eval(tmp_path_factory):
    """A 2-step MoCo v2 run with one (synthetic-row) evaluation under RUN/eval."""
    from medssl.api import pretrain

    run = pretrain("mocov2", "phantom2d:32", tmp_path_factory.mktemp("hub") / "run", image_size=32, batch_size=8,
                   max_steps=1, progress=False, overrides=["log.backends=[csv]"])
    rows = [{"encoder": "run", "protocol": "linear", "label_fraction": f, "seed": s, "n_train": 10,
             "metrics": {"auc": 0.6 + 0.1 * f + 0.01 * s}, "notes": [], "params": {}}
            for f in (0.1, 1.0) for s in (0, 1)]
    write_results(rows, run / "eval", meta={"protocol": "linear", "data": "phantom2d:32"})
    return run, format_table(summarize(rows))


def test_run_folder_loads_through_timm_hub_paths(run_with_eval, tmp_path, monkeypatch, capsys):
    run, table = run_with_eval
    out = tmp_path / "hub"
    assert main(["export", "--run", str(run), "--format", "hf-hub", "--out", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_features"] == 512 and cfg["num_classes"] == 0
    assert cfg["model_args"]["in_chans"] == 1
    assert cfg["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert cfg["pretrained_cfg"]["mean"] == [0.5] and cfg["pretrained_cfg"]["std"] == [0.5]
    assert cfg["pretrained_cfg"]["license"] == "other"
    enc_file = run / "encoder.safetensors"

    # 1. timm's loader for a local folder
    _same_features(timm.create_model(f"local-dir:{out}", pretrained=True), enc_file, 1, 32)
    # 2. a plain name with the weights file as overlay
    model = timm.create_model("resnet18", pretrained=True, num_classes=0, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    _same_features(model, enc_file, 1, 32, from_config=False)
    # 3. "hf-hub:ORG/NAME": timm's download function answers from the folder (no network here)
    import timm.models._hub as hub

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(out / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    _same_features(timm.create_model("hf-hub:someone/moco-phantom", pretrained=True), enc_file, 1, 32)
    assert ("someone/moco-phantom", "config.json") in asked and ("someone/moco-phantom", "model.safetensors") in asked

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: other\n")
    assert "(mocov2)" in card and "phantom2d:32" in card and "items per split" in card
    assert table.strip() in card  # the run's evaluation, as its results table
    assert (run / "config.yaml").read_text().strip() in card  # the training config


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", {"patch_size": 8, "global_pool": "avg"}),
    ("vit_tiny_patch16_224", {"patch_size": 16, "global_pool": "token", "in_chans": 3}),
])
def test_vit_folder_loads_from_config(tmp_path, name, kw):
    in_chans = kw.pop("in_chans", 1)
    path = _saved(tmp_path / "src", name, in_chans=in_chans, **kw)
    res = export_hf_hub(tmp_path / "hub", encoder_file=path, license="cc-by-4.0")
    assert json.loads((res.path / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
    _same_features(timm.create_model(f"local-dir:{res.path}", pretrained=True), path, in_chans, 32)


def test_cifar_stem_card_snippet(tmp_path):
    path = _saved(tmp_path / "src", "resnet18", stem="cifar")
    res = export_hf_hub(tmp_path / "hub", encoder_file=path)
    assert any("CIFAR stem" in n for n in res.notes)
    card = (res.path / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    import os

    cwd = os.getcwd()
    os.chdir(res.path)
    try:
        exec(code, ns)  # the card's own loading code
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        torch.testing.assert_close(ns["features"], load_encoder(path)(ns["x"]), rtol=1e-5, atol=1e-5)


def test_whitening_is_shipped_beside(tmp_path):
    from medssl.nn.whitening import WhitenedBackbone

    enc = random_encoder("resnet18", in_chans=1, image_size=32)
    wb = WhitenedBackbone(enc.backbone, torch.nn.Linear(512, 512))
    meta = {"model_name": "resnet18", "in_chans": 1, "image_size": 32, "stem": "default", "spatial_dims": 2}
    path = save_encoder(wb, tmp_path / "encoder.safetensors", meta)
    res = export_hf_hub(tmp_path / "hub", encoder_file=path)
    assert (res.path / "whitening.safetensors").is_file()
    assert "whitening.safetensors" in (res.path / "README.md").read_text()
    import safetensors.torch as st

    lin = torch.nn.Linear(512, 512)
    lin.load_state_dict(st.load_file(res.path / "whitening.safetensors"))
    model = timm.create_model(f"local-dir:{res.path}", pretrained=True).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lin(model((x - 0.5) / 0.5)), load_encoder(path)(x), rtol=1e-5, atol=1e-5)


class FakeApi:
    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeApi.fail is not None:
            raise FakeApi.fail

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs["repo_id"], sorted(p.name for p in
                                                                         __import__("pathlib").Path(
                                                                             kwargs["folder_path"]).iterdir())))


def test_push_uploads_the_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail = [], None
    path = _saved(tmp_path / "src", "resnet18")
    code = main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "hub"),
                 "--push", "my-org/moco-r18", "--license", "apache-2.0"])
    assert code == 0
    assert "hf-hub:my-org/moco-r18" in capsys.readouterr().out
    assert FakeApi.calls[0][:2] == ("create_repo", "my-org/moco-r18")
    assert FakeApi.calls[1] == ("upload_folder", "my-org/moco-r18", ["README.md", "config.json", "model.safetensors"])
    assert "hf-hub:my-org/moco-r18" in (tmp_path / "hub" / "README.md").read_text()


def test_push_failure_is_exit_2(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail = [], ConnectionError("Name or service not known")
    path = _saved(tmp_path / "src", "resnet18")
    code = main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "hub"),
                 "--push", "my-org/x"])
    err = capsys.readouterr().err
    assert code == 2 and "upload to the Hugging Face Hub failed (ConnectionError" in err and "Traceback" not in err
    assert (tmp_path / "hub" / "model.safetensors").is_file()  # the folder is kept for a later upload


@pytest.mark.parametrize("args,expect", [
    (["--push", "noslash"], "--push 'noslash': expected ORG/NAME"),
    (["--push", "a/b/c"], "expected ORG/NAME"),
    (["--push", "../etc"], "expected ORG/NAME"),
    (["--license", "Apache 2.0"], "--license 'Apache 2.0': expected a Hub license identifier"),
    (["--license", ""], "expected a Hub license identifier"),
])
def test_hostile_hub_flags(tmp_path, capsys, args, expect):
    path = _saved(tmp_path / "src", "resnet18")
    code = main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "hub"), *args])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    assert not (tmp_path / "hub").exists()  # refused before anything is written


def test_hostile_hub_outputs(tmp_path, capsys):
    path = _saved(tmp_path / "src", "resnet18")
    (tmp_path / "afile").write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for out, expect in [(tmp_path / "afile", "is a file"), (busy, "holds other files (notes.txt)"),
                        (tmp_path / "src", "holds other files")]:
        code = main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and expect in err and "Traceback" not in err, (out, err)
    assert (busy / "notes.txt").read_text() == "mine"
    # an earlier hf-hub export may be replaced
    assert main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "h")]) == 0
    assert main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "h")]) == 0


def test_hub_refuses_run_dir_and_3d(tmp_path, capsys, run_with_eval):
    run, _ = run_with_eval
    assert main(["export", "--run", str(run), "--format", "hf-hub", "--out", str(run)]) == 2
    assert "is the run directory itself" in capsys.readouterr().err
    path = _saved(tmp_path / "src3d", "resnet10_3d", image_size=16, spatial_dims=3)
    assert main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "h3")]) == 2
    err = capsys.readouterr().err
    assert "3D encoder and timm has no 3D models" in err and "--format onnx" in err


def test_offline_push_without_mock_fails_clearly(tmp_path, capsys):
    """The real huggingface_hub, no network and no token here (nor in CI): one line, exit 2."""
    path = _saved(tmp_path / "src", "resnet18")
    code = main(["export", "--checkpoint", str(path), "--format", "hf-hub", "--out", str(tmp_path / "hub"),
                 "--push", "medssl-none/none"])
    err = capsys.readouterr().err
    assert code == 2 and "--push medssl-none/none: upload to the Hugging Face Hub failed" in err
    assert "Traceback" not in err
    shutil.rmtree(tmp_path / "hub")
