"""``medssl report``: one self-contained HTML page per run (or several runs side by side).

Every picture is inlined as ``data:image/png;base64``; the page loads nothing (no scripts, no remote style
sheets, no fonts), so it can be mailed or archived as one file. Sections, each with one column per run:

1. **Configuration** -- the run's resolved ``config.yaml``.
2. **Training curves** -- loss and learning rate from ``metrics.csv``.
3. **Collapse** -- effective rank and std of the embeddings over training (the ``*_eff_rank`` / ``*_std``
   columns of ``metrics.csv``) and the covariance spectrum (``collapse_spectrum.png``) of any collapse
   evaluation found.
4. **Reconstructions** -- the newest PNGs of ``RUN/reconstructions/`` (and ``RUN/visuals/``) of masked methods.
5. **Evaluation** -- the results table (mean ± std over seeds) per label fraction of every evaluation found:
   ``results.json`` under ``RUN/eval*`` or in a directory given with ``--eval``.
6. **ROC / PR curves** -- drawn from test predictions an evaluation saved as ``predictions*.npz`` (arrays
   ``y_true`` ``(n,)`` or ``(n, K)``, ``scores`` ``(n, K)`` or ``(n,)``; optional ``encoder``, ``label_fraction``,
   ``seed``, ``class_names``); the page says so where an evaluation has none.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import CheckpointError, ConfigError
from medssl.fileio import atomic_write_text, check_output_file

MAX_RECONSTRUCTIONS = 3
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
h3 { font-size: 1em; margin: .3em 0; color: #444; } h4 { font-size: .95em; margin: .8em 0 .3em; }
.cols { display: grid; gap: 1.2em; } .col { min-width: 0; overflow-x: auto; }
img { max-width: 100%; height: auto; } pre { background: #f6f6f6; padding: .6em; font-size: .8em; overflow: auto;
max-height: 28em; } table { border-collapse: collapse; font-size: .85em; margin-bottom: .8em; }
td, th { border: 1px solid #ccc; padding: .2em .5em; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; } .note { color: #666; font-size: .85em; }
.warn { color: #b00000; border: 2px solid #b00000; padding: .4em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a base64 data URI."""
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def find_eval_dirs(run: Path) -> list[Path]:
    """Evaluation output folders under ``run/eval*`` (the outermost folder holding a ``results.json``)."""
    found: list[Path] = []
    for top in sorted(p for p in run.glob("eval*") if p.is_dir()):
        for res in sorted(top.rglob("results.json")):
            d = res.parent
            if not any(parent in found for parent in d.parents):
                found.append(d)
    return found


def _config_section(run: Path) -> str:
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return _note("no config.yaml in this run directory")
    return f"<pre>{_esc(cfg.read_text(encoding='utf-8'))}</pre>"


def _curves_section(cols: dict[str, np.ndarray]) -> str:
    from medssl.report.plots import line_plot

    if not cols or "step" not in cols:
        return _note("no metrics.csv rows")
    step = cols["step"]
    parts = []
    losses = {k: v for k, v in cols.items() if k == "loss" or k.startswith("loss_") or k.endswith("_loss")}
    png = line_plot(step, losses, title="training loss", ylabel="loss")
    parts.append(img_tag(png, "training loss") if png else _note("no loss values in metrics.csv"))
    if "lr" in cols:
        png = line_plot(step, {"lr": cols["lr"]}, title="learning rate", ylabel="lr")
        if png:
            parts.append(img_tag(png, "learning rate"))
    if len(step) < 3:
        parts.append(_note(f"metrics.csv has {len(step)} logged step(s); curves need a longer run to show a trend"))
    return "\n".join(parts)


