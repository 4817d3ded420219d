"""torch.func through the public ops (issue 26): grad, jacrev and vmap of
segment_sum / segment_mean / fair_dm_loss and the weight-gradient ops equal
autograd and a Python loop, without torch's "no batching rule" fallback
warning. Under a transform the ops run their pure-PyTorch reference (torch's
generated autograd for custom ops has no functorch support)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastfair import ops


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vmap fallback or a reference-op warning fails the test
        yield


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 1, 0, 4, 1, 0, 2])  # segment 3 empty
    return x, ids


@pytest.mark.parametrize("op", ["segment_sum", "segment_mean"])
def test_grad_and_jacrev_equal_autograd(op: str) -> None:
    x, ids = _data()
    f = getattr(ops, op)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (f(v, ids, 5) ** 2).sum()

    xx = x.clone().requires_grad_(True)
    loss(xx).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x), xx.grad)
    jac = torch.func.jacrev(lambda v: f(v, ids, 5))(x)
    rows = [torch.autograd.functional.jacobian(lambda v: f(v, ids, 5)[s], x) for s in range(5)]
    torch.testing.assert_close(jac, torch.stack(rows))


@pytest.mark.parametrize("op", ["segment_sum", "segment_mean"])
def test_vmap_equals_a_loop(op: str) -> None:
    _, ids = _data()
    xs = torch.randn(6, 9, 4, dtype=torch.float64)
    f = getattr(ops, op)
    got = torch.func.vmap(lambda v: f(v, ids, 5))(xs)
    torch.testing.assert_close(got, torch.stack([f(v, ids, 5) for v in xs]))


@pytest.mark.parametrize("objective", ["fairdd", "cobra", "vanilla"])
def test_fair_dm_loss_grad_and_vmap(objective: str) -> None:
    g = torch.Generator().manual_seed(1)
    real = torch.randn(30, 5, generator=g, dtype=torch.float64)
    lab, grp = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 2, (30,), generator=g)
    syn_labels = torch.arange(3).repeat_interleave(2)
    syn = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return ops.fair_dm_loss(real, lab, grp, s, syn_labels, 3, 2, objective)

    ss = syn.clone().requires_grad_(True)
    loss(ss).backward()
    torch.testing.assert_close(torch.func.grad(loss)(syn), ss.grad)
    batch = torch.randn(4, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(loss)(batch), torch.stack([loss(b) for b in batch]))


def test_weight_grad_op_under_grad() -> None:
    g = torch.Generator().manual_seed(2)
    b, a = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 0, 2, 2, 0, 1])

    def loss(aa: torch.Tensor) -> torch.Tensor:
        return ops.segment_linear_weight_grad(b, aa, ids, 3).pow(2).sum()

    aa = a.clone().requires_grad_(True)
    loss(aa).backward()
    torch.testing.assert_close(torch.func.grad(loss)(a), aa.grad)
