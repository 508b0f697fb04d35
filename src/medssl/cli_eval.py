"""The ``compare``, ``report``, ``embed`` and ``export`` sub-commands of ``medssl`` (parsers and thin handlers over
:mod:`medssl.compare`, :mod:`medssl.report`, :mod:`medssl.embed` and :mod:`medssl.export_formats`)."""

from __future__ import annotations

import argparse
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

    exp = sub.add_parser("export", help="write a run's backbone in timm / torchvision / MONAI key layout")
    esrc = exp.add_mutually_exclusive_group(required=True)
    esrc.add_argument("--run", help="run directory")
    esrc.add_argument("--checkpoint", help="an exported medssl encoder .safetensors")
    exp.add_argument("--format", required=True, choices=FORMATS,
                     help="key layout of the written file")
    exp.add_argument("--encoder", help="which encoder of a multi-encoder run (e.g. cnn, vit)")
    exp.add_argument("--out", required=True, help="output .safetensors file (never a file of the run itself)")


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
                device=a.device, plot=a.plot)
    n, d = res["shape"]
    print(f"{res['encoder']}: {n} x {d} features written to {res['features']}, index to {res['index']}")
    if res["plot"] is not None:
        print(f"projection plot: {res['plot']}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from medssl.export_formats import describe, export_weights

    res = export_weights(a.out, a.format, run=a.run, encoder_file=a.checkpoint, encoder=a.encoder)
    print(describe(res))
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": cmd_compare, "report": cmd_report, "embed": cmd_embed, "export": cmd_export,
}
