"""Randomness as pure functions of integers, and the sampler that makes a run's data order one of them.

Seeds come from ``(tag, seed, step or epoch, rank or index)`` through numpy's ``SeedSequence``; the tags keep
the streams of different consumers apart even when the integers coincide. Because the sampler's position is
global (not per rank), a run may resume with another number of ranks and still see the same samples per step.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.errors import ConfigError
from pipeline.training.settings import EpochDataset

# Stream tags keep the seeds of different consumers apart even when (seed, a, b) coincide.
TAG_SAMPLER = 1
TAG_STEP_GENERATOR = 2
TAG_GLOBAL_RNG = 3
TAG_SAMPLE = 4


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the integers ``parts`` (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for the augmentation of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return derive_seed(TAG_SAMPLE, seed, epoch, index)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU ``torch.Generator`` for one sample's augmentation (see :class:`EpochDataset`)."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class StepBatchSampler(Sampler):
    """Yields, for each step in ``[start_step, end_step)``, this rank's slice of the global batch.

    Global batch of step ``s``: epoch ``e = s // steps_per_epoch``; positions
    ``[(s % steps_per_epoch) * B, ... + B)`` of a permutation of ``range(dataset_len)`` seeded by
    ``(seed, e)`` (shuffle, drop_last: the tail of each permutation is never used). Rank ``r`` of
    ``W`` takes entries ``[r * B/W, (r+1) * B/W)``. Items are ``(index, epoch)`` pairs, which the
    trainer's dataset adapter turns into ``dataset.get(index, epoch)``.
    Because the position is global, a run may resume with a different number of ranks and still
    see the same samples at every step.
    """

    def __init__(self, *, dataset_len: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {world_size} ranks of this run; "
                              "use a global batch size that is a multiple of --nproc-per-node")
        if dataset_len < batch_size:
            raise ConfigError(f"the training set has {dataset_len} samples, fewer than batch_size {batch_size}; "
                              "lower batch_size or use more frames")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = dataset_len // batch_size
        self.local_batch = batch_size // world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``: int64 array of shape (dataset_len,)."""
        rng = np.random.default_rng(derive_seed(TAG_SAMPLER, self.seed, epoch))
        return rng.permutation(self.dataset_len)

    def global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step``: int64 array (batch_size,)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.end_step):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            lo = pos * self.batch_size + self.rank * self.local_batch
            yield [(int(i), epoch) for i in perm[lo:lo + self.local_batch]]


class ByEpochIndex(torch.utils.data.Dataset):
    """Adapts an :class:`EpochDataset` to DataLoader's ``dataset[key]`` with key = (index, epoch)."""

    def __init__(self, dataset: EpochDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        return self.dataset.get(index, epoch)


def worker_init(parent: int, _worker_id: int) -> None:
    """A training loader's worker (``functools.partial(worker_init, os.getpid())`` in the process that makes it)."""
    # Ctrl-C reaches the whole process group and Slurm signals every process of a job step; the
    # main process turns those into a clean checkpoint, so workers must not die underneath it
    # (they still exit when the main process goes: pipeline/data/workers.py).
    from pipeline.data.workers import exit_with_parent

    exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

