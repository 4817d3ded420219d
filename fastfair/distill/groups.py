"""Imperfect group labels, as in the FairDD paper's robustness study.

* :func:`noisy_groups` (Table 17): a fraction P of the real training samples get
  a wrong group, drawn uniformly from the OTHER groups, so P is exactly the
  fraction of wrong labels. Fixed for the whole run (drawn once from the seed).
* :func:`pseudo_groups` (Table 18): no group labels at all; each class's real
  batch is clustered with DBSCAN (scikit-learn) on its embeddings and the
  cluster ids serve as groups (DBSCAN's noise points form one extra group). This runs on the host, so it necessarily
  synchronises with the device once per class batch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import rng


def noisy_groups(groups: Tensor, num_groups: int, fraction: float, seed: int) -> Tensor:
    """A copy of ``groups`` where round(fraction * N) samples (chosen from the
    seed) carry a different, uniformly random group."""
    out = groups.detach().clone()
    n = out.numel()
    k = int(round(fraction * n))
    if k == 0 or num_groups < 2:
        return out
    gen = rng.generator(seed, 0, rng.NOISE)
    pick = torch.randperm(n, generator=gen)[:k]
    shift = torch.randint(1, num_groups, (k,), generator=gen)
    out_cpu = out.cpu()
    out_cpu[pick] = (out_cpu[pick] + shift) % num_groups
    return out_cpu.to(groups.device)


def _auto_eps(x: np.ndarray, min_samples: int) -> float:
    """The 90th percentile of the distance to the ``min_samples``-th nearest
    neighbour: most points become core points whatever the embedding scale,
    and only the sparsest tenth (isolated minority samples) can be noise."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(x)
    k = min(min_samples, x.shape[0] - 1)
    kth = np.sort(d, axis=1)[:, k]
    eps = float(np.quantile(kth, 0.9))
    return eps if eps > 0 else 1e-6


def _cluster_one(x: np.ndarray, max_groups: int, eps: float | None, min_samples: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    n = x.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    e = _auto_eps(x, min_samples) if eps is None else eps
    lab = DBSCAN(eps=e, min_samples=min(min_samples, n)).fit(x).labels_
    clustered = lab >= 0
    if not clustered.any():
        return np.zeros(n, dtype=np.int64)
    # Largest cluster first; DBSCAN's noise points (typically the rare members
    # of a minority group: too few to be dense) form one more group of their
    # own, so FairDD still matches them; ids past the capacity merge into the last.
    ids, counts = np.unique(lab[clustered], return_counts=True)
    rank_of = {int(i): r for r, i in enumerate(ids[np.argsort(-counts, kind="stable")])}
    rank_of[-1] = len(ids)
    return np.array([min(rank_of[int(v)], max_groups - 1) for v in lab], dtype=np.int64)


def pseudo_groups(emb: Tensor, sizes: list[int], max_groups: int, eps: float | None = None,
                  min_samples: int = 5) -> Tensor:
    """DBSCAN cluster ids, per class block of the class-major rows of ``emb``.

    ``sizes`` are the rows per class; ids lie in [0, max_groups). Syncs with
    the device (the clustering runs in scikit-learn on the host).
    """
    x = emb.detach().float().cpu().numpy()
    out, start = [], 0
    for n in sizes:
        out.append(_cluster_one(x[start:start + n], max_groups, eps, min_samples))
        start += n
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.int64)).to(emb.device)
