"""Gradient matching (DC, Zhao et al. ICLR'21) with any objective; also the DC
versions of IDC (multi-formation: the matched synthetic set is the decoded one)
and DREAM (the real batch comes from :class:`~fastfair.distill.dream.DreamSelector`).

One outer iteration: a fresh network; ``outer_loop`` times: real per-segment
gradients (segment = class * G + group) from ONE forward and ONE backward over
the real batch of all classes (``fastfair.pergroup.segment_gradients``),
synthetic per-class gradients with a graph (``class_gradients``), the
objective's ``dc_matching_loss``, one SGD step on the images; between matching
steps the network trains ``inner_loop`` epochs on the detached synthetic set
(SGD lr ``lr_net``, DSA), as the DC code does.

Distributed: each rank turns its segment MEAN gradients back into SUMS
(mean x local count), the sums and counts are all-reduced, then divided by the
global counts: exact global means. The synthetic gradients are computed on the
full, replicated synthetic set, so every rank computes the same loss and the
same image gradient (and trains the same inner network); nothing else is
reduced.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .. import ops
from . import rng
from .context import RunContext
from .sampler import Batch
from .synset import decode, sgd_step


class BatchSource(Protocol):
    def batch(self, ctx: RunContext, net: nn.Module, it: int, step: int) -> Batch: ...


class RandomBatches:
    """The plain DC real batch: a fresh per-class draw for every matching step."""

    def batch(self, ctx: RunContext, net: nn.Module, it: int, step: int) -> Batch:
        return ctx.sampler.draw(rng.generator(ctx.cfg.seed, it, rng.SAMPLE, step))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _global_segment_means(grads: tuple[Tensor, ...], seg: Tensor, num_segments: int) -> tuple[tuple[Tensor, ...], Tensor]:
    """Per-segment mean gradients over ALL ranks, and the global counts."""
    local = ops.segment_count(seg, num_segments)
    if dist.world_size() == 1:
        return grads, local
    counts = dist.all_reduce_sum_(local.clone())
    out = []
    for g in grads:
        shape = (-1,) + (1,) * (g.dim() - 1)
        total = dist.all_reduce_sum_((g * local.to(g.dtype).view(shape)).contiguous())
        out.append(total / counts.clamp(min=1).to(g.dtype).view(shape))
    return tuple(out), counts


def dc_iteration(ctx: RunContext, images: Tensor, buf: Tensor | None, it: int,
                 source: BatchSource) -> tuple[Tensor, Tensor, Tensor]:
    """One outer DC iteration; returns (new images, new momentum buffer, mean loss)."""
    from ..objectives import dc_matching_loss
    from ..pergroup import class_gradients, segment_gradients

    cfg = ctx.cfg
    S, C, G = ctx.num_segments, ctx.num_classes, ctx.num_groups
    net = ctx.new_network(it)
    net.train()
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    total = torch.zeros((), device=ctx.device)
    imgs = images.detach()
    for ol in range(cfg.outer_loop):
        batch = source.batch(ctx, net, it, ol)
        real, labels, groups = ctx.real_batch(batch)
        x = imgs.detach().requires_grad_(True)
        syn = decode(x, ctx.factor)
        real_aug, syn_aug = ctx.siamese(real, batch.sizes, syn, it, ol, real_offsets=batch.offsets)
        if cfg.groups == "pseudo":
            groups = ctx.pseudo(ctx.embed_real(net, real_aug), batch.sizes)
        seg = labels * G + groups
        real_grads = segment_gradients(net, real_aug, labels, seg, S, chunk=ctx.real_chunk(net, real_aug))
        real_grads, counts = _global_segment_means(tuple(g.detach() for g in real_grads), seg, S)
        syn_grads = class_gradients(net, syn_aug, ctx.dec_labels, C, create_graph=True)
        loss = dc_matching_loss(real_grads, counts, syn_grads, G, objective=cfg.objective, metric=cfg.dc_metric)
        (grad,) = torch.autograd.grad(loss, x)
        imgs, buf = sgd_step(imgs.detach(), buf, grad, cfg.lr_img, cfg.momentum)
        total = total + loss.detach()
        if ol == cfg.outer_loop - 1:
            break
        # Train the network on the updated synthetic set (DC's inner loop).
        for p in net.parameters():
            p.grad = None
        ctx.train_on_synset(net, opt_net, decode(imgs, ctx.factor), ctx.dec_labels, cfg.inner_loop,
                            rng.generator(cfg.seed, it, rng.INNER, ol))
    return imgs, buf, total / cfg.outer_loop
