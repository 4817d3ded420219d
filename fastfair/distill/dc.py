"""Gradient matching (DC, Zhao et al. ICLR'21) with any objective; also the DC
versions of IDC (multi-formation: the matched synthetic set is the decoded one)
and DREAM (the real batch comes from :class:`~fastfair.distill.dream.DreamSelector`).

One outer iteration: a fresh network; ``outer_loop`` times: synthetic
per-class gradients with a graph (``class_gradients``); real per-segment
gradients (segment = class * G + group) from one forward and one backward over
the real rows of a block of classes (``fastfair.pergroup.segment_gradients``;
one block of all classes when G = 1 or the objective is vanilla (its
target is the class gradient: segments = classes), else max(1, C // G) classes, so at most
max(C, G) segments' gradients are alive), each block's part of the
objective's ``dc_matching_loss`` differentiated at once; one backward through
the synthetic graph, one SGD step on the images; between matching
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

from typing import Callable, Protocol

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


def block_classes(cfg_block: int | None, num_classes: int, num_groups: int) -> int:
    """Classes matched per block: ``cfg_block``, or max(1, C // G), so a block
    holds at most max(C, G) segments' gradients (vanilla holds C)."""
    return cfg_block or max(1, num_classes // max(1, num_groups))


def _blocked_matching(ctx: RunContext, net: nn.Module, real: Tensor, labels: Tensor, seg: Tensor, G: int,
                      sizes: list[int], syn_grads: tuple[Tensor, ...], x: Tensor,
                      augment: Callable[[Tensor, list[int], int], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The matching loss and its gradient w.r.t. the images ``x``, the real
    per-segment gradients (segment ``seg`` = class * G + group) computed and
    matched a block of classes at a time. ``augment(rows, sizes, first_class)``
    augments a block's real rows just before its pass (None: ``real`` is
    already augmented), so no augmented copy of the whole batch exists.

    The loss is a sum of per-class terms, and each class's term reads only that
    class's G segment gradients and its own synthetic gradient. So the real
    gradients of C x G segments (1000 segments x a width-128 ConvNet at 64 px
    is 2.6 GB) never need to exist at once: each block's loss is
    differentiated w.r.t. detached copies of the synthetic gradients, the
    block's real gradients are dropped, and ONE backward through the
    synthetic graph at the end takes the summed gradients. Same loss and image
    gradient as one block (up to the order of floating-point additions).
    """
    from ..objectives import dc_matching_loss
    from ..pergroup import segment_gradients

    cfg = ctx.cfg
    C = ctx.num_classes
    per = block_classes(cfg.dc_block_classes, C, G)
    leaves = [g.detach().requires_grad_(True) for g in syn_grads]
    starts = [0]
    for n in sizes:  # the real batch is class-major
        starts.append(starts[-1] + n)
    total = torch.zeros((), device=x.device)
    for c0 in range(0, C, per):
        c1 = min(C, c0 + per)
        r0, r1 = starts[c0], starts[c1]
        width = (c1 - c0) * G
        seg_b = seg[r0:r1] - c0 * G
        real_b = real[r0:r1] if augment is None else augment(real[r0:r1], sizes[c0:c1], c0)
        grads = segment_gradients(net, real_b, labels[r0:r1], seg_b, width, chunk=ctx.real_chunk(net, real_b))
        grads, counts = _global_segment_means(tuple(g.detach() for g in grads), seg_b, width)
        loss = dc_matching_loss(grads, counts, [leaf[c0:c1] for leaf in leaves], G,
                                objective=cfg.objective, metric=cfg.dc_metric)
        del grads
        loss.backward()  # into the leaves' .grad only: they are the graph's sole leaves
        total = total + loss.detach()
    pairs = [(g, leaf.grad) for g, leaf in zip(syn_grads, leaves) if leaf.grad is not None]
    if not pairs:  # no class in the batch: nothing to match
        return total, torch.zeros_like(x)
    (grad,) = torch.autograd.grad([g for g, _ in pairs], x, grad_outputs=[d for _, d in pairs],
                                  allow_unused=True)
    return total, torch.zeros_like(x) if grad is None else grad


def dc_iteration(ctx: RunContext, images: Tensor, buf: Tensor | None, it: int,
                 source: BatchSource) -> tuple[Tensor, Tensor, Tensor]:
    """One outer DC iteration; returns (new images, new momentum buffer, mean loss)."""
    from ..objectives import get_objective
    from ..pergroup import class_gradients

    cfg = ctx.cfg
    C = ctx.num_classes
    # A pooled target (vanilla) is the class gradient: one segment per class,
    # not C x G segments pooled afterwards.
    G = 1 if get_objective(cfg.objective).target == "pooled" else ctx.num_groups
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
        # Siamese DSA, one seed per class; the real rows are augmented per
        # block of classes right before their pass.
        syn_aug = ctx.augment_syn(syn, it, ol)
        offsets = batch.offsets

        def augment(rows: Tensor, sizes: list[int], first: int) -> Tensor:
            return ctx.augment_real(rows, sizes, it, ol, real_offsets=offsets, first_class=first)

        if cfg.groups == "pseudo" and G > 1:
            emb = ctx.embed_real_augmented(net, real, batch.sizes, it, ol, real_offsets=offsets)
            groups = ctx.pseudo(emb, batch.sizes)
        seg = labels * G + groups if G > 1 else labels
        # The decoded set is class-major with ctx.syn_sizes rows per class: slices,
        # no host read per class.
        syn_grads = class_gradients(net, syn_aug, ctx.dec_labels, C, create_graph=True,
                                    class_sizes=ctx.syn_sizes)
        loss, grad = _blocked_matching(ctx, net, real, labels, seg, G, batch.sizes, syn_grads, x, augment)
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
