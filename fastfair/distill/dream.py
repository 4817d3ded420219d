"""DREAM's real batches (Liu et al., ICCV'23, DC version): representative
samples chosen by clustering instead of a random draw.

Every ``dream_interval`` matching steps, a pool of ``dream_pool`` images per
class is embedded by the CURRENT network (one forward over all classes, in
chunks), each class's pool is clustered with k-means (k = the class's real
batch size), and the member nearest each centre enters the batch. Between
re-clusterings the same representative batch is reused (DSA still varies).

k-means runs a fixed number of Lloyd iterations from a seeded initialisation,
with the centre update done by ``fastfair.ops.segment_mean``, so it needs no
host synchronisation. The loop over classes here runs once per re-clustering,
not per step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import rng
from .context import RunContext
from .sampler import Batch

_EMBED_CHUNK = 1024


def kmeans_representatives(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Indices (into the rows of ``x`` [P, D]) of one representative per cluster.

    The representative of a cluster is its member nearest the centre; an empty
    cluster (possible after an update) keeps its previous centre and takes the
    nearest row overall, so the result always has ``k`` entries.
    """
    p = x.shape[0]
    k = min(k, p)
    init = torch.randperm(p, generator=gen)[:k].to(x.device)
    centres = x[init].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        counts = ops.segment_count(assign, k)
        means = ops.segment_mean(x, assign, k)
        centres = torch.where((counts > 0).unsqueeze(1), means, centres)
    d = torch.cdist(x, centres)                                 # [P, k]
    assign = d.argmin(1)
    own = torch.where(assign.unsqueeze(1) == torch.arange(k, device=x.device), d, torch.full_like(d, float("inf")))
    has = ops.segment_count(assign, k) > 0
    return torch.where(has, own.argmin(0), d.argmin(0))


class DreamSelector:
    """Real-batch source for DC with DREAM's clustered sampling; its cache of
    chosen indices travels in the checkpoint so a resumed run reuses it."""

    def __init__(self) -> None:
        self.cached: Batch | None = None

    def batch(self, ctx: RunContext, net: nn.Module, it: int, step: int) -> Batch:
        cfg = ctx.cfg
        global_step = it * cfg.outer_loop + step
        if self.cached is None or global_step % cfg.dream_interval == 0:
            self.cached = self._recluster(ctx, net, it, step)
        return self.cached

    @torch.no_grad()
    def _recluster(self, ctx: RunContext, net: nn.Module, it: int, step: int) -> Batch:
        cfg = ctx.cfg
        pool = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.KMEANS, step), per_class=cfg.dream_pool)
        imgs, _, _ = ctx.real_batch(pool)
        was_training = net.training
        net.eval()
        emb = torch.cat([net.embed(imgs[i:i + _EMBED_CHUNK]) for i in range(0, imgs.shape[0], _EMBED_CHUNK)])
        net.train(was_training)
        want = ctx.sampler.local_sizes(cfg.batch_real)
        gen = rng.generator(cfg.seed, it, rng.KMEANS, step, 1)
        pool_idx = pool.indices.to(ctx.device)  # keep the pick on the device: no sync
        chosen, sizes, start = [], [], 0
        for c, n in enumerate(pool.sizes):
            k = min(want[c], n)
            rows = kmeans_representatives(emb[start:start + n], k, cfg.dream_kmeans_iters, gen)
            chosen.append(pool_idx[start:start + n][rows])
            sizes.append(k)
            start += n
        # Rank r's representatives stand where its share of a batch_real batch
        # would: DSA gives them the parameters of those global rows (disjoint
        # across ranks, since a rank never picks more than that share).
        return Batch(torch.cat(chosen), sizes, ctx.sampler.local_offsets(cfg.batch_real))

    def state_dict(self) -> dict:
        if self.cached is None:
            return {}
        return {"indices": self.cached.indices, "sizes": list(self.cached.sizes), "offsets": self.cached.offsets}

    def load_state_dict(self, state: dict) -> None:
        self.cached = Batch(state["indices"], list(state["sizes"]), state.get("offsets")) if state else None
