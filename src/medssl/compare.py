"""``medssl compare``: several pretrained encoders and baselines, several protocols, one table.

Every source (each run directory, plus ``random`` / ``imagenet`` initialisations built with the first run's
backbone) is evaluated with :func:`medssl.api.evaluate` on the same dataset, splits, label fractions and
seeds, once per protocol. Encoders are named after their run directory (``<dir>`` or ``<dir>:<encoder>``
for multi-encoder runs; the parent folder is prepended where two runs share a name), baselines
``random-init`` / ``imagenet-init``. ``OUT`` receives what :func:`medssl.eval.results.write_results` writes for the
merged rows (``results.json``, ``results.md``, the long-form ``results.csv``), ``summary.csv`` (one line per encoder
× protocol × label fraction: mean and std over seeds of every metric) and one sub-folder per protocol and source
with that evaluation's own outputs (``per_source/<protocol>/<source>/``).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.errors import ConfigError
from medssl.fileio import atomic_write_text

BASELINES = ("random-init", "imagenet-init")


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Distinct, readable names for run directories: the folder name, with parents prepended on clashes."""
    paths = [Path(r).resolve() for r in runs]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p.parts[-d:]) for p, d in zip(paths, depth, strict=True)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grew = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(paths[i].parts):
                depth[i] += 1
                grew = True
        if not grew:  # the same directory twice
            return [f"{n}#{i}" if n in clashes else n for i, n in enumerate(names)]


def _relabel(label: str, run_label: str) -> str:
    if label in BASELINES or label.startswith("init:"):
        return label
    return f"{run_label}:{label.split(':', 1)[1]}" if ":" in label else run_label


def write_summary_csv(summary: list[dict[str, Any]], path: str | Path) -> Path:
    """One line per (encoder, protocol, label fraction): counts and ``<metric>_mean`` / ``<metric>_std``."""
    metrics = list(dict.fromkeys(m for s in summary for m in s["metrics"]))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["encoder", "protocol", "label_fraction", "n_train", "n_seeds", "seeds"]
               + [f"{m}_{k}" for m in metrics for k in ("mean", "std")])
    for s in summary:
        cells: list[Any] = [s.get("encoder", ""), s["protocol"], s["label_fraction"], s.get("n_train"),
                            s["n_seeds"], " ".join(str(x) for x in s["seeds"])]
        for m in metrics:
            st = s["metrics"].get(m)
            for k in ("mean", "std"):
                v = None if st is None else st[k]
                cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}")
        w.writerow(cells)
    return atomic_write_text(path, f.getvalue())


def compare(
    runs: Sequence[str | Path],
    data: str,
    out: str | Path,
    *,
    inits: Sequence[str] = (),
    protocols: Sequence[str] = ("linear",),
    label_fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate every run and baseline with every protocol; one table.

    Args:
        runs: run directories.
        data: labelled data spec.
        out: output directory.
        inits: baselines, ``random`` and/or ``imagenet`` (ImageNet is skipped with a note when offline).
        protocols: evaluation protocols (``linear``, ``knn``, ...).
        label_fractions, seeds: as in :func:`medssl.api.evaluate`.
        **options: further keyword arguments of :func:`medssl.api.evaluate` (``image_size``, ``batch_size``,
            ``device``, ``task``, ``encoder``, ``epochs`` where the protocol takes it ...).

    Returns:
        ``{"rows", "summary", "table", "skipped"}``; writes ``results.json`` / ``.md`` / ``.csv`` and ``summary.csv``
        to ``out``.

    Raises:
        ConfigError: nothing to compare, no or an unknown protocol, bad fractions / seeds / device / initialisation,
            or an option evaluate does not take (all checked before the first evaluation).
        StorageError: ``out`` cannot be a directory.
    """
    from medssl.api import evaluate
    from medssl.encoders import check_inits, resolve_device
    from medssl.eval.protocol import check_fractions_and_seeds
    from medssl.eval.registry import protocol_entry
    from medssl.eval.results import format_table, summarize, write_results
    from medssl.fileio import ensure_output_dir

    if not runs and not inits:
        raise ConfigError("nothing to compare: give run directories and/or --init random|imagenet")
    if not protocols:
        raise ConfigError("give at least one --protocol")
    entries = [protocol_entry(p) for p in dict.fromkeys(protocols)]
    check_inits(inits)
    check_fractions_and_seeds(label_fractions, seeds)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(evaluate).parameters)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ConfigError(f"compare: option(s) {unknown} are not evaluation options here")
    resolve_device(options.get("device"))
    labels = run_labels(runs)
    sources: list[tuple[str, str | Path | None, Sequence[str]]] = [
        (lab, run, inits if i == 0 else ()) for i, (lab, run) in enumerate(zip(labels, runs, strict=True))]
    if not sources:
        sources = [("baselines", None, inits)]
    out = ensure_output_dir(out)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for entry in entries:
        for lab, run, its in sources:
            sub = out / "per_source" / entry.name / lab.replace("/", "__").replace(":", "_")
            # --epochs is the length of the protocols that train; the feature probes have none
            opts = options if entry.trains else {k: v for k, v in options.items() if k != "epochs"}
            res = evaluate(data, sub, run=run, init=list(its) or None, protocol=entry.name,
                           label_fractions=label_fractions, seeds=seeds, progress=progress, **opts)
            rows += [{**r, "encoder": _relabel(r["encoder"], lab) if run is not None else r["encoder"]}
                     for r in res["rows"]]
            meta_path = sub / "results.json"
            if meta_path.is_file():
                note = (json.loads(meta_path.read_text()).get("meta") or {}).get("skipped")
                if note and note not in skipped:
                    skipped.append(note)
    meta = {"data": data, "runs": ", ".join(str(r) for r in runs) or None, "inits": ", ".join(inits) or None,
            "protocols": ", ".join(dict.fromkeys(protocols)), "label_fractions": list(label_fractions),
            "seeds": list(seeds), "encoders": list(dict.fromkeys(r["encoder"] for r in rows))}
    if skipped:
        meta["skipped"] = "; ".join(skipped)
    write_results(rows, out, meta=meta)
    summary = summarize(rows)
    write_summary_csv(summary, out / "summary.csv")
    return {"rows": rows, "summary": summary, "table": format_table(summary), "skipped": skipped}
