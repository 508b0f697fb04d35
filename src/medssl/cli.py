"""``medssl`` command line: thin wrappers over the library functions in :mod:`medssl.api`.

Every error a user can cause is printed as one line ``medssl: error: ...`` with exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

EXIT_USER_ERROR = 2


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"label fractions must be in (0, 1], got '{text}'")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one seed")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got '{text}'")
    return vals


def _positive_int(text: str) -> int:
    from medssl.api import positive_int

    return positive_int(text)


def _data_help() -> str:
    from medssl.data.specs import spec_help

    return spec_help()


def protocol_choices() -> tuple[list[str], str]:
    """The registered evaluation protocols (``--protocol`` choices) and their help."""
    from medssl.eval.registry import protocol_names, protocols_help

    return protocol_names(), protocols_help()


def add_flag(parser: Any, flag: Any) -> None:
    """Add one :class:`medssl.api.Flag` to a parser or argument group (its value lands in ``dest=flag.name``)."""
    kwargs: dict[str, Any] = {"dest": flag.name, "default": None, "help": flag.help}
    if flag.const is not None:
        kwargs.update(action="store_const", const=flag.const)
    else:
        kwargs.update(type=flag.type, metavar=flag.metavar)
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
    parser.add_argument(flag.option, **kwargs)


def _add_pretrain(sub: Any, data_help: str) -> None:
    from medssl.api import PRETRAIN_FLAGS

    pre = sub.add_parser("pretrain", help="pretrain an encoder with a self-supervised method")
    pre.add_argument("--method", help="registry name (see `medssl methods`)")
    pre.add_argument("--data", help=data_help)
    pre.add_argument("--out", required=True, help="run directory")
    pre.add_argument("--config", help="YAML recipe (path or bundled name)")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set method.queue_size=1024 (repeatable)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pre.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    pre.add_argument("--quiet", action="store_true", help="no progress output")
    groups: dict[str, Any] = {}
    for flag in PRETRAIN_FLAGS:
        if flag.exclusive is not None and flag.exclusive not in groups:
            groups[flag.exclusive] = pre.add_mutually_exclusive_group()
        add_flag(pre if flag.exclusive is None else groups[flag.exclusive], flag)


def _add_evaluate(sub: Any, data_help: str) -> None:
    from medssl.encoders import DEVICE_HELP, INIT_HELP

    names, protocol_help = protocol_choices()
    ev = sub.add_parser("evaluate", help="evaluate encoders at several label fractions and seeds")
    ev.add_argument("--run", help="run directory of a pretraining run")
    ev.add_argument("--checkpoint", help="encoder .safetensors or training .ckpt")
    ev.add_argument("--init", action="append", metavar="INIT",
                    help=f"baseline initialisation (repeatable): {INIT_HELP}; imagenet is skipped with a note "
                         "when offline")
    ev.add_argument("--data", required=True, help=data_help)
    ev.add_argument("--task", help="label task where the dataset has several")
    ev.add_argument("--protocol", default="linear", choices=names, help=protocol_help)
    ev.add_argument("--epochs", type=_positive_int, help="training epochs of the protocols that train (default 20)")
    ev.add_argument("--label-fractions", type=_floats, default=[0.01, 0.1, 1.0])
    ev.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    ev.add_argument("--encoder", help="which encoder of a multi-encoder run (e.g. cnn, vit, both)")
    ev.add_argument("--backbone", help="backbone of --init random (default: the run's, else resnet18)")
    ev.add_argument("--image-size", type=_positive_int)
    ev.add_argument("--batch-size", type=_positive_int, default=256)
    ev.add_argument("--device", help=DEVICE_HELP)
    ev.add_argument("--out", required=True, help="output directory for results.json / results.md")
    ev.add_argument("--splits", metavar="FILE", help="split manifest (splits.csv of a run or evaluation) to reuse")
    ev.add_argument("--window", type=_positive_int, metavar="N",
                    help="3D: slide an N^3 window over each whole volume (e.g. the run's sub-volume size): features "
                         "are the mean over windows; segment predicts window by window")
    ev.add_argument("--overlap", type=float, metavar="F", help="sliding-window overlap in [0, 1) (default 0.25)")
    ev.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    p = argparse.ArgumentParser(prog="medssl", description="Self-supervised pretraining and low-label evaluation "
                                "of medical image encoders (2D and 3D).")
    from medssl import __version__

    p.add_argument("--version", action="version", version=f"medssl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    data_help = _data_help()
    _add_pretrain(sub, data_help)
    _add_evaluate(sub, data_help)

    ins = sub.add_parser("inspect", help="summarise a dataset and list every unreadable or inconsistent file "
                         "(exit code 1 if there is any)")
    ins.add_argument("--data", required=True, help=data_help)
    ins.add_argument("--task", help="label task where the dataset has several")
    ins.add_argument("--image-size", type=_positive_int)
    ins.add_argument("--quiet", action="store_true", help="no progress output")

    sub.add_parser("methods", help="list the registered methods")

    demo = sub.add_parser("demo", help="pretrain mocov2 on phantom2d and compare with random init (minutes on CPU)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--max-steps", type=_positive_int, help="shorten or lengthen the demo's pretraining")
    from medssl.cli_eval import add_parsers

    add_parsers(sub, _floats, _ints, _positive_int, data_help)
    from medssl.completion import SHELLS

    comp = sub.add_parser("completion", help="print a shell completion script (source <(medssl completion bash))")
    comp.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")
    return p


def _cmd_methods() -> int:
    from medssl.methods import method_table

    rows = method_table()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


def _cmd_pretrain(a: argparse.Namespace) -> int:
    from medssl.api import PRETRAIN_FLAGS, pretrain

    run = pretrain(a.method, a.data, a.out, config=a.config, overrides=a.overrides, resume=a.resume, force=a.force,
                   progress=not a.quiet, **{f.name: getattr(a, f.name) for f in PRETRAIN_FLAGS})
    from medssl.distributed import rank

    if rank() == 0:
        print(f"run written to {run}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from medssl.api import evaluate

    res = evaluate(
        a.data, a.out, run=a.run, checkpoint=a.checkpoint, init=a.init, protocol=a.protocol,
        label_fractions=a.label_fractions, seeds=a.seeds, task=a.task, encoder=a.encoder, backbone=a.backbone,
        image_size=a.image_size, batch_size=a.batch_size, device=a.device, splits_file=a.splits, epochs=a.epochs,
        progress=not a.quiet, window=a.window, overlap=a.overlap,
    )
    print(res["table"])
    print(f"results written to {Path(a.out) / 'results.json'} and results.md")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from medssl.data.inspect import format_report, inspect_data
    from medssl.engine.logging import TaskProgress

    bars: list[TaskProgress] = []

    def progress(total: int) -> Any:
        bars.append(TaskProgress("inspect", total, enabled=not a.quiet, unit="items"))
        return bars[-1].advance

    try:
        report = inspect_data(a.data, task=a.task, image_size=a.image_size, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(format_report(report))
    return 1 if report.bad else 0


def _cmd_completion(a: argparse.Namespace) -> int:
    from medssl.completion import completion_script

    sys.stdout.write(completion_script(a.shell, build_parser()))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from medssl.demo import run_demo

    run_demo(a.out, max_steps=a.max_steps)
    return 0


def _setup_logging(quiet: bool) -> None:
    """medssl's own messages (resuming, skipped files, warnings) go to stderr as ``medssl: ...`` lines."""
    import logging

    logger = logging.getLogger("medssl")
    if not any(getattr(h, "_medssl", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("medssl: %(message)s"))
        handler._medssl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


EXIT_PEER_FAILED = 1


def _peer_failure(e: BaseException) -> bool:
    """Is ``e`` the collective error a healthy DDP rank gets when another rank has died?

    Such a rank would otherwise print a long traceback from inside torch.distributed that hides the real error
    (printed by the rank that failed).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "NCCL communicator was aborted", "ProcessGroupNCCL", "remote worker crashing")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medssl`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _setup_logging(quiet=bool(getattr(args, "quiet", False)))
    handlers = {"methods": lambda: _cmd_methods(), "pretrain": lambda: _cmd_pretrain(args),
                "evaluate": lambda: _cmd_evaluate(args), "demo": lambda: _cmd_demo(args),
                "inspect": lambda: _cmd_inspect(args), "completion": lambda: _cmd_completion(args)}
    from medssl.cli_eval import HANDLERS

    handlers.update({name: (lambda fn=fn: fn(args)) for name, fn in HANDLERS.items()})
    try:
        return handlers[args.command]()
    except MedsslError as e:
        code = int(getattr(e, "exit_code", EXIT_USER_ERROR))
        print(f"medssl: {'error: ' if code == EXIT_USER_ERROR else ''}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("medssl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _peer_failure(e):
            raise
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
        print(f"medssl: process {rank} of this distributed run stopped because another process failed (its error "
              f"is printed above or in that process's log): {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return EXIT_PEER_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
