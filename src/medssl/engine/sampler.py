"""A batch sampler whose order depends only on (seed, epoch) and that can start mid-epoch.

Resuming at step ``s`` must feed exactly the batches an uninterrupted run would have fed. Each epoch's
order is a permutation drawn from a generator seeded with ``seed + epoch``; each global batch of
``batch_size × world_size`` indices is split into per-rank slices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's index lists for one epoch, starting at ``start_batch``.

    Args:
        indices: dataset indices to draw from (e.g. the training split).
        batch_size: per-rank batch size.
        seed: base seed of the epoch permutations.
        rank: this process's rank.
        world_size: number of ranks.
        drop_last: drop the last incomplete global batch (keeps BatchNorm and queues regular).
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the batch to start from."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=g).numpy()]
        gb = self.global_batch
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[b * gb : (b + 1) * gb]
            per_rank = -(-len(chunk) // self.world_size)
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
            if len(mine) == 0:  # short last batch smaller than world size: repeat to keep ranks in step
                mine = chunk[:1]
            yield mine.tolist()
