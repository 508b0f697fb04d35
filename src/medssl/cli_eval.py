"""The ``compare``, ``report``, ``embed``, ``export`` and ``prepare`` sub-commands of ``medssl`` (parsers and thin
handlers over :mod:`medssl.compare`, :mod:`medssl.report`, :mod:`medssl.embed`, :mod:`medssl.export_formats` and
:func:`medssl.api.prepare`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parsers(sub: Any, floats: Callable[[str], list[float]], ints: Callable[[str], list[int]],
                positive_int: Callable[[str], int], data_help: str) -> None:
    """Register the four sub-commands on ``medssl``'s sub-parser object."""
    from medssl.cli import protocol_choices
    from medssl.data.splits import SPLIT_NAMES
    from medssl.encoders import DEVICE_HELP, INIT_HELP
    from medssl.export_formats import FORMATS

    protocol_names, protocol_help = protocol_choices()
    cmp = sub.add_parser("compare", help="evaluate several runs and baselines with several protocols: one table")
    cmp.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories to compare")
    cmp.add_argument("--init", action="append", default=[], metavar="INIT",
                     help=f"baseline initialisation with the first run's backbone (repeatable): {INIT_HELP}; "
                          "imagenet needs the "
                          "weights (network, HF cache or $MEDSSL_IMAGENET_WEIGHTS) and is skipped with a note "
                          "otherwise")
    cmp.add_argument("--data", required=True, help=data_help)
    cmp.add_argument("--task", help="label task where the dataset has several")
    cmp.add_argument("--protocol", nargs="+", default=["linear"], choices=protocol_names,
                     help=f"one or more protocols: {protocol_help}")
    cmp.add_argument("--label-fractions", type=floats, default=[0.01, 0.1, 1.0])
    cmp.add_argument("--seeds", type=ints, default=[0, 1, 2])
    cmp.add_argument("--epochs", type=positive_int, help="training length of the protocols that train")
    cmp.add_argument("--encoder", help="which encoder of multi-encoder runs")
    cmp.add_argument("--image-size", type=positive_int)
    cmp.add_argument("--batch-size", type=positive_int, default=256)
    cmp.add_argument("--device", help=DEVICE_HELP)
    cmp.add_argument("--out", required=True, help="output directory (results.json / .md / .csv, summary.csv)")
    cmp.add_argument("--quiet", action="store_true", help="no progress output")

    rep = sub.add_parser("report", help="self-contained HTML report of one or several runs")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="HTML file (default RUN_DIR/report.html for one run; required for several)")
    rep.add_argument("--eval", action="append", default=[], metavar="DIR",
                     help="an evaluation output folder (results.json) to include (repeatable); RUN_DIR/eval* is "
                          "searched anyway")

    emb = sub.add_parser("embed", help="write an encoder's features of a dataset (features.npy + index.csv)")
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory")
    src.add_argument("--checkpoint", help="encoder .safetensors or training .ckpt")
    src.add_argument("--init", metavar="INIT", help=f"a baseline initialisation: {INIT_HELP}")
    emb.add_argument("--data", required=True, help=data_help)
    emb.add_argument("--task", help="label task where the dataset has several")
    emb.add_argument("--split", choices=SPLIT_NAMES, help="only this split (default: all items)")
    emb.add_argument("--encoder", help="which encoder of a multi-encoder run")
    emb.add_argument("--backbone", help="backbone of --init (default resnet18)")
    emb.add_argument("--image-size", type=positive_int)
    emb.add_argument("--batch-size", type=positive_int, default=256)
    emb.add_argument("--device", help=DEVICE_HELP)
    emb.add_argument("--plot", action="store_true", help="also draw a 2D projection (PCA; UMAP if installed)")
    emb.add_argument("--out", required=True, help="output directory")
    emb.add_argument("--quiet", action="store_true", help="no progress output")

    exp = sub.add_parser("export", help="write a run's backbone in timm / torchvision / MONAI key layout, as ONNX or "
                         "as a Hugging Face Hub folder")
    esrc = exp.add_mutually_exclusive_group(required=True)
    esrc.add_argument("--run", help="run directory")
    esrc.add_argument("--checkpoint", help="an exported medssl encoder .safetensors")
    exp.add_argument("--format", required=True, choices=(*FORMATS, *EXTRA_FORMATS),
                     help="key layout of the written .safetensors file; onnx: an ONNX model (dynamic batch); hf-hub: a "
                          "folder timm loads (config.json, model.safetensors, README.md model card)")
    exp.add_argument("--encoder", help="which encoder of a multi-encoder run (e.g. cnn, vit)")
    exp.add_argument("--out", required=True, help="output .safetensors / .onnx file, or the hf-hub folder (never a "
                                                  "file of the run itself)")
    exp.add_argument("--push", metavar="ORG/NAME", help="hf-hub: upload the folder to this Hub model repository")
    exp.add_argument("--license", help="hf-hub: the model card's license, a Hub identifier (default other)")

    pre = sub.add_parser("prepare", help="read a dataset once, preprocess it and write compressed shards (read "
                         "back with --data shards:DIR)")
    pre.add_argument("--data", required=True, help=data_help)
    pre.add_argument("--out", required=True, help="new folder for the shards (an interrupted prepare of the same "
                     "input continues; anything else is refused)")
    pre.add_argument("--image-size", type=positive_int, help="side length the items are resized to")
    pre.add_argument("--task", help="label task where the dataset has several")
    pre.add_argument("--spacing", type=_spacing, metavar="MM|Z,Y,X|native",
                     help="3D: resample every volume to this voxel spacing in mm first (data.spacing)")
    pre.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                     help="worker processes (default: min(4, CPUs))")
    pre.add_argument("--chunk-mb", type=_chunk_mb, metavar="MB", help="target shard size in MB (default 64)")
    pre.add_argument("--fail-on-bad", action="store_true", help="an unreadable file is an error (default: "
                     "listed in DIR/bad.csv and skipped)")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                     help="any data setting, e.g. --set data.intensity.mode=window (repeatable)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")


