"""Distribution matching (Zhao & Bilen, WACV'23) with any objective.

One iteration: a freshly initialised network (COBRA: first warmed up on the
current synthetic set for ``cobra_warmup_epochs`` epochs, as the COBRA paper
does), ONE forward over the real batch of all classes and one over the
synthetic set, segment sums / counts of the real embeddings per (class, group)
in one pass, the objective's loss from those statistics, one SGD step on the
images. No loop over groups and no host synchronisation (except with
``groups="pseudo"``, whose DBSCAN runs on the host).

Distributed: the real segment sums and counts are all-reduced before the loss
(:func:`fastfair.distributed.segment_sum_count`), so every rank computes the
same loss from exact global statistics on the same (replicated) synthetic set
and the same network; the gradient w.r.t. the synthetic images is therefore
identical on every rank and is NOT reduced (a sum would count it world_size
times, a mean would only add rounding).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed as dist
from .. import ops
from ..objectives import dm_matching_loss
from . import rng
from .context import RunContext
from .synset import sgd_step


def dm_iteration(ctx: RunContext, images: Tensor, buf: Tensor | None, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """One DM iteration; returns (new images, new momentum buffer, loss)."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    if cfg.objective == "cobra" and cfg.cobra_warmup_epochs > 0:
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        ctx.train_on_synset(net, opt, images, ctx.syn_labels, cfg.cobra_warmup_epochs,
                            rng.generator(cfg.seed, it, rng.WARMUP))
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)

    batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE))
    real, labels, groups = ctx.real_batch(batch)
    x = images.detach().requires_grad_(True)
    # Siamese DSA (one seed per class for its real and synthetic rows); the
    # real rows are augmented class by class inside the chunked forward.
    real_emb = ctx.embed_real_augmented(net, real, batch.sizes, it, real_offsets=batch.offsets)
    syn_emb = net.embed(ctx.augment_syn(x, it))
    if cfg.groups == "pseudo":
        groups = ctx.pseudo(real_emb, batch.sizes)

    S, C, G = ctx.num_segments, ctx.num_classes, ctx.num_groups
    seg = labels * G + groups
    real_sum, real_count = dist.segment_sum_count(real_emb, seg, S)
    # Several attributes: the groups the objective is fair over, from the
    # same intersectional sums (no second pass).
    real_sum, real_count, fair_groups = ctx.fair_statistics(real_sum, real_count, C)
    syn_mean = ops.segment_mean(syn_emb, ctx.syn_labels, C)
    syn_count = ops.segment_count(ctx.syn_labels, C)
    loss = dm_matching_loss(real_sum, real_count, syn_mean, syn_count, fair_groups, ctx.objective)
    (grad,) = torch.autograd.grad(loss, x)
    new_images, new_buf = sgd_step(images.detach(), buf, grad, cfg.lr_img, cfg.momentum)
    return new_images, new_buf, loss.detach()
