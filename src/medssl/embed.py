"""``medssl embed``: an encoder's features of a dataset as ``features.npy`` + ``index.csv``, for users who bring
their own classifier.

``features.npy`` is float32 ``(N, D)``; row ``i`` belongs to line ``i`` of ``index.csv`` (``row, index, source,
label, label_name, patient_id, split``; ``index`` is the dataset position). With ``plot=True`` a 2D projection
(``projection.png``: PCA, or UMAP when ``umap-learn`` is installed) coloured by label is drawn too.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medssl.errors import ConfigError

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


def _label_text(ds: Any, i: int) -> tuple[str, str]:
    if ds.labels is None:
        return "", ""
    if ds.multilabel:
        on = [k for k, v in enumerate(ds.labels[i]) if v]
        return ";".join(str(k) for k in on), ";".join(ds.class_names[k] for k in on)
    k = int(ds.labels[i])
    return str(k), ds.class_names[k]


def _pick_encoder(data: str, *, run: str | Path | None, checkpoint: str | Path | None, init: str | None,
                  encoder: str | None, backbone: str | None, image_size: int | None, task: str | None):
    from medssl.api import _checkpoint_encoders, _init_encoders, _run_encoders
    from medssl.config import DataConfig, build_dataclass
    from medssl.data.specs import open_from_config

    if sum(x is not None for x in (run, checkpoint, init)) != 1:
        raise ConfigError("embed needs exactly one of --run DIR, --checkpoint FILE or --init random|imagenet")
    run_cfg: dict[str, Any] = {}
    found: list[tuple[str, Any]] = []
    if run is not None:
        found, run_cfg = _run_encoders(Path(run), encoder)
    elif checkpoint is not None:
        found = _checkpoint_encoders(Path(checkpoint))
        if encoder is not None:
            found = [(n, e) for n, e in found if n.endswith(f":{encoder}")] or found
    data_cfg = run_cfg.get("data", {}) or {}
    section = {k: v for k, v in data_cfg.items() if k in ("intensity", "cache", "cache_dir")}
    dcfg = build_dataclass(DataConfig, {**section, "spec": data, "image_size": image_size or data_cfg.get("image_size"),
                                        "task": task}, where="data")
    ds = open_from_config(dcfg)
    if init is not None:
        model_cfg = run_cfg.get("model", {}) or {}
        found, skipped = _init_encoders([init], ds, backbone or "resnet18", "default", model_cfg)
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
) -> dict[str, Any]:
    """Write the features of every image of ``data`` (or of one ``split``) to ``out``.

    Args:
        data: data spec.
        out: output directory (``features.npy``, ``index.csv``, ``embed.yaml``, ``projection.png``).
        run / checkpoint / init: where the encoder comes from (exactly one).
        encoder: which encoder of a multi-encoder run.
        split: ``train`` / ``val`` / ``test``; ``None`` = all items.
        plot: draw the 2D projection coloured by label.

    Returns:
        ``{"encoder", "features", "index", "plot", "shape"}``.
    """
    import torch

    from medssl.eval.features import extract_features

    (label, enc), ds, _ = _pick_encoder(data, run=run, checkpoint=checkpoint, init=init, encoder=encoder,
                                        backbone=backbone, image_size=image_size, task=task)
    if split is not None and split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split}: expected train, val or test")
    idx = np.arange(len(ds)) if split is None else np.asarray(ds.indices(split), dtype=np.int64)
    if idx.size == 0:
        raise ConfigError(f"data {data}: no items{'' if split is None else f' in split {split}'}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    feats = extract_features(enc, ds, idx, batch_size=batch_size, device=dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", feats.astype(np.float32, copy=False))
    names: list[str] = []
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "index", "source", "label", "label_name", "patient_id", "split"])
        for row, i in enumerate(idx.tolist()):
            lab, name = _label_text(ds, i)
            names.append(name)
            w.writerow([row, i, ds.sources[i], lab, name, ds.patient_ids[i], ds.splits[i]])
    info = {"encoder": label, "data": data, "task": ds.task, "split": split or "all", "n": int(feats.shape[0]),
            "dim": int(feats.shape[1]), "run": str(run) if run else None,
            "checkpoint": str(checkpoint) if checkpoint else None, "init": init}
    (out / "embed.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    plot_path = None
    if plot:
        coords, how = project_2d(feats)
        plot_path = plot_projection(coords, names, out / PROJECTION_PLOT,
                                    f"{label} on {data}: {how} of {feats.shape[1]}-d features")
    return {"encoder": label, "features": out / "features.npy", "index": out / "index.csv", "plot": plot_path,
            "shape": tuple(feats.shape)}
