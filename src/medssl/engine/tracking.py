"""Experiment tracking beyond ``metrics.csv``: TensorBoard, Weights & Biases and MLflow through Lightning's loggers.

``log.backends`` (:class:`medssl.config.LogConfig`) names them; ``csv`` is ``metrics.csv``
(:class:`~medssl.engine.logging.MetricsCSV`), the others are Lightning loggers driven by :class:`Trackers` on global
rank 0:

* ``tensorboard``: :class:`lightning.fabric.loggers.TensorBoardLogger` writing ``events.out.tfevents.*`` into the
  run directory itself (beside ``metrics.csv``): every numeric column of a metrics row as a scalar at its step, the
  collapse spectrum of each embedding the method reports (``collapse/<name>_spectrum``, the plot of
  :func:`medssl.eval.collapse.plot_spectra`) and the reconstruction grids (``reconstructions``) as images. On
  ``--resume`` the writer purges the events after the resumed step, like ``metrics.csv`` is truncated.
* ``wandb``: :class:`lightning.pytorch.loggers.WandbLogger` (directory ``RUN/wandb``; the project is
  ``log.project``); images through its ``log_image``.
* ``mlflow``: :class:`lightning.pytorch.loggers.MLFlowLogger` (``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI`` is
  set; the experiment is ``log.project``); images as run artifacts.

:func:`check_backends` runs before anything is written: a backend whose package is missing is a
:class:`~medssl.errors.ConfigError` (exit code 2) naming the package to install.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import ConfigError

log = logging.getLogger("medssl")

#: backend -> (the Python packages it needs (any one of them), what to install)
BACKEND_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'medssl[tensorboard]' (or tensorboard)"),
    "wandb": (("wandb",), "pip install 'medssl[wandb]' (or wandb)"),
    "mlflow": (("mlflow",), "pip install 'medssl[mlflow]' (or mlflow)"),
}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_backends(backends: Sequence[str]) -> None:
    """Refuse backends whose package is not installed (before a run directory is touched).

    Raises:
        ConfigError: naming the backend, the missing package and the two ways out.
    """
    for name in backends:
        if name not in BACKEND_PACKAGES:
            continue
        packages, install = BACKEND_PACKAGES[name]
        if not any(_installed(p) for p in packages):
            others = [b for b in backends if b != name]
            raise ConfigError(
                f"log.backends: {name} is not installed (no module {' / '.join(packages)}); {install}, or drop it: "
                f"--set log.backends=[{','.join(others)}]"
            )


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics row (``step`` excluded; empty collapse cells skipped)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[key] = v
    return out


def png_to_array(data: bytes | str | Path) -> np.ndarray:
    """A PNG (bytes or file) as an ``(H, W, 3)`` uint8 array."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        return np.asarray(img.convert("RGB"))


def spectrum_png(name: str, spectrum: np.ndarray, step: int) -> bytes:
    """The collapse spectrum of one embedding matrix as a PNG (:func:`medssl.eval.collapse.plot_spectra`)."""
    import tempfile

    from medssl.eval.collapse import plot_spectra

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_spectra({name: spectrum}, Path(tmp) / "spectrum.png", title=f"{name} spectrum, step {step}")
        return path.read_bytes()


def _make_logger(name: str, root: Path, project: str, resume_step: int | None) -> Any:
    if name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
        return TensorBoardLogger(root_dir=str(root), name="", version="", **kwargs)
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(name=root.name, save_dir=str(root), project=project)
    if name == "mlflow":
        import os

        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=project, run_name=root.name, save_dir=str(root / "mlruns"),
                            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").as_uri())
    raise ConfigError(f"log.backends: unknown backend {name!r}")


class Trackers:
    """The run's Lightning loggers other than ``metrics.csv`` (global rank 0 only).

    Args:
        backends: ``log.backends`` (``csv`` is skipped: :class:`~medssl.engine.logging.MetricsCSV` writes it).
        root: the run directory.
        project: ``log.project``.
        resume_step: the step a resumed run continues from (TensorBoard purges later events), else ``None``.
    """

    def __init__(self, backends: Sequence[str], root: str | Path, *, project: str = "medssl",
                 resume_step: int | None = None) -> None:
        check_backends(backends)
        self.root = Path(root)
        self.loggers: dict[str, Any] = {
            name: _make_logger(name, self.root, project, resume_step) for name in backends if name != "csv"}

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """The resolved config (flattened by the loggers)."""
        for name, logger in self.loggers.items():
            if name == "tensorboard":  # hparams would add a second event file; the config goes in as text
                import yaml

                text = yaml.safe_dump(dict(params), sort_keys=False)
                logger.experiment.add_text("config", "```\n" + text + "\n```", 0)
            else:
                logger.log_hyperparams(dict(params))

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        """One metrics row: each finite number as a scalar at ``step``."""
        scalars = _scalars(row)
        if scalars:
            for logger in self.loggers.values():
                logger.log_metrics(scalars, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int, path: Path | None = None) -> None:
        """An ``(H, W, 3)`` uint8 image (``path``: the same image as a file, for MLflow's artifacts)."""
        for name, logger in self.loggers.items():
            if name == "tensorboard":
                logger.experiment.add_image(tag, image, step, dataformats="HWC")
            elif name == "wandb":
                logger.log_image(key=tag, images=[image], step=step)
            elif name == "mlflow" and path is not None:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=tag)

    def log_spectra(self, embeddings: Mapping[str, Any], step: int) -> None:
        """The collapse spectrum of each (gathered) embedding matrix, as an image ``collapse/<name>_spectrum``."""
        if not self.loggers:
            return
        from medssl.eval.collapse import covariance_spectrum

        for name, z in embeddings.items():
            try:
                png = spectrum_png(name, covariance_spectrum(z.float()), step)
            except Exception as e:  # a figure must not cost a run
                log.warning("step %d: collapse spectrum figure of %s failed (%s: %s)", step, name, type(e).__name__, e)
                continue
            path = None
            if "mlflow" in self.loggers:
                path = self.root / "collapse" / f"{name}_spectrum_step_{step:06d}.png"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(png)
            self.log_image(f"collapse/{name}_spectrum", png_to_array(png), step, path)

    def log_image_file(self, tag: str, path: Path, step: int) -> None:
        """A PNG the run wrote (a reconstruction grid)."""
        if self.loggers:
            self.log_image(tag, png_to_array(path), step, path)

    def close(self, status: str = "success") -> None:
        """Flush and close every logger."""
        for logger in self.loggers.values():
            logger.finalize(status)
