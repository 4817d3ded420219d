"""CAFE (Wang et al., CVPR'22) with any objective, as COBRA's train_cafe.py
runs it (the loss: fastfair.cafe).

One iteration: a fresh network; ``outer_loop`` times: a fresh per-class real
batch; ONE forward over the real rows of all classes (in chunks; no graph)
whose every aligned layer (fastfair.nets.layer_features) is reduced to
per-(class, group) segment sums at once (one segment op per layer per chunk,
no loop over classes or groups, no host sync); one forward of the synthetic
set with a graph; the objective's layer terms plus the discrimination loss;
one SGD step on the images (momentum 0.5, CAFE's lr schedule: x0.5 at
iterations 1200, 1600, 1800); then ``inner_loop`` epochs of cross-entropy SGD
(lr ``lr_net``) of the network on the synthetic set, as COBRA's code does.

Where fastfair differs from COBRA's train_cafe.py, on purpose (no effect on
the synthetic set):
- COBRA's loop measures the network's accuracy on 256 real images per class
  after every outer step for CAFE's early-stop "watcher", but resets the
  watcher's list every outer step, so it can never stop the loop; fastfair
  skips the measurement.
- COBRA's loop trains the network once more after the last outer step; the
  network is then dropped, so fastfair stops after the last image update (DC
  does the same).
- The vanilla mode adds the real batch's own classification loss
  (cross-entropy of the network's logits on the real rows); it depends on no
  synthetic image and its gradients on the network are cleared before the
  network trains, so fastfair does not compute it.
COBRA's run_cafe.sh passes no DSA strategy, so CAFE distils without DSA here
too (``dsa=True`` turns it on, siamese per class as for DM).

Distributed: the layer sums and counts are all-reduced (exact global
statistics, the same layer loss on every rank); the discrimination loss is a
sum over real rows, so each rank's share of its image gradient is
all-reduced.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed as dist
from .. import ops
from ..attributes import partitions
from ..cafe import cafe_layer_terms, discrimination_terms, lr_at
from ..cafe import real_layer_sums as cafe_real_sums
from ..nets import layer_features
from . import rng
from .context import RunContext
from .synset import sgd_step


def fair_partitions(ctx: RunContext, groups: Tensor) -> list[tuple[Tensor, int]]:
    """The groups the objective is fair over, per real row (fastfair.attributes.partitions)."""
    return partitions(groups, ctx.num_groups, getattr(ctx.dataset, "attributes", None), ctx.cfg.fair_over)


def real_layer_sums(ctx: RunContext, net: torch.nn.Module, real: Tensor, seg: Tensor, num_segments: int,
                    keep_embedding: bool, class_sizes: list[int] | None = None) -> tuple[list[Tensor], Tensor | None]:
    """fastfair.cafe.real_layer_sums with the run's chunk, per class block
    when ``class_sizes`` is given, over all ranks."""
    per = num_segments // ctx.num_classes if class_sizes is not None else None
    # Automatic chunks hold at least as many rows as the segments each writes:
    # a chunk of fewer rows than G writes more (its [G, F] sums) than it reads.
    rows = ctx.cfg.real_chunk or max(ctx.real_chunk(net, real), per or 1)
    # The previous step's sums are overwritten (fastfair.cafe.real_layer_sums: a
    # fresh 65 MB buffer is 65 MB of page faults per step at G = 100).
    sums, emb = cafe_real_sums(net, real, seg, num_segments, rows, keep_embedding, class_sizes, per,
                               out=ctx.cache.get("cafe_real_sums"))
    ctx.cache["cafe_real_sums"] = sums
    if ctx.world_size > 1:
        sums = [dist.all_reduce_sum_(s) for s in sums]
    return sums, emb


def cafe_step_loss(ctx: RunContext, net: torch.nn.Module, x: Tensor, real: Tensor, labels: Tensor,
                   groups: Tensor, it: int, ol: int, class_sizes: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """(loss, its gradient w.r.t. the stored images ``x``) of one CAFE matching
    step; ``class_sizes``: the real rows' class-major sizes (Batch.sizes)."""
    cfg = ctx.cfg
    C = ctx.num_classes
    obj = ctx.objective
    per_group = obj.target != "pooled"
    G = ctx.num_groups if per_group else 1
    seg = labels * G + groups if per_group else labels
    sums, emb = real_layer_sums(ctx, net, real, seg, C * G, keep_embedding=cfg.cafe_inner_weight > 0,
                                class_sizes=class_sizes)
    counts = dist.segment_count(seg, C * G)
    if per_group:
        fair = [ctx.fair_statistics(s, counts, C) for s in sums]
        sums, counts, fg = [f[0] for f in fair], fair[0][1], fair[0][2]
    else:
        fg = 1
    syn_taps = layer_features(net, ctx.augment_syn(x, it, ol))
    if len(syn_taps) != len(cfg.cafe_weights):
        raise ValueError(f"CAFE aligns {len(syn_taps)} layers of this {cfg.model} (depth {cfg.depth}: its block "
                         f"activations and the embedding) but {len(cfg.cafe_weights)} layer weights are set; give "
                         f"cafe_weights (--cafe-weights) with {len(syn_taps)} values, shallow to deep")
    syn_means = [ops.segment_mean(t, ctx.syn_labels, C) for t in syn_taps]
    syn_count = ops.segment_count(ctx.syn_labels, C)
    layer = cafe_layer_terms(sums, counts, syn_means, syn_count, fg, obj, cfg.cafe_weights,
                             cfg.cafe_class_mean).sum()
    if emb is None:
        (grad,) = torch.autograd.grad(layer, x)
        return layer.detach(), grad
    # Global segment sums (all-reduced forward, identity backward) when the
    # rows are one rank's share: every rank sees the same loss, and its
    # gradient holds its own rows' part (summed over the ranks below).
    disc = discrimination_terms(emb, labels, syn_means[-1], C, obj, fair_partitions(ctx, groups) if per_group else (),
                                segment_sum=dist.segment_sum, segment_count=dist.segment_count).sum()
    disc = disc * cfg.cafe_inner_weight
    if ctx.world_size == 1:
        (grad,) = torch.autograd.grad(layer + disc, x)
    else:
        # The layer loss is the same on every rank, the discrimination loss
        # covers this rank's rows only: sum its gradient over the ranks.
        g_layer, g_disc = (torch.autograd.grad(t, x, retain_graph=True)[0] for t in (layer, disc))
        grad = g_layer + dist.all_reduce_sum_(g_disc)
    return (layer + disc).detach(), grad


def cafe_iteration(ctx: RunContext, images: Tensor, buf: Tensor | None, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """One CAFE iteration; returns (new images, new momentum buffer, mean loss)."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    net.train()
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    lr = lr_at(cfg.lr_img, it)
    total = torch.zeros((), device=ctx.device)
    imgs = images.detach()
    for ol in range(cfg.outer_loop):
        batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE, ol))
        real, labels, groups = ctx.real_batch(batch)
        real = ctx.augment_real(real, batch.sizes, it, ol, real_offsets=batch.offsets)
        x = imgs.detach().requires_grad_(True)
        for p in net.parameters():
            p.requires_grad_(False)
        loss, grad = cafe_step_loss(ctx, net, x, real, labels, groups, it, ol, class_sizes=list(batch.sizes))
        for p in net.parameters():
            p.requires_grad_(True)
        imgs, buf = sgd_step(imgs.detach(), buf, grad, lr, cfg.momentum)
        total = total + loss
        if ol == cfg.outer_loop - 1:
            break
        ctx.train_on_synset(net, opt_net, imgs, ctx.syn_labels, cfg.inner_loop,
                            rng.generator(cfg.seed, it, rng.INNER, ol))
    return imgs, buf, total / cfg.outer_loop
