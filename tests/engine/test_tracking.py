"""TensorBoard events beside metrics.csv (read back with tensorboard's EventAccumulator), the ``log`` config section
and its hostile values, and the clear error for a tracking backend that is not installed."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # a medssl dependency

from medssl.api import pretrain
from medssl.cli import main
from medssl.config import LogConfig, build_config
from medssl.errors import ConfigError


def _events(run):
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    return pretrain("mocov2", "phantom2d:32", out, image_size=32, batch_size=8, max_steps=4, progress=False,
                    overrides=["train.log_every_n_steps=1", "train.collapse_every_n_steps=2"])


def test_scalars_match_metrics_csv(moco_run):
    files = sorted(p.name for p in moco_run.glob("events.out.tfevents*"))
    assert len(files) == 1, files  # beside metrics.csv, not in a version_N sub-folder
    with (moco_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    acc = _events(moco_run)
    tags = set(acc.Tags()["scalars"])
    for column in ("loss", "lr", "images_per_s", "backbone_eff_rank", "projector_std"):
        assert column in tags
        expect = [(int(r["step"]), float(r[column])) for r in rows if r[column] != ""]
        got = [(e.step, e.value) for e in acc.Scalars(column)]
        assert [s for s, _ in got] == [s for s, _ in expect]
        # metrics.csv rounds to 6 significant digits; the events hold float32
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expect], rtol=1e-5, atol=1e-7)
    # collapse columns exist only on collapse steps (2 and 4): empty cells are not logged as zeros
    assert [e.step for e in acc.Scalars("backbone_eff_rank")] == [2, 4]
    assert "config" in " ".join(acc.Tags()["tensors"])  # the resolved config as text


def test_collapse_spectrum_images(moco_run):
    acc = _events(moco_run)
    tags = acc.Tags()["images"]
    assert "collapse/backbone_spectrum" in tags and "collapse/projector_spectrum" in tags
    events = acc.Images("collapse/backbone_spectrum")
    assert [e.step for e in events] == [2, 4]
    img = _decode(events[-1])
    assert img.shape == (events[-1].height, events[-1].width, 3) and img.shape[0] > 100
    assert img.std() > 0  # a drawn figure, not a blank canvas


def test_reconstruction_grids_as_images(tmp_path):
    run = pretrain("mae", "phantom2d:32", tmp_path / "mae", image_size=32, batch_size=8, max_steps=2, progress=False,
                   overrides=["model.backbone=vit_tiny_patch16_224", "model.patch_size=8", "method.decoder_dim=32",
                              "method.decoder_depth=1", "method.decoder_heads=2", "train.visualize_every_n_steps=1",
                              "train.collapse_every_n_steps=0"])
    pngs = sorted((run / "reconstructions").glob("step_*.png"))
    assert [p.name for p in pngs] == ["step_000001.png", "step_000002.png"]
    events = _events(run).Images("reconstructions")
    assert [e.step for e in events] == [1, 2]
    written = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    np.testing.assert_array_equal(_decode(events[-1]), written)  # the same picture as the run's PNG


def test_csv_only_writes_no_events(tmp_path):
    run = pretrain("mocov2", "phantom2d:32", tmp_path / "csv", image_size=32, batch_size=8, max_steps=1,
                   progress=False, overrides=["log.backends=[csv]"])
    assert (run / "metrics.csv").is_file()
    assert not list(run.glob("events.out.tfevents*"))


def test_log_section_values():
    cfg = build_config({"log": {"backends": "csv,tensorboard"}})
    assert cfg.log.backends == ("csv", "tensorboard")
    assert build_config({}).log == LogConfig()
    for bad, expect in [
        ({"backends": ["csv", "comet"]}, "log.backends[1] must be one of csv, tensorboard, wandb, mlflow"),
        ({"backends": ["tensorboard"]}, "log.backends must include csv"),
        ({"backends": ["csv", "csv"]}, "log.backends lists a backend twice"),
        ({"backends": [1]}, "log.backends"),
        ({"project": " "}, "log.project must be a non-empty name"),
        ({"backend": ["csv"]}, "did you mean 'backends'"),
    ]:
        with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("]", r"\]")):
            build_config({"log": bad})


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard"])
def test_missing_backend_is_a_clear_exit_2(tmp_path, capsys, monkeypatch, backend):
    import medssl.engine.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda package: False)
    out = tmp_path / "run"
    code = main(["pretrain", "--method", "mocov2", "--data", "phantom2d:32", "--image-size", "32", "--max-steps", "1",
                 "--out", str(out), "--quiet", "--set", f"log.backends=[csv,{backend}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"log.backends: {backend} is not installed" in err and f"medssl[{backend}]" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before the run directory is created


def test_bad_backend_from_the_command_line(tmp_path, capsys):
    code = main(["pretrain", "--method", "mocov2", "--data", "phantom2d:32", "--max-steps", "1", "--out",
                 str(tmp_path / "r"), "--quiet", "--set", "log.backends=[csv,neptune]"])
    assert code == 2
    assert "log.backends[1] must be one of" in capsys.readouterr().err


def test_resume_purges_events_after_the_resumed_step(tmp_path):
    """A run that died after its step-2 checkpoint had logged steps 3 and 4: resuming from step 2 replaces them
    (TensorBoard's purge_step), as metrics.csv is truncated -- no step appears twice."""
    import shutil

    out = tmp_path / "run"
    args = dict(image_size=32, batch_size=8, progress=False)
    sets = ["train.log_every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last_k=2",
            "train.collapse_every_n_steps=0"]
    pretrain("mocov2", "phantom2d:32", out, max_steps=4, overrides=sets, **args)
    shutil.copyfile(out / "checkpoints" / "step_0000002.ckpt", out / "checkpoints" / "last.ckpt")  # "died" after 2
    pretrain(out=out, resume=True, **args)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    got = [(e.step, e.value) for e in _events(out).Scalars("loss")]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in got], [float(r["loss"]) for r in rows], rtol=1e-5)


