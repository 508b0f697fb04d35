"""``medssl embed``: an encoder's features of a dataset as ``features.npy`` + ``index.csv``, for users who bring
their own classifier.

``features.npy`` is float32 ``(N, D)``; row ``i`` belongs to line ``i`` of ``index.csv`` (``row, index, source,
label, label_name, patient_id, split``; ``index`` is the dataset position). With ``plot=True`` a 2D projection
(``projection.png``: PCA, or UMAP when ``umap-learn`` is installed) coloured by label is drawn too.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from medssl.data.splits import SPLIT_NAMES
from medssl.errors import ConfigError
from medssl.fileio import atomic_write, atomic_write_text, ensure_output_dir

if TYPE_CHECKING:
    from medssl.encoders import NamedEncoder

PROJECTION_PLOT = "projection.png"


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal-component scores of ``x`` (rows = samples), via the SVD of the centred data."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    scores = u[:, :2] * s[:2]
    if scores.shape[1] < 2:
        scores = np.pad(scores, ((0, 0), (0, 2 - scores.shape[1])))
    return scores


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP when ``umap-learn`` is installed (and there are enough points), else PCA; returns (coords, name)."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        return pca_2d(x), "PCA"
    if x.shape[0] < 10:
        return pca_2d(x), "PCA"
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"


def plot_projection(coords: np.ndarray, labels: list[str], path: str | Path, title: str) -> Path:
    """Scatter plot of 2D coordinates coloured by label (matplotlib Agg canvas); writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in dict.fromkeys(labels):
        sel = np.array([lab == name for lab in labels])
        ax.scatter(coords[sel, 0], coords[sel, 1], s=8, alpha=0.7, label=name or "(unlabelled)")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(set(labels)) <= 20:
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _index_csv(ds: Any, idx: np.ndarray) -> str:
    """``index.csv``: one line per embedded item (row, dataset index, source, label, label name, patient, split)."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["row", "index", "source", "label", "label_name", "patient_id", "split"])
    for row, i in enumerate(idx.tolist()):
        lab, name = _label_text(ds, i)
        w.writerow([row, i, ds.sources[i], lab, name, ds.patient_ids[i], ds.splits[i]])
    return f.getvalue()


def _label_text(ds: Any, i: int) -> tuple[str, str]:
    if ds.labels is None:
        return "", ""
    if ds.multilabel:
        on = [k for k, v in enumerate(ds.labels[i]) if v]
        return ";".join(str(k) for k in on), ";".join(ds.class_names[k] for k in on)
    k = int(ds.labels[i])
    return str(k), ds.class_names[k]


def _pick_encoder(data: str, *, run: str | Path | None, checkpoint: str | Path | None, init: str | None,
                  encoder: str | None, backbone: str | None, image_size: int | None,
                  task: str | None) -> tuple[NamedEncoder, Any, dict[str, Any]]:
    """The one encoder to embed with, the dataset and the run's config mapping."""
    from medssl.data.specs import open_from_config
    from medssl.encoders import check_inits, data_config, init_encoders, source_encoders

    if sum(x is not None for x in (run, checkpoint, init)) != 1:
        raise ConfigError("embed needs exactly one of --run DIR, --checkpoint FILE or --init random|imagenet")
    if init is not None:
        check_inits([init])
    found, run_cfg = source_encoders(run, checkpoint, encoder)
    ds = open_from_config(data_config(data, run_cfg, image_size=image_size, task=task))
    if init is not None:
        found, skipped = init_encoders([init], ds, backbone or "resnet18", "default", {})
        if not found:
            raise ConfigError("; ".join(skipped))
    if len(found) > 1:
        raise ConfigError(f"several encoders ({', '.join(n for n, _ in found)}); choose one with --encoder NAME")
    return found[0], ds, run_cfg


def embed(
    data: str,
    out: str | Path,
    *,
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    init: str | None = None,
    encoder: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    task: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    plot: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the features of every image of ``data`` (or of one ``split``) to ``out``.

    Args:
        data: data spec.
        out: output directory (``features.npy``, ``index.csv``, ``embed.yaml``, ``projection.png``).
        run / checkpoint / init: where the encoder comes from (exactly one).
        encoder: which encoder of a multi-encoder run.
        split: ``train`` / ``val`` / ``test``; ``None`` = all items.
        plot: draw the 2D projection coloured by label.
        progress: a progress bar with ETA on a terminal, plain lines otherwise (stderr).

    Returns:
        ``{"encoder", "features", "index", "plot", "shape"}``.

    Raises:
        ConfigError: not exactly one source, an unknown split / encoder / device, or several encoders and none
            chosen. CheckpointError, DataError, StorageError: an unreadable source or dataset, or an ``out`` that
            cannot be a directory.
    """
    from medssl.encoders import resolve_device
    from medssl.eval.features import extract_features

    if split is not None and split not in SPLIT_NAMES:
        raise ConfigError(f"--split {split}: expected train, val or test")
    dev = resolve_device(device)
    out = ensure_output_dir(out)
    (label, enc), ds, _ = _pick_encoder(data, run=run, checkpoint=checkpoint, init=init, encoder=encoder,
                                        backbone=backbone, image_size=image_size, task=task)
    idx = np.arange(len(ds)) if split is None else np.asarray(ds.indices(split), dtype=np.int64)
    if idx.size == 0:
        raise ConfigError(f"data {data}: no items{'' if split is None else f' in split {split}'}")
    feats = extract_features(enc, ds, idx, batch_size=batch_size, device=dev,
                             progress=f"embed {label}" if progress else False)
    atomic_write(out / "features.npy", lambda f: np.save(f, feats.astype(np.float32, copy=False)))
    names = [_label_text(ds, i)[1] for i in idx.tolist()]
    atomic_write_text(out / "index.csv", _index_csv(ds, idx))
    info = {"encoder": label, "data": data, "task": ds.task, "split": split or "all", "n": int(feats.shape[0]),
            "dim": int(feats.shape[1]), "run": str(run) if run else None,
            "checkpoint": str(checkpoint) if checkpoint else None, "init": init}
    atomic_write_text(out / "embed.yaml", yaml.safe_dump(info, sort_keys=False))
    plot_path = None
    if plot:
        coords, how = project_2d(feats)
        plot_path = plot_projection(coords, names, out / PROJECTION_PLOT,
                                    f"{label} on {data}: {how} of {feats.shape[1]}-d features")
    return {"encoder": label, "features": out / "features.npy", "index": out / "index.csv", "plot": plot_path,
            "shape": tuple(feats.shape)}
