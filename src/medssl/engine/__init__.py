"""medssl.engine: the training engine.

``trainer.pretrain`` puts the parts together: ``rundir`` (paths, lock, files written at start), ``loader``
(data, sampler, DataLoader), ``optim`` (optimisers and schedules per parameter set), ``state`` (what a checkpoint
holds, resume checks), ``guard`` (non-finite steps, SIGTERM), ``metrics`` (metrics rows), ``checkpoint`` (atomic
writes, weights-only loads). See docs/training.md.
"""