def _collapse_section(cols: dict[str, np.ndarray], eval_dirs: Sequence[Path]) -> str:
    from medssl.report.plots import line_plot

    parts = []
    alarm = cols.get("collapse_alarm") if cols else None
    if alarm is not None and "step" in cols:
        fired = [int(st) for st, a in zip(cols["step"], alarm, strict=False) if np.isfinite(a) and a >= 1]
        if fired:
            parts.append(f'<p class="warn"><b>COLLAPSE ALARM</b>: the projector embeddings collapsed (effective '
                         f"rank or std below the train.collapse_alarm_* thresholds for several diagnostics in a row) "
                         f"at step {fired[0]}" + (f" and {len(fired) - 1} later diagnostic(s)" if len(fired) > 1
                                                  else "") + ". Likely causes: lr too high for the batch, "
                         "augmentation too strong for the image size, batch or queue too small.</p>")
    if cols and "step" in cols:
        ranks = {k.removesuffix("_eff_rank"): v for k, v in cols.items() if k.endswith("_eff_rank")}
        ranks.update({k.removesuffix("_eff_rank_l2") + " (L2-normalised)": v for k, v in cols.items()
                      if k.endswith("_eff_rank_l2")})
        stds = {k.removesuffix("_std"): v for k, v in cols.items() if k.endswith("_std") and k != "embedding_std"}
        png = line_plot(cols["step"], ranks, title="effective rank of the embeddings", ylabel="effective rank")
        if png:
            parts.append(img_tag(png, "effective rank over training"))
        png = line_plot(cols["step"], stds, title="std of the L2-normalised embeddings × √d", ylabel="std")
        if png:
            parts.append(img_tag(png, "embedding std over training"))
    for d in eval_dirs:
        spec = d / "collapse_spectrum.png"
        if spec.is_file():
            parts.append(f"<h4>covariance spectrum ({_esc(d.name)})</h4>"
                         + img_tag(spec.read_bytes(), "collapse spectrum"))
    if not parts:
        return _note("no collapse statistics: metrics.csv has no *_eff_rank values and no collapse evaluation was "
                     "found (medssl evaluate --protocol collapse --out RUN/eval_collapse)")
    return "\n".join(parts)


def _reconstructions_section(run: Path) -> str:
    pngs = sorted((run / "reconstructions").glob("*.png")) + sorted((run / "visuals").glob("*.png"))
    if not pngs:
        return _note("no reconstructions (only masked image modelling methods draw them)")
    shown = pngs[-MAX_RECONSTRUCTIONS:]
    parts = [f"<h4>{_esc(p.relative_to(run))}</h4>" + img_tag(p.read_bytes(), f"reconstruction {p.stem}")
             for p in shown]
    if len(pngs) > len(shown):
        parts.insert(0, _note(f"the newest {len(shown)} of {len(pngs)} reconstruction images"))
    return "\n".join(parts)


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "n/a"
    std = stat.get("std")
    return f"{stat['mean']:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def results_tables(payload: dict[str, Any]) -> str:
    """HTML tables of a ``results.json`` summary, one per label fraction (rows: encoder × protocol)."""
    from medssl.eval.results import METRIC_LABELS

    summary = payload.get("summary") or []
    if not summary:
        return _note("no results in results.json")
    names = list(dict.fromkeys(m for s in summary for m in s.get("metrics", {})))
    metrics = [m for m in METRIC_LABELS if m in names] + [m for m in names if m not in METRIC_LABELS]
    parts = []
    for frac in sorted({float(s["label_fraction"]) for s in summary}):
        head = "".join(f"<th>{_esc(METRIC_LABELS.get(m, m))}</th>" for m in metrics)
        lines = [f"<h4>{frac * 100:g} % of the training labels</h4>",
                 f"<table><tr><th>Encoder</th><th>Protocol</th><th>n_train</th><th>Seeds</th>{head}</tr>"]
        for s in summary:
            if float(s["label_fraction"]) != frac:
                continue
            cells = "".join(f"<td>{_esc(_fmt(s['metrics'].get(m)))}</td>" for m in metrics)
            seeds = ", ".join(str(x) for x in s.get("seeds", []))
            lines.append(f"<tr><td>{_esc(s.get('encoder', ''))}</td><td>{_esc(s['protocol'])}</td>"
                         f"<td>{_esc(s.get('n_train', ''))}</td><td>{_esc(seeds)}</td>{cells}</tr>")
        parts.append("\n".join(lines) + "</table>")
    skipped = (payload.get("meta") or {}).get("skipped")
    if skipped:
        parts.append(_note(f"not evaluated: {skipped}"))
    return "\n".join(parts)


