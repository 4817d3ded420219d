"""segment_sum / segment_mean / segment_count against float64 references."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastfair import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
compiled = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")


def reference_sum(x: torch.Tensor, ids: torch.Tensor, s: int) -> torch.Tensor:
    """Float64 torch index_add, independent of the fastfair kernels."""
    out = torch.zeros(s, x.shape[1], dtype=torch.float64, device=x.device)
    return out.index_add_(0, ids.long(), x.double())


def reference_count(ids: torch.Tensor, s: int) -> torch.Tensor:
    return torch.bincount(ids.long().cpu(), minlength=s)[:s].to(ids.device)


def make_case(n: int, d: int, s: int, dtype: torch.dtype, device: str, *, index_dtype=torch.int64,
              contiguous: bool = True, seed: int = 0, empty: int = 0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:  # a transposed view: column stride 1 is lost
        x = torch.randn(d, n, generator=g, dtype=torch.float64).t()
    # Leave the last `empty` segments without rows.
    ids = torch.randint(0, max(1, s - empty), (n,), generator=g)
    x = x.to(dtype=dtype, device=device)
    return x, ids.to(dtype=index_dtype, device=device)


def assert_close(got: torch.Tensor, want64: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    scale = x.double().abs().max().item() if x.numel() else 1.0
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    # Tolerance grows with the number of summed rows in the worst segment.
    assert err <= TOL[dtype] * scale * max(1.0, want64.abs().max().item() / max(scale, 1e-30)) * 10, err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,d,s,empty",
    [(0, 4, 3, 3), (1, 1, 1, 0), (257, 1, 5, 2), (1000, 7, 13, 4), (3000, 33, 1, 0),
     (5000, 130, 40, 10), (20000, 3, 100000, 0)],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_segment_sum_and_mean(device, dtype, n, d, s, empty, index_dtype):
    x, ids = make_case(n, d, s, dtype, device, index_dtype=index_dtype, seed=n + d + s, empty=empty)
    want = reference_sum(x, ids, s)
    count = reference_count(ids, s)
    got = ops.segment_sum(x, ids, s)
    assert got.shape == (s, d) and got.dtype == dtype and got.device == x.device
    assert_close(got, want, x, dtype)
    mean = ops.segment_mean(x, ids, s)
    want_mean = want / count.clamp(min=1).double().unsqueeze(1)
    assert mean.dtype == dtype
    assert_close(mean, want_mean, x, dtype)
    assert torch.isfinite(mean.float()).all()
    # Empty segments are exact zeros.
    assert (mean[count == 0] == 0).all() and (got[count == 0] == 0).all()
    assert torch.equal(ops.segment_count(ids, s), count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_and_sliced(device, dtype):
    x, ids = make_case(777, 19, 11, dtype, device, contiguous=False, seed=3)
    assert not x.is_contiguous()
    assert_close(ops.segment_sum(x, ids, 11), reference_sum(x, ids, 11), x, dtype)
    wide = torch.randn(500, 40, dtype=dtype, device=device)
    view = wide[::2, 1::3]  # row and column strides both > 1
    ids2 = torch.randint(0, 6, (view.shape[0],), device=device)
    assert_close(ops.segment_mean(view, ids2, 6),
                 reference_sum(view, ids2, 6) / reference_count(ids2, 6).clamp(min=1).double().unsqueeze(1),
                 view, dtype)


def test_sorted_and_single_segment_layouts(device):
    # Long runs of one segment cross the kernels' chunk boundaries.
    x = torch.randn(70000, 5, dtype=torch.float64, device=device)
    ids = torch.sort(torch.randint(0, 3, (70000,), device=device)).values
    assert_close(ops.segment_sum(x, ids, 3), reference_sum(x, ids, 3), x, torch.float64)
    ones = torch.zeros(70000, dtype=torch.int64, device=device)
    assert_close(ops.segment_mean(x, ones, 1), x.double().mean(0, keepdim=True), x, torch.float64)


def test_deterministic(device):
    x = torch.randn(50000, 3, device=device)
    ids = torch.randint(0, 7, (50000,), device=device)
    a = ops.segment_sum(x, ids, 7)
    b = ops.segment_sum(x, ids, 7)
    assert torch.equal(a, b)
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c = ops.segment_sum(x, ids, 7)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(a, c)


# Shapes that reach each CPU strategy of csrc/cpu/segment_reduce.cpp (its
# choose_strategy; the choice depends only on N, D, G). With R = 2^18 //
# max(D, 64) rows a chunk: N <= R -> sorted if D >= 32 else columns; else
# N <= 4096, D >= 256 and G >= 8 -> sorted; else
# min(N // R, N // (6 G)) >= 2 row chunks whose [G, D] partial fits 512 KB
# (4 MB from N = 65536 rows on) -> row chunks; else D >= 32 -> sorted, D < 32 -> columns. The sorted strategy
# tiles columns (>= 256 wide) when it has fewer than 16 segment ranges.
STRATEGY_SHAPES = {
    "columns_few_rows": (3000, 20, 500),
    "columns_narrow_many_segments": (20000, 3, 30000),
    "row_chunks": (50000, 3, 7),  # 12 chunks of 4167 rows
    "row_chunks_two": (20001, 8, 1500),  # 2 chunks of 10001 rows
    "row_chunks_wide": (9000, 300, 20),  # 10 chunks of 900 rows, 24 KB partials
    "row_chunks_few_wide_rows": (2500, 512, 4),  # 4 chunks of 625 rows
    "row_chunks_many_rows_big_partial": (70000, 40, 5000),  # 2 chunks, 800 KB partials
    "sorted": (9000, 40, 4000),
    "sorted_mostly_empty": (5000, 32, 50000),
    "sorted_partial_too_big": (9000, 300, 500),  # row chunks' partial would be 600 KB
    "sorted_few_rows": (3000, 130, 7),
    "row_chunks_few_wide_rows_more_segments": (2500, 512, 16),  # 4 chunks (the sorted pass before v6)
    "sorted_tiled_one_segment": (400, 600, 1),  # 2 tiles of 300 columns
    "sorted_tiled": (250, 1030, 3),  # 3 ranges x 4 tiles of 258 columns
}


@pytest.mark.parametrize("strategy", list(STRATEGY_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_strategies_match_reference(device, strategy, dtype, index_dtype):
    n, d, s = STRATEGY_SHAPES[strategy]
    x, ids = make_case(n, d, s, dtype, device, index_dtype=index_dtype, seed=d + s, empty=s // 8)
    want = reference_sum(x, ids, s)
    count = reference_count(ids, s)
    got = ops.segment_sum(x, ids, s)
    assert got.dtype == dtype
    assert_close(got, want, x, dtype)
    mean = ops.segment_mean(x, ids, s)
    assert_close(mean, want / count.clamp(min=1).double().unsqueeze(1), x, dtype)
    assert (got[count == 0] == 0).all() and (mean[count == 0] == 0).all()


def _sorted_layout(layout: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    n, d, _ = STRATEGY_SHAPES["sorted"]
    g = torch.Generator().manual_seed(5)

    def base(*shape: int) -> torch.Tensor:  # cast before viewing, so the view stays strided
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    if layout == "column_slice":
        return base(n, d + 30)[:, 7:7 + d]  # row stride != D
    if layout == "transposed":
        return base(d, n).t()  # column stride N
    if layout == "row_step":
        return base(2 * n, d)[::2]  # row stride 2 * D
    return base(n, 2 * d)[:, ::2]  # column stride 2


@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_step", "both_steps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sorted_strategy_non_contiguous(device, layout, dtype):
    x = _sorted_layout(layout, dtype, device)
    n, d, s = STRATEGY_SHAPES["sorted"]
    assert x.shape == (n, d) and not x.is_contiguous()
    ids = torch.randint(0, s, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    assert_close(ops.segment_sum(x, ids, s), reference_sum(x, ids, s), x, dtype)
    # The same values laid out contiguously give the same bits.
    assert torch.equal(ops.segment_mean(x, ids, s), ops.segment_mean(x.contiguous(), ids, s))


@pytest.mark.parametrize("layout", ["half_in_one", "ascending", "descending", "all_in_last", "alternating"])
def test_sorted_strategy_skewed_ids(device, layout):
    # Uneven segments move the sorted strategy's task boundaries (balanced by
    # rows + segments): one segment larger than a task, long empty ranges.
    n, d, s = STRATEGY_SHAPES["sorted"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    rand = torch.randint(0, s, (n,), generator=g)
    ids = {
        "half_in_one": torch.where(torch.arange(n) % 2 == 0, torch.full((n,), 17), rand),
        "ascending": rand.sort().values,
        "descending": rand.sort(descending=True).values,
        "all_in_last": torch.full((n,), s - 1),
        "alternating": torch.arange(n) % 2 * (s - 1),
    }[layout]
    x, ids = x.to(device), ids.to(device)
    count = reference_count(ids, s)
    want = reference_sum(x, ids, s)
    got = ops.segment_sum(x, ids, s)
    assert_close(got, want, x, torch.float64)
    assert_close(ops.segment_mean(x, ids, s), want / count.clamp(min=1).double().unsqueeze(1), x, torch.float64)
    assert (got[count == 0] == 0).all()


@pytest.mark.parametrize("strategy", list(STRATEGY_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_across_thread_counts(strategy, dtype):
    n, d, s = STRATEGY_SHAPES[strategy]
    x, ids = make_case(n, d, s, dtype, "cpu", seed=7)
    threads = torch.get_num_threads()
    got = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.get_num_threads() == t
            got[t] = (ops.segment_sum(x, ids, s), ops.segment_mean(x, ids, s))
        again = ops.segment_sum(x, ids, s)
    finally:
        torch.set_num_threads(threads)
    for t in (2, 3):
        assert torch.equal(got[t][0], got[1][0]) and torch.equal(got[t][1], got[1][1]), t
    assert torch.equal(again, got[1][0])


def test_errors(device):
    x = torch.randn(10, 3, device=device)
    ids = torch.randint(0, 4, (10,), device=device)
    with pytest.raises(ValueError, match="outside"):
        ops.segment_sum(x, torch.full((10,), 4, device=device), 4)
    with pytest.raises(ValueError, match="outside"):
        ops.segment_mean(x, torch.full((10,), -1, device=device), 4)
    with pytest.raises(ValueError, match="outside"):
        ops.segment_count(torch.full((10,), 9, device=device), 4)
    with pytest.raises(ValueError, match="rows"):
        ops.segment_sum(x, ids[:5], 4)
    with pytest.raises(ValueError, match="2-D"):
        ops.segment_sum(x[:, 0], ids, 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.segment_sum(x, ids.float(), 4)
    with pytest.raises(TypeError, match="floating"):
        ops.segment_sum(x.long(), ids, 4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            ops.segment_sum(x, ids, bad)
    with pytest.raises(TypeError, match="int"):
        ops.segment_mean(x, ids, 4.0)


@compiled
def test_kernel_errors_are_value_errors():
    # The C++ boundary checks too (for callers of torch.ops.fastfair.* directly).
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.fastfair.segment_sum(x, torch.full((10,), 5), 4)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.fastfair.segment_mean(x, torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(TypeError):
        torch.ops.fastfair.segment_count(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="positive"):
        torch.ops.fastfair.segment_sum(x, torch.zeros(10, dtype=torch.long), 0)


@compiled
@pytest.mark.parametrize("op", ["segment_sum", "segment_mean"])
def test_opcheck(device, op):
    fn = getattr(torch.ops.fastfair, op).default
    for n, d, s in [(37, 5, 6), (0, 3, 2), (64, 1, 1)]:
        x = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
        ids = torch.randint(0, s, (n,), device=device)
        torch.library.opcheck(fn, (x, ids, s))


@compiled
def test_opcheck_count(device):
    ids = torch.randint(0, 9, (100,), device=device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastfair.segment_count.default, (ids, 12))


@pytest.mark.parametrize("fn", [ops.segment_sum, ops.segment_mean])
def test_gradcheck(device, fn):
    x = torch.randn(23, 4, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.randint(0, 6, (23,), device=device)
    assert torch.autograd.gradcheck(lambda t: fn(t, ids, 7), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fn(t, ids, 7) ** 2, (x,))


def test_reference_fallback_when_extension_missing():
    # A fresh interpreter in which fastfair._C cannot be imported.
    code = (
        "import sys, warnings\n"
        "sys.modules['fastfair._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "import torch, fastfair\n"
        "from fastfair import ops\n"
        "assert ops.backend() == 'reference', ops.backend()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(9, 2, dtype=torch.float64); ids = torch.tensor([0,2,2,1,0,2,4,4,0])\n"
        "    m = ops.segment_mean(x, ids, 5); ops.segment_sum(x, ids, 5)\n"
        "assert len([x for x in w if 'reference' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "assert torch.allclose(m[2], x[[1,2,5]].mean(0)) and (m[3] == 0).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_reference_ops_match(device):
    x, ids = make_case(300, 6, 9, torch.float64, device, seed=11, empty=2)
    assert_close(ops._segment_sum_reference(x, ids, 9), reference_sum(x, ids, 9), x, torch.float64)
    assert torch.equal(ops._segment_count_reference(ids, 9), reference_count(ids, 9))
