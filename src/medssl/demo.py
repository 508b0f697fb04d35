"""``make demo`` / ``medssl demo``: the whole pipeline on the embedded phantoms in a few CPU minutes.

Pretrains MoCo v2 on ``phantom2d`` with the bundled ``demo_mocov2_phantom2d`` recipe, then evaluates the
pretrained encoder and a randomly initialised one of the same architecture with the linear probe at 1 %,
10 % and 100 % of the labels over three seeds, and prints one table.
"""

from __future__ import annotations

import time
from pathlib import Path

from medssl.api import evaluate, pretrain

DEMO_RECIPE = "demo_mocov2_phantom2d"


def run_demo(out: str | Path = "runs/demo", *, max_steps: int | None = None) -> dict:
    """Run the demo into ``out`` (``out/pretrain`` and ``out/eval``); returns the evaluation result.

    An existing finished demo run is reused for evaluation; an interrupted one is resumed.
    """
    out = Path(out)
    run = out / "pretrain"
    t0 = time.perf_counter()
    print(f"[demo] pretraining mocov2 on phantom2d into {run} (recipe {DEMO_RECIPE})", flush=True)
    print("[demo] 250 steps x 64 images: the time is 16,000 / (img/s on the progress lines) plus ~2 min of "
          "evaluation; ~8 min on an idle 2-core machine, several times that on a busy one. Numbers vary by about "
          "one seed-std between machines (docs/demo.md).", flush=True)
    if (run / "encoder.safetensors").is_file():
        print("[demo] finished pretraining run found; reusing it", flush=True)
    else:
        resume = (run / "checkpoints" / "last.ckpt").is_file()
        pretrain(config=DEMO_RECIPE, out=run, resume=resume, max_steps=max_steps, force=resume)
    t1 = time.perf_counter()
    print(f"[demo] pretraining took {t1 - t0:.0f} s; evaluating (linear probe, 1/10/100 % labels, seeds 0,1,2)",
          flush=True)
    res = evaluate("phantom2d", out / "eval", run=run, init="random", protocol="linear",
                   label_fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2))
    print()
    print(res["table"])
    print()
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Results: {out / 'eval' / 'results.md'}; "
          f"run directory: {run}")
    return res
