"""Aggregate evaluation rows over seeds and write ``results.json`` / ``results.md``.

A *row* is one (encoder, protocol, label fraction, seed) result as produced by
:func:`medssl.eval.protocol.run_protocol`. :func:`summarize` groups rows by (encoder, protocol, fraction)
and reports mean and standard deviation over seeds of every metric, ignoring ``NaN`` values (a metric that
was undefined for some seed, e.g. AUC with a class missing from the test split) and counting how many seeds
were defined. JSON cannot hold ``NaN``; it is written as ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import DataError
from medssl.fileio import atomic_write_text, ensure_output_dir

METRIC_LABELS: dict[str, str] = {
    "auc_macro": "AUC",
    "ap_macro": "AP",
    "accuracy": "Acc.",
    "balanced_accuracy": "Bal. acc.",
    "f1_macro": "F1",
    "auc_micro": "AUC µ",
    "ap_micro": "AP µ",
    "sensitivity": "Sens.",
    "specificity": "Spec.",
    "dice": "Dice",
    "jaccard": "Jaccard",
}
"""Column headers of the known metrics, in display order; other metrics follow under their own names."""


def _mean_std(values: list[float]) -> dict[str, float | int]:
    """NaN-aware mean and sample std (ddof=1 for >= 2 defined values, 0 for one, NaN for none)."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[~np.isnan(arr)]
    n = int(defined.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = float(np.std(defined, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(defined)), "std": std, "n": n}


def _check_row(row: dict[str, Any], i: int) -> None:
    missing = [key for key in ("protocol", "label_fraction", "seed", "metrics") if key not in row]
    if missing:
        raise DataError(f"result row {i} lacks the key(s) {missing}: {row!r:.200}")


def summarize(rows: list[dict[str, Any]], group_key: str = "encoder") -> list[dict[str, Any]]:
    """Mean and std over seeds per (``group_key``, protocol, label fraction).

    Args:
        rows: Rows with ``protocol``, ``label_fraction``, ``seed``, ``metrics`` (name -> float) and
            optionally ``n_train`` and ``group_key`` (default ``"encoder"``).
        group_key: Row field that distinguishes compared models; rows without it form their own group.

    Returns:
        One entry per group, in order of first appearance: ``{group_key (if present), "protocol",
        "label_fraction", "n_seeds", "seeds", "n_train", "n_train_min", "n_train_max", "metrics": {name:
        {"mean", "std", "n"}}}`` where ``n`` counts the seeds with a defined (non-NaN) value and ``std``
        uses ``ddof=1`` (``0`` with a single defined value, ``NaN`` with none). A metric missing from a
        row counts as undefined for that seed.

    Raises:
        DataError: A row lacks a required key.
    """
    groups: dict[tuple[Any, str, float], list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        _check_row(row, i)
        key = (row.get(group_key), str(row["protocol"]), float(row["label_fraction"]))
        groups.setdefault(key, []).append(row)

    summary: list[dict[str, Any]] = []
    for (group, protocol, fraction), members in groups.items():
        names = list(dict.fromkeys(name for r in members for name in r["metrics"]))
        entry: dict[str, Any] = {} if group is None else {group_key: group}
        n_train = [int(r["n_train"]) for r in members if r.get("n_train") is not None]
        entry.update(
            protocol=protocol,
            label_fraction=fraction,
            n_seeds=len(members),
            seeds=sorted(int(r["seed"]) for r in members),
            n_train=(n_train[0] if len(set(n_train)) == 1 else float(np.mean(n_train))) if n_train else None,
            n_train_min=min(n_train) if n_train else None,
            n_train_max=max(n_train) if n_train else None,
            metrics={name: _mean_std([_as_float(r["metrics"].get(name)) for r in members]) for name in names},
        )
        if len(members) == 1 and members[0].get("ci"):  # one seed: its bootstrap CI is the uncertainty to show
            for name, stat in entry["metrics"].items():
                lo_hi = members[0]["ci"].get(name)
                if lo_hi is not None:
                    stat["ci"] = [_as_float(v) for v in lo_hi]
        summary.append(entry)
    return summary


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _fmt_fraction(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _fmt_cell(stat: dict[str, Any] | None, n_seeds: int) -> str:
    if stat is None or stat["n"] == 0 or stat["mean"] is None or math.isnan(stat["mean"]):
        return "n/a"
    ci = stat.get("ci")
    if n_seeds == 1 and ci is not None and not any(math.isnan(v) for v in ci):
        return f"{stat['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    if stat["n"] < n_seeds:
        text += f" ({stat['n']}/{n_seeds})"
    return text


def _escape(value: Any) -> str:
    return str(value).replace("|", "\\|")


def format_table(summary: list[dict[str, Any]], group_key: str = "encoder") -> str:
    """Render a summary as one Markdown table comparing groups (e.g. encoders) side by side.

    Rows are ordered by protocol (first appearance), label fraction (ascending), then group (first
    appearance), so the encoders of one protocol and fraction sit on adjacent lines. Each metric cell is
    ``mean ± std`` with 3 decimals; ``n/a`` when no seed had a defined value, and ``(n/m)`` appended when
    only ``n`` of ``m`` seeds did.

    Args:
        summary: Output of :func:`summarize`.
        group_key: Field naming the compared models; its column is shown when any entry has it.

    Returns:
        The Markdown table (ending with a newline), or a one-line note for an empty summary.
    """
    if not summary:
        return "_No results._\n"
    show_group = any(group_key in s for s in summary)
    names = list(dict.fromkeys(n for s in summary for n in s["metrics"]))
    metric_cols = [m for m in METRIC_LABELS if m in names] + [m for m in names if m not in METRIC_LABELS]

    protocol_order = {p: i for i, p in enumerate(dict.fromkeys(s["protocol"] for s in summary))}
    group_order = {g: i for i, g in enumerate(dict.fromkeys(str(s.get(group_key, "")) for s in summary))}
    ordered = sorted(
        summary,
        key=lambda s: (
            protocol_order[s["protocol"]],
            s["label_fraction"],
            group_order[str(s.get(group_key, ""))],
        ),
    )

    header = (
        ([group_key.replace("_", " ").capitalize()] if show_group else [])
        + ["Protocol", "Labels", "n_train", "Seeds"]
        + [METRIC_LABELS.get(m, m) for m in metric_cols]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in ordered:
        if s.get("n_train_min") is not None and s["n_train_min"] != s["n_train_max"]:
            n_train = f"{s['n_train_min']}–{s['n_train_max']}"
        else:
            n_train = "" if s.get("n_train") is None else str(s["n_train"])
        cells = (
            ([_escape(s.get(group_key, ""))] if show_group else [])
            + [
                _escape(s["protocol"]),
                _fmt_fraction(s["label_fraction"]),
                n_train,
                ", ".join(str(seed) for seed in s["seeds"]),
            ]
            + [_fmt_cell(s["metrics"].get(m), s["n_seeds"]) for m in metric_cols]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_jsonable(obj: Any) -> Any:
    """Convert NumPy scalars/arrays, tuples and paths to JSON types, and non-finite floats to ``None``.

    Args:
        obj: A nested structure of dicts, lists and scalars.

    Returns:
        A structure ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _notes_section(rows: Iterable[dict[str, Any]], group_key: str) -> list[str]:
    counts: dict[str, int] = {}
    for row in rows:
        prefix = f"{row[group_key]} / " if group_key in row else ""
        where = f"{prefix}{row['protocol']} {_fmt_fraction(float(row['label_fraction']))}"
        for note in row.get("notes", []):
            key = f"{where}: {note}"
            counts[key] = counts.get(key, 0) + 1
    return [f"- {text}" + (f" (×{n} seeds)" if n > 1 else "") for text, n in counts.items()]


def write_results(
    rows: list[dict[str, Any]],
    out_dir: Path,
    *,
    meta: dict[str, Any] | None = None,
    group_key: str = "encoder",
) -> None:
    """Write ``results.json``, ``results.md`` and ``results.csv`` to ``out_dir`` (created if needed).

    ``results.json`` is ``{"meta": meta, "rows": rows, "summary": summarize(rows)}`` with ``NaN`` written as
    ``null``. ``results.md`` holds the :func:`format_table` of the summary, the scalar ``meta`` entries and
    the distinct notes of the rows; ``results.csv`` is :func:`results_csv`. All files are written atomically.

    Args:
        rows: Per-seed rows (see :func:`summarize`).
        out_dir: Output directory.
        meta: Free-form run information (encoder checkpoint, dataset, protocol options, ...).
        group_key: Row field naming the compared models.

    Raises:
        DataError: A row lacks a required key.
        StorageError: ``out_dir`` cannot be a directory, or the disk refused a write.
    """
    out_dir = ensure_output_dir(out_dir, "results directory")
    summary = summarize(rows, group_key=group_key)
    payload = to_jsonable({"meta": meta, "rows": rows, "summary": summary})
    atomic_write_text(out_dir / "results.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")

    lines = ["# Evaluation results", ""]
    scalars = {k: v for k, v in (meta or {}).items() if isinstance(v, str | int | float | bool) or v is None}
    if scalars:
        lines += [f"- **{k}**: {v}" for k, v in scalars.items()] + [""]
    lines += [format_table(summary, group_key=group_key).rstrip("\n"), ""]
    lines.append("Metrics are mean ± std (ddof=1) over seeds; `(n/m)`: defined for n of m seeds; with a single "
                 "seed, `value [lo, hi]` is the bootstrap 95 % CI on the test split (per-seed CIs are in "
                 "results.json / results.csv).")
    notes = _notes_section(rows, group_key)
    if notes:
        lines += ["", "## Notes", "", *notes]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "results.csv", results_csv(rows, group_key=group_key))


CSV_COLUMNS = ("protocol", "label_fraction", "seed", "n_train", "metric", "value", "ci_low", "ci_high")
"""Columns of ``results.csv`` after the group column (``encoder``)."""


def results_csv(rows: list[dict[str, Any]], group_key: str = "encoder") -> str:
    """Rows in long form: one CSV line per (encoder, protocol, fraction, seed, metric).

    Metrics are the row's ``metrics`` (with their bootstrap CI where the row has one) followed by its
    per-class values, named ``<metric>[<class>]`` (e.g. ``auc[spiculated]``, ``dice[lesion]``). Undefined
    values are empty cells.
    """
    import csv
    import io

    def cell(value: Any) -> str:
        f = _as_float(value)
        return "" if math.isnan(f) else repr(f)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([group_key, *CSV_COLUMNS])
    for i, row in enumerate(rows):
        _check_row(row, i)
        head = [row.get(group_key, ""), row["protocol"], row["label_fraction"], row["seed"], row.get("n_train", "")]
        ci = row.get("ci") or {}
        for name, value in row["metrics"].items():
            lo, hi = ci.get(name, (None, None))
            writer.writerow([*head, name, cell(value), cell(lo), cell(hi)])
        for kind, values in (row.get("per_class") or {}).items():
            for cls, value in values.items():
                writer.writerow([*head, f"{kind}[{cls}]", cell(value), "", ""])
    return buf.getvalue()
