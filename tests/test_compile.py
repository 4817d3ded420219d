"""The public ops under torch.compile and torch.export, and opcheck of every op.

Compile: fullgraph (a graph break is an error), dynamic shapes, forward and
backward, three batch sizes with recompiles turned into errors. Most cases
use the ``aot_eager`` backend: it runs dynamo (graph breaks, guards) and
AOTAutograd (fake kernels, the traced backward) like the default backend,
without inductor's C++ code generation, which takes minutes on 2 cores; one
case goes through inductor. Batch sizes avoid 0 and 1 (always specialised)
and every other dimension of the inputs (duck sizing would tie them).
"""
from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.utils import counters

from fastfair import ops
from fastfair.nn import FairDMLoss

pytestmark = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")

S, C, G = 6, 3, 2
SIZES = (7, 11, 19)
F64 = torch.float64


def make_inputs(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + n)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(True)

    ids = torch.randint(0, S - 1, (n,), generator=g)  # segment S-1 stays empty
    if name in ("segment_sum", "segment_mean"):
        return randn(n, 4), ids
    if name == "segment_count":
        return (ids.int(),)
    if name == "fair_dm_loss":
        labels = torch.randint(0, C, (n,), generator=g, dtype=torch.int32)
        groups = torch.randint(0, G, (n,), generator=g)
        return randn(n, 4), labels, groups, randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    if name == "segment_linear_weight_grad":
        return randn(n, 3), randn(n, 5), ids
    if name == "segment_conv2d_weight_grad":  # 3x3 kernel, padding 1: output 5x5 like the input
        return randn(n, 3, 5, 5), randn(n, 2, 5, 5), ids.int()
    raise KeyError(name)


FUNCTIONS = {
    "segment_sum": lambda x, ids: ops.segment_sum(x, ids, S),
    "segment_mean": lambda x, ids: ops.segment_mean(x, ids, S),
    "segment_count": lambda ids: ops.segment_count(ids, S),
    "fair_dm_loss": lambda *a: ops.fair_dm_loss(*a, C, G, "fairdd"),
    "segment_linear_weight_grad": lambda b, a, ids: ops.segment_linear_weight_grad(b, a, ids, S),
    "segment_conv2d_weight_grad": lambda b, a, ids: ops.segment_conv2d_weight_grad(b, a, ids, S, 3, 1, 1, 1),
}


def grads_of(out: torch.Tensor, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
    leaves = [a for a in args if a.requires_grad]
    if not out.is_floating_point() or not leaves:
        return []
    # A fixed, non-uniform weighting so that every output entry matters.
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)
    return list(torch.autograd.grad((out * w).sum(), leaves, allow_unused=True))


def run_sizes(compiled, eager, name: str) -> None:  # noqa: ANN001
    for n in SIZES:
        args = make_inputs(name, n)
        got = compiled(*args)
        want = eager(*args)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads_of(got, args), grads_of(want, args)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def assert_one_graph(fn, name: str, backend: str = "aot_eager") -> None:  # noqa: ANN001
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_sizes(compiled, fn, name)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_compile_fullgraph_dynamic_no_recompile(name):
    assert_one_graph(FUNCTIONS[name], name)


def test_compile_loss_module_with_inductor():
    # The default backend once, on the DM loss module: value and gradient.
    assert_one_graph(FairDMLoss(C, G), "fair_dm_loss", backend="inductor")


def test_compile_sizes_as_dynamic_ints():
    # dynamic=True traces int arguments as SymInts: the wrappers take them as
    # sizes (the ops' schemas then specialise num_segments, which is constant
    # in a training loop; batch sizes stay dynamic).
    def fn(x, ids, s):  # noqa: ANN001, ANN202
        return ops.segment_mean(x, ids, s), ops.segment_count(ids, s)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")

    def check(n: int, s: int) -> None:
        x, ids = make_inputs("segment_mean", n)
        for got, want in zip(compiled(x, ids, s), fn(x, ids, s)):
            assert got.shape[0] == s
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in SIZES:
            check(n, 8)
    check(SIZES[0], 13)


def test_compiled_graph_still_refuses_bad_ids():
    # The range check lives in the kernels, so a traced graph keeps it.
    compiled = torch.compile(FUNCTIONS["segment_sum"], fullgraph=True, dynamic=True, backend="aot_eager")
    x, ids = make_inputs("segment_sum", 7)
    compiled(x, ids)
    with pytest.raises(ValueError, match="outside"):
        compiled(x, torch.full_like(ids, S))
    loss = torch.compile(FairDMLoss(C, G), fullgraph=True, dynamic=True, backend="aot_eager")
    args = list(make_inputs("fair_dm_loss", 7))
    loss(*args)
    args[1] = args[1].clone()
    args[1][3] = 2**30  # int32: label * G would wrap to a valid segment
    with pytest.raises(ValueError, match="outside"):
        loss(*args)


class _Wrap(torch.nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_export_round_trip(name):
    module = FairDMLoss(C, G) if name == "fair_dm_loss" else _Wrap(FUNCTIONS[name])
    args = tuple(a.detach() for a in make_inputs(name, SIZES[0]))
    batch = torch.export.Dim("batch", min=2)
    # The synthetic set of the DM loss keeps its size; every other input is per real row.
    dims = tuple(None if (name == "fair_dm_loss" and i >= 3) else {0: batch} for i in range(len(args)))
    program = torch.export.export(module, args, dynamic_shapes={"args": dims} if isinstance(module, _Wrap) else dims)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for n in SIZES[1:]:
        args = tuple(a.detach() for a in make_inputs(name, n))
        want = module(*args)
        assert torch.equal(program.module()(*args), want)
        assert torch.equal(loaded.module()(*args), want)


OPCHECK_CASES = {
    "segment_sum": [(37, torch.int32), (0, torch.int64)],
    "segment_mean": [(37, torch.int32), (0, torch.int64)],
    "segment_count": [(37, torch.int64), (0, torch.int32)],
    "segment_linear_weight_grad": [(9, torch.int32), (0, torch.int64)],
    "segment_conv2d_weight_grad": [(9, torch.int64), (0, torch.int32)],
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_every_op(name):
    # Complements tests/test_ops.py and test_pergroup.py: the other id dtype
    # and empty batches, for every op.
    op = getattr(torch.ops.fastfair, name).default
    extra = {"segment_conv2d_weight_grad": ([3, 3], [1, 1], [1, 1], [1, 1])}.get(name, ())
    for n, index_dtype in OPCHECK_CASES[name]:
        args = make_inputs(name, max(n, 2))
        args = tuple(a[:n] for a in args)
        args = tuple(a.to(index_dtype) if not a.is_floating_point() else a.detach().requires_grad_(True)
                     for a in args)
        torch.library.opcheck(op, (*args, S, *extra))


def test_compile_loss_terms():
    # The per-class and per-(class, group) terms, for logging in a compiled step.
    loss = FairDMLoss(C, G, objective="cobra")
    compiled = torch.compile(loss.terms, fullgraph=True, dynamic=True, backend="aot_eager")
    args = make_inputs("fair_dm_loss", SIZES[0])
    got, want = compiled(*args), loss.terms(*args)
    assert got.per_group.shape == (C, G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
