"""The reference-style FairDD steps of the step-time benchmark, written the
way the papers' public code computes the per-group statistics: one group at a
time, with a host sync per class (docs/methods.md, "Cost of the reference
implementation"). :mod:`fastfair.bench.step_time` times them against the
driver's one-pass steps and checks that both give the same image gradient.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import dsa
from ..distill import rng
from ..distill.context import RunContext
from ..distill.synset import sgd_step


def _per_class(ctx: RunContext, sizes: list[int], real: Tensor, groups: Tensor, syn: Tensor, it: int,
               *keys: int) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """(class, augmented real rows, augmented synthetic rows, groups) per class,
    with the DSA seed the driver gives that class (siamese, per class)."""
    cfg = ctx.cfg
    for c, (r, s, g) in enumerate(zip(torch.split(real, sizes), torch.split(syn, ctx.syn_sizes),
                                      torch.split(groups, sizes))):
        if cfg.dsa:
            seed = rng.derive(cfg.seed, it, rng.DSA, *keys, c)
            r, s = dsa(r, seed, cfg.dsa_strategy), dsa(s, seed, cfg.dsa_strategy)
        yield c, r, s, g


def loop_dm_step(ctx: RunContext, images: Tensor, buf: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference-style FairDD DM: per class forwards, per group a masked mean."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE))
    real, _, groups = ctx.real_batch(batch)
    x = images.detach().requires_grad_(True)
    loss = x.new_zeros(())
    for _, r, s, g in _per_class(ctx, batch.sizes, real, groups, x, it):
        out_real = net.embed(r).detach()
        syn_mean = net.embed(s).mean(0)
        for a in torch.unique(g).tolist():  # host sync per class, as in the reference code
            loss = loss + (out_real[g == a].mean(0) - syn_mean).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    new_images, new_buf = sgd_step(images.detach(), buf, grad, cfg.lr_img, cfg.momentum)
    return new_images, new_buf, loss.detach()


def _match_loss(gw_syn: list[Tensor], gw_real: list[Tensor]) -> Tensor:
    """DC's 'ours' distance: per-output-unit 1 - cosine, summed; 1-D parameters add 0."""
    dis = gw_syn[0].new_zeros(())
    for gs, gr in zip(gw_syn, gw_real):
        if gs.dim() <= 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        dis = dis + (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()
    return dis


def loop_dc_step(ctx: RunContext, images: Tensor, buf: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference-style FairDD DC, one matching step: per class one forward of the
    real rows and one synthetic gradient with a graph; per group present one
    ``autograd.grad`` of the group's masked loss through the class graph."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE, 0))
    real, labels, groups = ctx.real_batch(batch)
    y_real = torch.split(labels, batch.sizes)
    x = images.detach().requires_grad_(True)
    loss = x.new_zeros(())
    for c, r, s, g in _per_class(ctx, batch.sizes, real, groups, x, it, 0):
        y_syn = torch.full((s.shape[0],), c, dtype=torch.long, device=s.device)
        gw_syn = list(torch.autograd.grad(F.cross_entropy(net(s), y_syn), params, create_graph=True))
        out_real = net(r)
        present = torch.unique(g).tolist()  # host sync per class
        for k, a in enumerate(present):
            m = g == a
            l_real = F.cross_entropy(out_real[m], y_real[c][m])
            gw_real = torch.autograd.grad(l_real, params, retain_graph=k + 1 < len(present))
            loss = loss + _match_loss(gw_syn, [t.detach() for t in gw_real])
    (grad,) = torch.autograd.grad(loss, x)
    new_images, new_buf = sgd_step(images.detach(), buf, grad, cfg.lr_img, cfg.momentum)
    return new_images, new_buf, loss.detach()
