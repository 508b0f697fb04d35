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

    def state_dict(self, step_in_epoch: int) -> dict[str, int | str]:
        """Where the loader stands (plain values: the checkpoint loads with ``weights_only=True``)."""
        return {"kind": "map", "epoch": int(self.epoch), "batch": int(step_in_epoch), "seed": int(self.seed),
                "world_size": int(self.world_size), "batch_size": int(self.batch_size),
                "num_items": len(self.indices)}


class StreamingBatchSampler(ResumableBatchSampler):
    """The batches of a rank streaming from shards (:func:`medssl.data.shards.stream_order`).

    Each epoch permutes the chunks, gives every rank a disjoint contiguous part of the chunk stream and mixes it with
    a seeded shuffle buffer; batches are consecutive runs of that order. The order is a pure function of
    ``(seed, epoch, rank, world size, buffer)`` and the shard layout, so a run resumed at batch ``b`` of an epoch
    recomputes it and starts at ``b``: no item is repeated or skipped. Batches per epoch equal
    :class:`ResumableBatchSampler`'s (``floor`` or ``ceil`` of items / global batch).

    Args:
        chunk_starts: cumulative item counts of the shards' chunks.
        buffer: shuffle buffer size in items.
        fingerprint: identifies the prepared data (stored with the loader state; a resume on other shards fails).
    """

    def __init__(self, chunk_starts: np.ndarray, indices: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, buffer: int = 1024,
                 fingerprint: str = "") -> None:
        super().__init__(indices, batch_size, seed, rank, world_size, drop_last)
        self.indices = np.sort(self.indices)
        self.chunk_starts = np.asarray(chunk_starts, dtype=np.int64)
        self.buffer = int(buffer)
        self.fingerprint = fingerprint
        self._order: tuple[int, np.ndarray] | None = None

    def batches_per_epoch(self) -> int:
        n = len(self.indices)
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's item order in ``epoch`` (computed from the shard layout alone: nothing is read)."""
        if self._order is None or self._order[0] != epoch:
            from medssl.data.shards import stream_order

            order = stream_order(self.chunk_starts, self.indices, seed=self.seed, epoch=epoch, rank=self.rank,
                                 world_size=self.world_size, buffer=self.buffer, drop_last=self.drop_last)
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        bs = self.batch_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield order[b * bs:(b + 1) * bs].tolist()

    def state_dict(self, step_in_epoch: int) -> dict[str, int | str]:
        return {**super().state_dict(step_in_epoch), "kind": "shards", "buffer": self.buffer,
                "fingerprint": self.fingerprint}


def check_loader_resume(saved: dict | None, current: dict[str, int | str], source: object) -> None:
    """A run resumed mid-epoch must read the rest of the epoch the interrupted run would have read.

    Shards: the same prepared data (fingerprint) always; mid-epoch also the same world size, batch size and buffer
    (they shape the epoch's per-rank order). Map-style datasets reorder per global batch, so only the item count is
    checked. Nothing to check for a checkpoint without loader state (older runs).

    Raises:
        ConfigError: naming the setting that changed and how to continue.
    """
    from medssl.errors import ConfigError

    if not saved or not isinstance(saved, dict):
        return
    if saved.get("kind") != current.get("kind"):
        raise ConfigError(f"--resume: {source} was written while reading {saved.get('kind')} data, this run reads "
                          f"{current.get('kind')} data; resume with the same --data")
    if current.get("kind") == "shards" and saved.get("fingerprint") != current.get("fingerprint"):
        raise ConfigError(f"--resume: the shards differ from those {source} was trained on (another prepare); "
                          "resume with the same shards:DIR")
    if saved.get("num_items") != current.get("num_items"):
        raise ConfigError(f"--resume: {source} read {saved.get('num_items')} items per epoch, this run "
                          f"{current.get('num_items')}; resume with the same data and split")
    if int(current.get("batch", 0)) == 0 or current.get("kind") != "shards":
        return
    for key in ("world_size", "batch_size", "buffer", "seed"):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"--resume in the middle of an epoch on shards needs the same {key} "
                              f"({saved.get(key)} in {source}, now {current.get(key)}): the epoch's per-rank order "
                              "depends on it")
