"""The order of the data: epochs as seeded permutations, batches of SampleKeys, exact positions.

The core, not the dataset, decides which sample comes when, so a resume lands on the exact batch
with any number of workers: position = (epoch, batches consumed). Knobs travel inside the keys,
so workers see curriculum changes without mutating a dataset object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from kktrain.task import SampleKey

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK


class BatchPlan:
    """Batches of one epoch for this rank: a permutation from (seed, epoch), sharded, cut."""

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = True,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        per_rank = num_samples // world_size
        self.batches_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        per_rank = self.num_samples // self.world_size
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]


class KeyBatchSampler:
    """The DataLoader's batch_sampler: yields lists of SampleKeys from a position onwards.

    The loader iterates it in the main process; set ``epoch``/``start``/``knobs``/``skip`` before
    each ``iter(loader)``.
    """

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.epoch = 0
        self.start = 0
        self.knobs: Mapping[str, Any] = {}
        self.skip: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return self.plan.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        plan, epoch, knobs = self.plan, self.epoch, dict(self.knobs)
        order = plan.indices(epoch).tolist()
        bs = plan.batch_size
        for b in range(self.start, plan.batches_per_epoch):
            if b in self.skip:
                continue
            idx = order[b * bs : (b + 1) * bs]
            yield [SampleKey(i, sample_seed(plan.seed, epoch, i), knobs) for i in idx]


def identity_collate(items: Any) -> Any:
    """For datasets whose ``__getitems__`` already returns a whole batch."""
    return items
