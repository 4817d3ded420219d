"""Real batches: per class, like the reference code, with static shapes.

The reference DM/DC code draws ``batch_real`` images of each class with a
random permutation of the class, so group sizes inside a class batch follow the
(biased) data. A class with fewer images than ``batch_real`` contributes ALL
its images (no replacement: a duplicate would only re-weight the group means),
as ``np.random.permutation(indices)[:n]`` does in the reference code.
``sample_per_group=True`` instead splits each class batch evenly over the
groups present in the class (water-filling: a group with too few images gives
all it has and the others share the rest).

Indices are drawn on the CPU from a generator the caller seeds per iteration,
so drawing costs no device synchronisation, and the per-class batch sizes are
fixed at construction (static shapes: the DSA split and the network forward
never need a size read back from the device).

Distributed runs: every rank makes the SAME draw (same generator seed) and
keeps its contiguous share of each class (``fastfair.distributed.shard``), so
the union over ranks is exactly the one-process batch. ``Batch.offsets`` says
where this rank's rows of each class start in the global class batch: DSA
draws a real row's parameters by that global position
(``fastfair.augment.dsa(..., offset=)``), so a row is augmented the same way
whichever rank holds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed import shard


@dataclass
class Batch:
    """Local real batch: ``indices`` into the train split, class-major, the
    number of rows of each class (python ints, static) and, per class, the
    position of this rank's first row in the global class batch (None: all 0,
    a single process)."""

    indices: Tensor
    sizes: list[int]
    offsets: list[int] | None = None

    def row_offsets(self) -> list[int]:
        """``offsets``, with None spelled out as zeros."""
        return list(self.offsets) if self.offsets is not None else [0] * len(self.sizes)


def _water_fill(total: int, capacity: list[int]) -> list[int]:
    """Split ``total`` as evenly as possible over bins of the given capacities."""
    quota = [0] * len(capacity)
    left = min(total, sum(capacity))
    open_bins = [i for i, c in enumerate(capacity) if c > 0]
    while left > 0 and open_bins:
        share, extra = divmod(left, len(open_bins))
        for j, i in enumerate(open_bins):
            give = min(capacity[i] - quota[i], share + (1 if j < extra else 0))
            quota[i] += give
            left -= give
        open_bins = [i for i in open_bins if quota[i] < capacity[i]]
    return quota


class RealSampler:
    """Draws class-major real batches (see module docstring)."""

    def __init__(self, labels: Tensor, groups: Tensor, num_classes: int, num_groups: int,
                 batch_real: int, sample_per_group: bool = False, rank: int = 0, world_size: int = 1) -> None:
        labels = labels.detach().cpu().long()
        groups = groups.detach().cpu().long()
        self.num_classes, self.num_groups = num_classes, num_groups
        self.batch_real = batch_real
        self.sample_per_group = sample_per_group
        self.rank, self.world_size = rank, world_size
        order = torch.argsort(labels * num_groups + groups, stable=True)
        self.class_pool: list[Tensor] = []
        self.cell_pool: list[list[Tensor]] = []
        for c in range(num_classes):
            mask = labels[order] == c
            pool = order[mask]
            if pool.numel() == 0:
                raise ValueError(f"class {c} has no training images")
            self.class_pool.append(pool)
            g = groups[pool]
            self.cell_pool.append([pool[g == a] for a in range(num_groups)])
        self.class_sizes = [int(p.numel()) for p in self.class_pool]
        self._quota_cache: dict[int, list[list[int]]] = {}

    def _quotas(self, per_class: int) -> list[list[int]]:
        if per_class not in self._quota_cache:
            self._quota_cache[per_class] = [
                _water_fill(per_class, [int(p.numel()) for p in cells]) for cells in self.cell_pool
            ]
        return self._quota_cache[per_class]

    def global_sizes(self, per_class: int | None = None) -> list[int]:
        """Rows per class of the full (all ranks) batch."""
        b = self.batch_real if per_class is None else per_class
        return [min(b, n) for n in self.class_sizes]

    def local_sizes(self, per_class: int | None = None) -> list[int]:
        """Rows per class on this rank (tensor_split chunk sizes)."""
        w, r = self.world_size, self.rank
        return [n // w + (1 if r < n % w else 0) for n in self.global_sizes(per_class)]

    def local_offsets(self, per_class: int | None = None) -> list[int]:
        """Where this rank's rows of each class start in the global class batch
        (the rows of the ranks before it; tensor_split's chunk boundaries)."""
        w, r = self.world_size, self.rank
        return [r * (n // w) + min(r, n % w) for n in self.global_sizes(per_class)]

    def draw(self, gen: torch.Generator, per_class: int | None = None) -> Batch:
        """One batch: ``per_class`` (default ``batch_real``) rows of every class,
        this rank's share of it. All ranks must pass identically seeded ``gen``."""
        b = self.batch_real if per_class is None else per_class
        parts = []
        for c, pool in enumerate(self.class_pool):
            if self.sample_per_group:
                quotas = self._quotas(b)[c]
                idx = torch.cat([cell[torch.randperm(cell.numel(), generator=gen)[:q]]
                                 for cell, q in zip(self.cell_pool[c], quotas)])
            else:
                idx = pool[torch.randperm(pool.numel(), generator=gen)[:b]]
            idx = shard(idx, self.rank, self.world_size)
            parts.append(idx)
        return Batch(torch.cat(parts), self.local_sizes(b), self.local_offsets(b))