def _eval_section(eval_dirs: Sequence[Path]) -> str:
    import json

    if not eval_dirs:
        return _note("no evaluation found (results.json under RUN/eval*; or pass --eval DIR)")
    parts = []
    for d in eval_dirs:
        try:
            payload = json.loads((d / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            parts.append(_note(f"{d}: unreadable results.json ({e})"))
            continue
        meta = payload.get("meta") or {}
        desc = ", ".join(f"{k}: {meta[k]}" for k in ("data", "protocol", "protocols") if meta.get(k))
        parts.append(f"<h3>{_esc(d.name)}</h3>" + (_note(desc) if desc else "") + results_tables(payload))
    return "\n".join(parts)


def _predictions(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, list[str] | None]]:
    with np.load(path, allow_pickle=False) as z:
        if "y_true" not in z or "scores" not in z:
            raise CheckpointError(f"{path}: a predictions file needs arrays 'y_true' and 'scores'")
        bits = [f"{k} {z[k].item() if z[k].ndim == 0 else z[k]}" for k in ("encoder", "label_fraction", "seed")
                if k in z]
        names = [str(c) for c in z["class_names"]] if "class_names" in z else None
        return [(", ".join(bits) or path.stem, np.asarray(z["y_true"]), np.asarray(z["scores"]), names)]


def _first_seed_only(files: list[Path]) -> list[Path]:
    """One curve per encoder and label fraction: of ``predictions_<encoder>_<fraction>_seed<N>.npz`` files, the one
    with the smallest seed (the other seeds' files stay on disk for the user)."""
    best: dict[tuple[Path, str], tuple[int, Path]] = {}
    for f in files:
        m = re.fullmatch(r"(.*)_seed(\d+)", f.stem)
        key, seed = ((f.parent, m.group(1)), int(m.group(2))) if m else ((f.parent, f.stem), 0)
        if key not in best or seed < best[key][0]:
            best[key] = (seed, f)
    return sorted(f for _, f in best.values())


def _roc_section(eval_dirs: Sequence[Path]) -> str:
    from medssl.report.plots import roc_pr_plot

    parts = []
    for d in eval_dirs:
        files = _first_seed_only(sorted(d.rglob("predictions*.npz")))
        if not files:
            parts.append(_note(f"{d.name}: no test predictions saved (predictions*.npz); ROC / PR curves are drawn "
                               "when an evaluation saves them"))
            continue
        for f in files:
            for title, y, s, names in _predictions(f):
                parts.append(img_tag(roc_pr_plot(y, s, title=title, class_names=names), f"ROC and PR: {title}"))
    return "\n".join(parts) if parts else _note("no evaluation found")


def _run_columns(run: Path, extra_evals: Sequence[Path]) -> dict[str, str]:
    from medssl.report.plots import read_metrics_csv

    cols = read_metrics_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else {}
    evals = find_eval_dirs(run) + [d for d in extra_evals if d not in find_eval_dirs(run)]
    return {
        "Configuration": _config_section(run),
        "Training curves": _curves_section(cols),
        "Collapse": _collapse_section(cols, evals),
        "Reconstructions": _reconstructions_section(run),
        "Evaluation": _eval_section(evals),
        "ROC / PR curves": _roc_section(evals),
    }


def build_report(runs: Sequence[str | Path], out: str | Path | None = None,
                 eval_dirs: Sequence[str | Path] = ()) -> Path:
    """Write the HTML report of one or several runs; returns its path.

    Args:
        runs: run directories (several: side by side, one column each).
        out: the HTML file; default ``RUN/report.html`` for a single run (required for several).
        eval_dirs: extra evaluation output folders (with ``results.json``), shown under every run.

    Raises:
        ConfigError: no run, or several runs without ``out``.
        CheckpointError: a run or evaluation directory is missing.
        StorageError: ``out`` is a directory, under a file, or on a disk that refuses the write.
    """
    paths = [Path(r) for r in runs]
    if not paths:
        raise ConfigError("report: give at least one run directory")
    for p in paths:
        if not p.is_dir():
            raise CheckpointError(f"run directory {p}: not found")
    extra = [Path(e) for e in eval_dirs]
    for e in extra:
        if not (e / "results.json").is_file():
            raise CheckpointError(f"--eval {e}: no results.json there")
    if out is None:
        if len(paths) > 1:
            raise ConfigError("report of several runs: choose the file with --out FILE")
        out = paths[0] / "report.html"
    out = Path(out)
    from medssl.compare import run_labels

    labels = run_labels(paths)
    columns = [_run_columns(p, extra) for p in paths]
    n = len(paths)
    body = [f"<h1>medssl report: {_esc(', '.join(labels))}</h1>",
            _note(f"generated {_dt.datetime.now().isoformat(timespec='seconds')} from "
                  + "; ".join(str(p.resolve()) for p in paths))]
    for section in columns[0]:
        body.append(f"<h2>{_esc(section)}</h2>")
        body.append(f'<div class="cols" style="grid-template-columns: repeat({n}, minmax(0, 1fr))">')
        for lab, col in zip(labels, columns, strict=True):
            body.append(f'<div class="col"><h3>{_esc(lab)}</h3>\n{col[section]}\n</div>')
        body.append("</div>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>medssl report: {_esc(', '.join(labels))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    return atomic_write_text(check_output_file(out), page)
