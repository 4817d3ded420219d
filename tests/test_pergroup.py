"""One-pass per-segment gradients and the DC matching loss against loops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfair import objectives, pergroup
from fastfair.nets import get_network


def loop_grads(model, x, y, ids, s):
    params = [p for p in model.parameters() if p.requires_grad]
    out = [torch.zeros(s, *p.shape, dtype=p.dtype) for p in params]
    for k in range(s):
        m = ids == k
        if m.any():
            gs = torch.autograd.grad(F.cross_entropy(model(x[m]), y[m]), params)
            for o, g in zip(out, gs):
                o[k] = g
    return out


def layout(n, s, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s - 2, (n,), generator=g)  # the last two segments stay empty
    ids[0] = s - 3  # ...and make sure one is a singleton when n is small
    return ids


MODELS = {
    "convnet": lambda: get_network("ConvNet", 3, 4, 16, width=8, depth=3),
    "conv_variants": lambda: nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.GroupNorm(5, 5), nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2)), nn.Flatten(), nn.LazyLinear(4)),
    "mlp_layernorm": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 12), nn.LayerNorm(12), nn.ReLU(),
                                           nn.Linear(12, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_segment_gradients_match_loop(name, dtype, tol):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(29, 3, 16, 16)
    model(x)  # materialise lazy layers
    model = model.to(dtype)
    x = x.to(dtype)
    y = torch.randint(0, 4, (29,))
    ids = layout(29, 9, seed=1)
    got = pergroup.segment_gradients(model, x, y, ids, 9)
    want = loop_grads(model, x, y, ids, 9)
    assert len(got) == len(want)
    # A conv bias followed by instance norm has an exactly-zero gradient (the
    # norm removes per-channel shifts): measure such rounding-level values
    # against the scale of the whole gradient.
    scale = max(w.norm().item() for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = ((g - w).norm() / max(w.norm().item(), 1e-3 * scale)).item()
        assert err <= tol, err
    assert all((g[-2:] == 0).all() for g in got)
    loop = pergroup.segment_gradients(model, x, y, ids, 9, fallback="loop")
    for g, w in zip(loop, want):
        torch.testing.assert_close(g, w)


def test_batchnorm_is_refused_with_layer_name():
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=2, norm="batchnorm")
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match=r"features\.1.*couples the samples"):
        pergroup.segment_gradients(model, x, y, torch.zeros(6, dtype=torch.long), 1)
    got = pergroup.segment_gradients(model, x, y, torch.zeros(6, dtype=torch.long), 1, fallback="loop")
    assert len(got) == len(list(model.parameters()))


def loop_dc_loss(real_grads, counts, syn_grads, C, G, objective, metric):
    def dist(rs, ss):
        if metric == "mse":
            return sum(((r - s) ** 2).sum() for r, s in zip(rs, ss))
        if metric == "cos":
            a = torch.cat([r.flatten() for r in rs]); b = torch.cat([s.flatten() for s in ss])
            return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6)
        tot = 0
        for r, s in zip(rs, ss):
            if r.dim() == 1:
                continue
            r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
            tot = tot + (1 - (r2 * s2).sum(-1) / (r2.norm(dim=-1) * s2.norm(dim=-1) + 1e-6)).sum()
        return tot

    total = 0
    for c in range(C):
        present = [g for g in range(G) if counts[c * G + g] > 0]
        if not present:
            continue
        syn = [s[c] for s in syn_grads]
        groups = [[r[c * G + g] for r in real_grads] for g in present]
        n = torch.tensor([float(counts[c * G + g]) for g in present], dtype=torch.float64)
        if objective == "vanilla":
            tgt = [sum(grp[i] * n[j] for j, grp in enumerate(groups)) / n.sum() for i in range(len(syn))]
            total = total + dist(tgt, syn)
        elif objective == "cobra":
            tgt = [sum(grp[i] for grp in groups) / len(groups) for i in range(len(syn))]
            total = total + dist(tgt, syn)
        else:
            terms = torch.stack([dist(grp, syn) for grp in groups])
            w = {"fairdd": torch.ones_like(n), "fairdd-iw": (1 / n) / (1 / n).mean(),
                 "fairdd-ldam": n ** -0.25 / (n ** -0.25).mean()}.get(objective)
            total = total + (terms.max() if objective == "fairdd-groupdro" else (w * terms).sum())
    return total


@pytest.mark.parametrize("objective", list(objectives.OBJECTIVES))
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_dc_matching_loss_matches_loop(objective, metric):
    C, G = 3, 4
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3, 3, 3), (5,), (4, 20)]
    real = [torch.randn(C * G, *sh, generator=g, dtype=torch.float64) for sh in shapes]
    counts = torch.tensor([5, 0, 2, 1, 0, 0, 0, 0, 7, 7, 0, 1])  # class 1 has no real rows
    syn = [torch.randn(C, *sh, generator=g, dtype=torch.float64, requires_grad=True) for sh in shapes]
    got = objectives.dc_matching_loss(real, counts, syn, G, objective, metric)
    want = loop_dc_loss(real, counts, syn, C, G, objective, metric)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, syn, allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want, syn, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_class_gradients_carry_autograd():
    model = get_network("ConvNet", 3, 3, 16, width=8, depth=2)
    syn = torch.randn(6, 3, 16, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grads = pergroup.class_gradients(model, syn, labels, 3)
    assert [g.shape[0] for g in grads] == [3] * len(grads)
    (gx,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), syn)
    assert gx.abs().sum() > 0