class _FakeLogger:
    """Records the calls medssl makes on Lightning's WandbLogger / MLFlowLogger (their packages are not installed in
    CI; their own logging is Lightning's, tested there)."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.run_id = "run-1"
        self.experiment = self

    def log_hyperparams(self, params):
        self.calls.append(("hparams", params))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", dict(metrics), step))

    def log_image(self, key, images, step=None):
        self.calls.append(("image", key, images, step))

    def log_artifact(self, run_id, path, artifact_path=None):
        self.calls.append(("artifact", run_id, path, artifact_path))

    def finalize(self, status):
        self.calls.append(("finalize", status))


def test_wandb_and_mlflow_wiring(tmp_path, monkeypatch):
    import lightning.pytorch.loggers as pl_loggers
    import torch

    import medssl.engine.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda package: True)
    monkeypatch.setattr(pl_loggers, "WandbLogger", _FakeLogger)
    monkeypatch.setattr(pl_loggers, "MLFlowLogger", _FakeLogger)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = tracking.Trackers(["csv", "wandb", "mlflow"], tmp_path, project="proj")
    wandb, mlflow = tr.loggers["wandb"], tr.loggers["mlflow"]
    assert wandb.kwargs == {"name": tmp_path.name, "save_dir": str(tmp_path), "project": "proj"}
    assert mlflow.kwargs["experiment_name"] == "proj" and mlflow.kwargs["tracking_uri"].startswith("file:")
    tr.log_metrics({"step": 3, "epoch": 0, "loss": "1.5", "backbone_eff_rank": "", "note": "x"}, 3)
    assert ("metrics", {"epoch": 0.0, "loss": 1.5}, 3) in wandb.calls and ("metrics", {"epoch": 0.0, "loss": 1.5},
                                                                             3) in mlflow.calls
    tr.log_spectra({"backbone": torch.randn(12, 16)}, 3)
    kind, key, images, step = next(c for c in wandb.calls if c[0] == "image")
    assert (key, step) == ("collapse/backbone_spectrum", 3) and images[0].ndim == 3 and images[0].dtype == np.uint8
    art = next(c for c in mlflow.calls if c[0] == "artifact")
    assert art[1] == "run-1" and art[3] == "collapse/backbone_spectrum" and Path(art[2]).is_file()
    tr.close()
    assert wandb.calls[-1] == ("finalize", "success") and mlflow.calls[-1] == ("finalize", "success")