def _spacing(text: str) -> Any:
    if text.strip() == "native":
        return "native"
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'native', MM or Z,Y,X in mm, got '{text}'") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one spacing or three (Z,Y,X), got '{text}'")
    return values[0] if len(values) == 1 else values


def _chunk_mb(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got '{text}'") from None
    if not math.isfinite(value) or not 0 < value <= 4096:
        raise argparse.ArgumentTypeError(f"must be in (0, 4096] MB, got '{text}'")
    return value


def cmd_compare(a: argparse.Namespace) -> int:
    from medssl.compare import compare

    res = compare(a.runs, a.data, a.out, inits=a.init, protocols=a.protocol, label_fractions=a.label_fractions,
                  seeds=a.seeds, progress=not a.quiet, task=a.task, encoder=a.encoder, image_size=a.image_size,
                  batch_size=a.batch_size, device=a.device, epochs=a.epochs)
    print(res["table"])
    for note in res["skipped"]:
        print(f"note: {note}")
    out = Path(a.out)
    print(f"results written to {out / 'results.md'}, results.json, results.csv and summary.csv")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from medssl.report import build_report

    path = build_report(a.runs, a.out, eval_dirs=a.eval)
    print(f"report written to {path} ({path.stat().st_size / 1024:.0f} KiB, self-contained)")
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from medssl.embed import embed

    res = embed(a.data, a.out, run=a.run, checkpoint=a.checkpoint, init=a.init, encoder=a.encoder,
                backbone=a.backbone, image_size=a.image_size, task=a.task, split=a.split, batch_size=a.batch_size,
                device=a.device, plot=a.plot, progress=not a.quiet)
    n, d = res["shape"]
    print(f"{res['encoder']}: {n} x {d} features written to {res['features']}, index to {res['index']}")
    if res["plot"] is not None:
        print(f"projection plot: {res['plot']}")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from medssl.api import prepare

    res = prepare(a.data, a.out, image_size=a.image_size, task=a.task, workers=a.workers, chunk_mb=a.chunk_mb,
                  fail_on_bad=a.fail_on_bad, spacing=a.spacing, overrides=a.overrides, progress=not a.quiet)
    if res.already:
        print(f"{res.out} already holds this prepare ({res.num_items} items); nothing to do")
    else:
        rate = res.num_items / max(res.seconds, 1e-9)
        how = "finished an interrupted prepare: " if res.resumed else ""
        print(f"{how}{res.num_items} items written to {res.out} in {res.seconds:.1f} s ({rate:.0f} items/s); "
              f"read them with --data shards:{res.out}")
    if res.bad:
        print(f"{len(res.bad)} unreadable file(s) skipped, listed in {res.out / 'bad.csv'} (first: {res.bad[0][0]}: "
              f"{res.bad[0][1]})")
    return 0


EXTRA_FORMATS = ("onnx", "hf-hub")
"""``medssl export`` formats beyond the safetensors key layouts of :data:`medssl.export_formats.FORMATS`."""


def cmd_export(a: argparse.Namespace) -> int:
    from medssl.errors import ConfigError

    if a.format != "hf-hub" and (a.push is not None or a.license is not None):
        raise ConfigError(f"--push and --license apply to --format hf-hub, not {a.format}")
    if a.format == "onnx":
        from medssl.export_onnx import describe_onnx, export_onnx

        print(describe_onnx(export_onnx(a.out, run=a.run, encoder_file=a.checkpoint, encoder=a.encoder)))
        return 0
    if a.format == "hf-hub":
        from medssl.export_hub import describe_hub, export_hf_hub

        print(describe_hub(export_hf_hub(a.out, run=a.run, encoder_file=a.checkpoint, encoder=a.encoder,
                                         license="other" if a.license is None else a.license, push=a.push)))
        return 0
    from medssl.export_formats import describe, export_weights

    res = export_weights(a.out, a.format, run=a.run, encoder_file=a.checkpoint, encoder=a.encoder)
    print(describe(res))
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": cmd_compare, "report": cmd_report, "embed": cmd_embed, "export": cmd_export,
    "prepare": cmd_prepare,
}
