"""The end-to-end paths on a GPU, against the same computation in float64 on
the CPU: fair_dm_loss, chunked segment_gradients, the fastfair.nn modules, the
DC driver's blocked matching, and whole DM / DC distillations (fp32 and the
bf16 grouped-GEMM weight gradients). Every test name carries "cuda" so the
GPU script's ``-k cuda`` selects them; all skip without a GPU (CI runs the CPU
versions of the same checks in the other files)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastfair import data, distill, ops, wgrad
from fastfair.distill import dc
from fastfair.distill.context import build_context
from fastfair.nets import get_network
from fastfair.nn import FairDMLoss, FairGradientMatching
from fastfair.objectives import dc_matching_loss
from fastfair.pergroup import class_gradients, segment_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

C, G = 4, 3


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-4) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / max(b.norm().item(), floor))


def _dm_batch(seed: int = 0, n: int = 200, d: int = 33):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 1, (n,), generator=g)  # class C-1: no real rows
    groups = torch.multinomial(torch.tensor([6.0, 1.0, 0.0]), n, True, generator=g)  # group 2 absent
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    syn_labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    syn = torch.randn(7, d, generator=g, dtype=torch.float64)
    return real, labels, groups, syn, syn_labels


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "fairdd-mean", "cobra"])
def test_cuda_fair_dm_loss_equals_cpu_float64(objective: str) -> None:
    real, labels, groups, syn, syn_labels = _dm_batch()
    s64 = syn.clone().requires_grad_(True)
    want = ops.fair_dm_loss(real, labels, groups, s64, syn_labels, C, G, objective)
    (gwant,) = torch.autograd.grad(want, s64)
    s32 = syn.float().cuda().requires_grad_(True)
    with ops.validate_ids(False):  # the driver's hot-loop setting
        got = ops.fair_dm_loss(real.float().cuda(), labels.cuda(), groups.cuda(), s32, syn_labels.cuda(), C, G,
                               objective)
        (ggot,) = torch.autograd.grad(got, s32)
    assert got.is_cuda and _rel(got, want) <= 1e-5
    assert _rel(ggot, gwant) <= 1e-5


def test_cuda_fair_dm_loss_module_equals_cpu() -> None:
    real, labels, groups, syn, syn_labels = _dm_batch(1)
    loss = FairDMLoss(C, G, "fairdd", reduction="none")
    want = loss(real, labels, groups, syn, syn_labels)
    got = loss(real.float().cuda(), labels.cuda(), groups.cuda(), syn.float().cuda(), syn_labels.cuda())
    assert got.shape == (C,) and _rel(got, want) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_cuda_chunked_segment_gradients_equal_cpu_float64(precision: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, C, 16, width=8, depth=2).double()
    n, s = 50, 9
    x = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, C, (n,))
    ids = torch.randint(0, s - 1, (n,))  # segment s-1 stays empty
    want = segment_gradients(net, x, y, ids, s)
    net32 = get_network("ConvNet", 3, C, 16, width=8, depth=2)
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    net32 = net32.cuda()
    with wgrad.weight_grad_precision(precision), ops.validate_ids(False):
        got = segment_gradients(net32, x.float().cuda(), y.cuda(), ids.cuda(), s, chunk=chunk)
    tol = 2e-2 if precision == "bf16" else 1e-4  # bf16 weight gradients: ~3e-3 relative (NOTES)
    # The conv biases in front of instance norm get ~0 gradients: a floor of
    # 1e-3 of the whole gradient's norm keeps their rounding noise out.
    floor = 1e-3 * float(torch.sqrt(sum(b.pow(2).sum() for b in want)))
    for a, b in zip(got, want):
        assert a.is_cuda and a.shape == b.shape
        assert _rel(a, b, floor) <= tol
        assert torch.all(a[s - 1] == 0)


def test_cuda_gradient_matching_module_equals_cpu_float64() -> None:
    torch.manual_seed(1)
    net = get_network("ConvNet", 3, C, 8, width=5, depth=2).double()
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (40,), generator=g)
    groups = torch.randint(0, G, (40,), generator=g)
    syn = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(C).repeat_interleave(2)
    want = FairGradientMatching(net, C, G, "fairdd", reduction="none")(real, labels, groups, syn, syn_labels)
    net32 = get_network("ConvNet", 3, C, 8, width=5, depth=2)
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    got = FairGradientMatching(net32.cuda(), C, G, "fairdd", reduction="none")(
        real.float().cuda(), labels.cuda(), groups.cuda(), syn.float().cuda(), syn_labels.cuda())
    assert got.is_cuda and _rel(got, want) <= 1e-3


@pytest.mark.parametrize("block", [1, 2, None])
def test_cuda_blocked_matching_equals_all_classes_at_once(block: int | None) -> None:
    opts = {"num_classes": 3, "num_groups": 3, "image_size": 8, "n_per_class": 30}
    ds = data.load("synthetic", bias_ratio=0.8, **opts)
    cfg = distill.config.resolve(distill.DistillConfig(
        dataset="synthetic", method="dc", objective="fairdd", ipc=2, iterations=1, dc_block_classes=block,
        extra={"data_options": opts}))
    ctx = build_context(cfg, ds, torch.device("cuda"))
    torch.manual_seed(7)
    net = get_network("ConvNet", 3, 3, 8, width=5, depth=2).cuda()
    sizes = [7, 0, 5]
    labels = torch.tensor([0] * 7 + [2] * 5, device="cuda")
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 1] + [2, 0, 1, 2, 2], device="cuda")
    real = torch.randn(12, 3, 8, 8, device="cuda")
    seg = labels * 3 + groups
    x = torch.randn(6, 3, 8, 8, device="cuda", requires_grad=True)
    syn_labels = torch.arange(3, device="cuda").repeat_interleave(2)
    syn_grads = class_gradients(net, x * 1.5, syn_labels, 3, create_graph=True)
    with ops.validate_ids(False):
        loss, grad = dc._blocked_matching(ctx, net, real, labels, seg, 3, sizes, syn_grads, x)
    real_grads = segment_gradients(net, real, labels, seg, 9)
    syn_ref = class_gradients(net, x * 1.5, syn_labels, 3, create_graph=True)
    want = dc_matching_loss(real_grads, torch.bincount(seg, minlength=9), syn_ref, 3, objective="fairdd")
    (want_grad,) = torch.autograd.grad(want, x)
    assert _rel(loss, want) <= 1e-4 and _rel(grad, want_grad) <= 1e-3


@pytest.mark.parametrize("method,precision", [("dm", "fp32"), ("dc", "fp32"), ("dc", "bf16")])
def test_cuda_distillation_runs_and_repeats_from_its_seed(method: str, precision: str) -> None:
    opts = {"num_classes": 3, "num_groups": 2, "image_size": 8, "n_per_class": 20}
    ds = data.load("synthetic", bias_ratio=0.8, **opts)
    cfg = distill.DistillConfig(dataset="synthetic", method=method, objective="fairdd", ipc=2, width=8, depth=2,
                                batch_real=8, outer_loop=2, inner_loop=1, iterations=2, log_every=1,
                                extra={"data_options": opts})
    with wgrad.weight_grad_precision(precision):
        first = distill.run(cfg, ds, device="cuda", progress=False)
        again = distill.run(dataclasses.replace(cfg), ds, device="cuda", progress=False)
        start = distill.run(dataclasses.replace(cfg, iterations=1, lr_img=1e-12), ds, device="cuda",
                            progress=False)
    assert first.images.is_cuda and torch.isfinite(first.images).all()
    assert _rel(first.images, start.images, floor=1.0) > 0  # the images moved
    # Same seed, same draws: equal up to cuDNN's non-deterministic sums.
    assert _rel(again.images, first.images, floor=1.0) <= 1e-3
