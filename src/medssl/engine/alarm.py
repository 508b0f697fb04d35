"""The collapse alarm: a loud warning when the contrastive embeddings stop spreading out during pretraining.

Each collapse diagnostic (every ``train.collapse_every_n_steps``, :mod:`medssl.eval.collapse`) measures the
effective rank and the normalised std of the embeddings a method reports. The alarm watches the embeddings
the loss acts on — ``projector`` and names ending in ``projector`` or ``head`` (CASS's ``cnn_head`` /
``vit_head``) — not the backbone features. A diagnostic is *collapsed* when, for any watched embedding,

* the effective rank of its L2-normalised rows (what the loss sees; the ``<name>_eff_rank_l2`` column) is
  below ``train.collapse_alarm_rank`` × its largest possible value ``min(d, N − 1)`` (``d`` the width, ``N``
  the samples measured), or
* the std of the L2-normalised embeddings × √d is below ``train.collapse_alarm_std`` (≈ 1 when spread over the
  sphere, 0 when every image maps to one point).

After ``train.collapse_alarm_patience`` collapsed diagnostics in a row the alarm fires: one loud warning with
the likely causes, ``collapse_alarm = 1`` in that metrics.csv row (0 in the other diagnostic rows), and, with
``train.stop_on_collapse``, a checkpoint and a stop (:class:`TrainingCollapsed`, exit code 3). A later healthy
diagnostic re-arms it. Every rank computes the same statistics (the embeddings are gathered first), so every
rank reaches the same verdict and stops at the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from medssl.errors import MedsslError

log = logging.getLogger("medssl")

#: the metrics.csv column
ALARM_COLUMN = "collapse_alarm"
#: ``<name><suffix>``: the effective rank of the L2-normalised embeddings, the one the alarm reads. The raw
#: ``<name>_eff_rank`` can be ~1 while the directions are spread (measured on real data, docs/evaluation.md):
#: one dominant direction of the *norms* of unnormalised projector outputs, which the loss never sees.
L2_RANK_SUFFIX = "_eff_rank_l2"

CAUSES = (
    "the learning rate is too high for the batch size (try half; SGD lr scales ~linearly with the batch), "
    "or the warm-up too short",
    "the augmentation is too strong for the image size (crop scale too small, blur sigma large next to the "
    "image, heavy intensity jitter): the two views share too little",
    "the batch is too small or the queue holds too few negatives",
)


class TrainingCollapsed(MedsslError):
    """Training stopped by ``train.stop_on_collapse`` after writing a checkpoint (the CLI exits with code 3)."""

    exit_code = 3


def watched(name: str) -> bool:
    """Whether the alarm watches embedding ``name`` (the projector / head outputs the loss acts on)."""
    return name.endswith("projector") or name.endswith("head")


@dataclass
class CollapseAlarm:
    """Counts consecutive collapsed diagnostics and fires after ``patience`` of them.

    Args:
        rank_fraction: effective rank below this fraction of ``min(d, N − 1)`` counts as collapsed (0 = off).
        min_std: normalised std below this counts as collapsed (0 = off).
        patience: consecutive collapsed diagnostics before the alarm fires (0 = the alarm is off).
    """

    rank_fraction: float = 0.01
    min_std: float = 0.1
    patience: int = 3
    streak: int = 0
    fired_at: list[int] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.patience > 0 and (self.rank_fraction > 0 or self.min_std > 0)

    def reasons(self, stats: Mapping[str, float], shapes: Mapping[str, tuple[int, int]]) -> list[str]:
        """Why this diagnostic counts as collapsed (empty: it does not). ``stats`` has ``<name>_eff_rank_l2``
        (or, without it, ``<name>_eff_rank``) and ``<name>_std``; ``shapes`` the ``(N, d)`` of each embedding."""
        out = []
        for name, (n, d) in shapes.items():
            if not watched(name):
                continue
            rank = stats.get(f"{name}{L2_RANK_SUFFIX}", stats.get(f"{name}_eff_rank"))
            std = stats.get(f"{name}_std")
            top = max(min(d, n - 1), 1)
            if rank is not None and self.rank_fraction > 0 and rank < self.rank_fraction * top:
                out.append(f"{name} effective rank {rank:.2f} < {self.rank_fraction:g} x {top}")
            if std is not None and self.min_std > 0 and std < self.min_std:
                out.append(f"{name} std {std:.3f} < {self.min_std:g}")
        return out

    def update(self, step: int, stats: Mapping[str, float], shapes: Mapping[str, tuple[int, int]]) -> bool | None:
        """Record one diagnostic. Returns ``True`` when the alarm fires at this step, ``False`` when it does not,
        ``None`` when nothing is watched (no column is written then)."""
        if not self.enabled or not any(watched(n) for n in shapes):
            return None
        why = self.reasons(stats, shapes)
        if not why:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < self.patience:
            return False
        if self.streak == self.patience:
            self.fired_at.append(step)
            log.warning(self.message(step, why))
        return True

    def message(self, step: int, why: list[str]) -> str:
        """The loud warning."""
        bar = "!" * 100
        causes = "\n".join(f"  - {c}" for c in CAUSES)
        return (f"\n{bar}\nCOLLAPSE ALARM at step {step}: the embeddings have collapsed for {self.patience} "
                f"diagnostics in a row ({'; '.join(why)}).\nThe encoder is no longer learning useful features. "
                f"Likely causes:\n{causes}\nSet train.stop_on_collapse=true to stop such runs; "
                f"train.collapse_alarm_patience=0 silences this alarm.\n{bar}")
