"""Every random number of a run, derived from (seed, iteration, purpose, ...).

Nothing in the driver reads the global RNG state that an earlier iteration
advanced: each draw comes from a fresh ``torch.Generator`` (or a forked global
RNG, for network initialisation) seeded by :func:`derive`. An iteration is
therefore a pure function of the run's seed, its index and the state carried in
the checkpoint, which is what makes ``resume`` give the uninterrupted result.
"""
from __future__ import annotations

import torch
from torch import nn

# Purposes ("streams"): distinct constants keep the draws of different jobs apart.
INIT = 1
NET = 2
SAMPLE = 3
DSA = 4
INNER = 5
WARMUP = 6
KMEANS = 7
NOISE = 8

_MASK = (1 << 62) - 1


def derive(seed: int, iteration: int, stream: int, *more: int) -> int:
    """A 62-bit seed for one purpose at one iteration (and sub-step, class, ...).

    Starts from ``seed * 1_000_003 + iteration`` and mixes each further key in
    with a splitmix64-style multiply/xor, so nearby keys give unrelated seeds.
    """
    x = (int(seed) * 1_000_003 + int(iteration)) & _MASK
    for k in (stream, *more):
        x = (x ^ (int(k) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 31)) & _MASK
    return x


def generator(seed: int, iteration: int, stream: int, *more: int) -> torch.Generator:
    """CPU generator seeded by :func:`derive` (CPU draws are reproducible across devices)."""
    return torch.Generator().manual_seed(derive(seed, iteration, stream, *more))


def make_network(build, seed: int) -> nn.Module:  # noqa: ANN001
    """Call ``build()`` with the global CPU RNG seeded by ``seed``, restoring it after.

    Networks are created on CPU and moved by the caller, so their initial
    weights do not depend on the device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
