"""Learning-rate schedules as multiplicative factors of the peak learning rate."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then half-cosine decay to ``min_ratio``.

    ``step`` counts completed optimiser steps (0 for the first step), so the first step uses
    ``1 / warmup_steps`` of the peak rate rather than zero.
    """
    if total_steps <= 0:
        return 1.0
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
