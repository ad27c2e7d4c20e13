"""The training-order sampler shared by every datamodule: a seeded permutation per epoch, split across
ranks, that can start in the middle of an epoch (exact mid-epoch resume).

Order of epoch e: ``randperm(n, generator seeded with seed * 100003 + e)``. With W ranks the order
is padded with its first items to a multiple of W and rank r takes items r, r + W, ... (what
Lightning's ``DistributedSamplerWrapper`` gave this sampler before it split ranks itself), so a
run computes the same with or without this module. The sampler is a ``DistributedSampler``
subclass only so that Lightning keeps it instead of wrapping it: a wrapper shards the whole
order, and the rest of an epoch could then not be sharded like the uninterrupted epoch.

Resume (``resume_at``): the next pass starts at item ``start`` of this rank's share of epoch
``epoch``, and every later pass is the next epoch. After a resume the sampler counts its own
passes and ignores ``set_epoch``: Lightning 2.6, restarting from an epoch-end checkpoint with
``trainer.max_steps`` set, calls ``set_epoch`` with a number one ahead of the epoch it trains
(measured: the resumed run drew epoch 2's order for its epoch 1), which made such resumes inexact.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data.distributed import DistributedSampler


def _world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSeededSampler(DistributedSampler):
    """Shuffles with a permutation that depends only on (seed, epoch); this rank's share of it."""

    def __init__(self, n: int, seed: int, num_replicas: int | None = None, rank: int | None = None):
        # DistributedSampler.__init__ needs a process group: the fields it would set are set here
        world, me = _world()
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.num_replicas = int(num_replicas if num_replicas is not None else world)
        self.rank = int(rank if rank is not None else me)
        self.shuffle, self.drop_last = True, False
        self.num_samples = math.ceil(self.n / self.num_replicas) if self.n else 0
        self.total_size = self.num_samples * self.num_replicas
        self.dataset = range(self.n)  # what DistributedSampler users may read (len)
        self._resume: tuple[int, int] | None = None  # (epoch, start) for the next pass
        self._counting = False  # after a resume: each pass is the next epoch
        self.passes = 0  # passes begun (a pass begins when iteration starts)

    def set_epoch(self, epoch: int) -> None:
        if not self._counting:
            self.epoch = int(epoch)

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next pass the rest of epoch ``epoch`` from item ``start`` of this rank's share."""
        if not 0 <= int(start) <= self.num_samples:
            raise ValueError(f"resume position {start} is outside this rank's {self.num_samples} training items")
        self._resume = (int(epoch), int(start))

    @property
    def pending(self) -> bool:
        """A resume position is set and its pass has not begun."""
        return self._resume is not None

    def order(self, epoch: int) -> list[int]:
        """This rank's items of epoch ``epoch``, in order."""
        g = torch.Generator().manual_seed(self.seed * 100003 + int(epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas == 1:
            return perm
        pad = self.total_size - self.n
        padded = perm + (perm * math.ceil(pad / max(self.n, 1)))[:pad] if pad else perm
        return padded[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        start = 0
        if self._resume is not None:
            (self.epoch, start), self._resume = self._resume, None
            self._counting = True
        elif self._counting and self.passes:
            self.epoch += 1
        self.passes += 1
        return iter(self.order(self.epoch)[start:])

    def __len__(self):
        return self.num_samples


__all__ = ["EpochSeededSampler"]
