"""Gradient matching (DC, Zhao et al. ICLR'21) with any objective; also the DC
versions of IDC (multi-formation: the matched synthetic set is the decoded one)
and DREAM (the real batch comes from :class:`~fastfair.distill.dream.DreamSelector`).

One outer iteration: a fresh network; ``outer_loop`` times: synthetic
per-class gradients with a graph (``class_gradients``); real per-segment
gradients (segment = class * G + group) from one forward and one backward over
the real rows of a block of classes (``fastfair.pergroup.segment_gradients``;
as many classes per block as the memory free allows (:func:`block_classes`):
one block of all classes whenever the C x G segment gradients fit, which is
every C-MNIST-sized run), each block's part of the
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
from .synset import sgd_step


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


# Copies of a segment's gradient alive while a block is matched: the
# gradients segment_gradients returns, their detached (global) means, and the
# matching loss's temporaries (normalised rows and their products); measured
# in benchmarks/NOTES.md ("DC class blocking").
LIVE_COPIES = 4
# The share of the free memory a block's segment gradients may take: the rest
# stays for the synthetic graph, the chunked forward/backward and the allocator.
MEMORY_SHARE = 0.25


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: the CUDA allocator's view of the GPU
    (cudaMemGetInfo), or the memory available to a new allocation on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from ..sizes import available_bytes

    return available_bytes()


def block_classes(cfg_block: int | None, num_classes: int, num_groups: int, param_bytes: int,
                  free_bytes: int) -> int:
    """Classes matched per block: ``cfg_block`` when set, else as many as
    fit: a class's G segment gradients take ``G * param_bytes * LIVE_COPIES``
    bytes, and a block may use ``MEMORY_SHARE`` of ``free_bytes``. One block
    when everything fits (C = G = 10 at width 128: 0.5 GB), at least one class."""
    if cfg_block:
        return cfg_block
    per_class = max(1, num_groups) * max(1, param_bytes) * LIVE_COPIES
    return max(1, min(num_classes, int(free_bytes * MEMORY_SHARE) // per_class))


def auto_block_classes(ctx: RunContext, net: nn.Module, num_groups: int) -> int:
    """:func:`block_classes` for this run's network and device (the free
    memory is read once per run: the blocking, hence the order of the
    floating-point sums, stays fixed while it runs). Under the compact
    layout a class holds at most min(G, its real rows) segments, and that
    is what a block must hold (G = 1000, 256 rows a class: 256)."""
    if ctx.cfg.dc_block_classes:
        return ctx.cfg.dc_block_classes
    key = ("dc_block_classes", num_groups)
    if key not in ctx.cache:
        param_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        held = num_groups
        if compact_layout(num_groups, ctx.cfg.fair_over):  # at most one present segment per real row
            held = min(num_groups, max(ctx.sampler.global_sizes(), default=num_groups))
        ctx.cache[key] = block_classes(None, ctx.num_classes, held, param_bytes,
                                       free_memory_bytes(ctx.device))
    return ctx.cache[key]


def _fair_means(ctx: RunContext, grads: tuple[Tensor, ...], counts: Tensor, classes: int,
                G: int) -> tuple[tuple[Tensor, ...], Tensor, int]:
    """Segment mean gradients of ``classes`` classes x G intersectional groups
    to the groups the objective is fair over (ctx.fair_statistics): means
    back to sums, summed over the groups a fair group covers, divided by its
    count. Unchanged for ``intersection`` and for one-segment-per-class (G = 1)."""
    if G == 1 or ctx.cfg.fair_over == "intersection":
        return grads, counts, G
    out, new_counts, fair_groups = [], counts, G
    for g in grads:
        shape = (-1,) + (1,) * (g.dim() - 1)
        sums = g * counts.to(g.dtype).view(shape)
        s, new_counts, fair_groups = ctx.fair_statistics(sums, counts, classes)
        out.append(s / new_counts.clamp(min=1).to(g.dtype).view(shape))
    return tuple(out), new_counts, fair_groups


# False: every (class, group) segment's gradient is computed and matched, as
# before the compact layout (kept for comparison: tests, benchmarks).
COMPACT_SEGMENTS = True


def compact_layout(num_groups: int, fair_over: str) -> bool:
    """Whether DC matches only the (class, group) segments present in the
    batch: one process (ranks would hold different segments, and their dense
    sums are all-reduced), fair over the intersection (the marginal
    regrouping works on the dense layout), more than one group. Same loss and
    image gradient as the dense layout up to the order of floating-point
    additions. The driver and fastfair.nn.FairGradientMatching both ask here."""
    return COMPACT_SEGMENTS and num_groups > 1 and dist.world_size() == 1 and fair_over == "intersection"


def present_segment_gradients(net: nn.Module, real: Tensor, labels: Tensor, seg: Tensor,
                              chunk: int | str | None) -> tuple[tuple[Tensor, ...], Tensor]:
    """Mean gradients (detached) of the segments present in ``seg`` only, one
    row per present segment in increasing id order, and those ids: at G = 100
    a batch of 2560 holds ~200 of 1000 (class, group) cells, and the other
    800 gradients would be zeros written, held and matched for nothing. One
    host read (``torch.unique``)."""
    from ..pergroup import segment_gradients

    present, rows = torch.unique(seg, sorted=True, return_inverse=True)
    if not present.numel():  # no real row: every class is skipped
        return tuple(p.new_zeros((0, *p.shape)) for p in net.parameters() if p.requires_grad), present
    grads = segment_gradients(net, real, labels, rows, present.numel(), chunk=chunk)
    return tuple(g.detach() for g in grads), present


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
    per = auto_block_classes(ctx, net, G)
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
        chunk = ctx.real_chunk(net, real_b)
        if compact_layout(G, cfg.fair_over):
            grads, present = present_segment_gradients(net, real_b, labels[r0:r1], seg_b, chunk)
            loss = dc_matching_loss(grads, ops.segment_count(seg_b, width),
                                    [leaf[c0:c1] for leaf in leaves], G, objective=ctx.objective,
                                    metric=cfg.dc_metric, segments=present)
        else:
            grads = segment_gradients(net, real_b, labels[r0:r1], seg_b, width, chunk=chunk)
            grads, counts = _global_segment_means(tuple(g.detach() for g in grads), seg_b, width)
            grads, counts, fair_groups = _fair_means(ctx, grads, counts, c1 - c0, G)
            loss = dc_matching_loss(grads, counts, [leaf[c0:c1] for leaf in leaves], fair_groups,
                                    objective=ctx.objective, metric=cfg.dc_metric)
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
        syn = ctx.decode(x)
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
        ctx.train_on_synset(net, opt_net, ctx.decode(imgs), ctx.dec_labels, cfg.inner_loop,
                            rng.generator(cfg.seed, it, rng.INNER, ol))
    return imgs, buf, total / cfg.outer_loop
