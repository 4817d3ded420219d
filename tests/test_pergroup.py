"""Segmented weight-gradient kernels and one-pass per-segment gradients,
against float64 references and per-segment autograd loops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfair import ops, pergroup
from fastfair.nets import get_network



# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


compiled = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def layout(n: int, s: int, seed: int, index_dtype=torch.int64) -> torch.Tensor:
    """Unsorted ids in [0, s): the last two segments empty, segment s-3 a singleton."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s - 3, (n,), generator=g)
    ids[n // 2] = s - 3
    return ids.to(index_dtype)


# ---------------------------------------------------------------------------
# Kernels against float64 references.


def ref_linear(b: torch.Tensor, a: torch.Tensor, ids: torch.Tensor, s: int) -> torch.Tensor:
    """Per-segment sums of outer products, one matmul per segment in float64."""
    out = torch.zeros(s, b.shape[1], a.shape[1], dtype=torch.float64)
    for k in range(s):
        m = (ids == k).cpu()
        out[k] = b.double().cpu()[m].t() @ a.double().cpu()[m]
    return out


def ref_conv(b, a, ids, s, ks, st, pd, dl) -> torch.Tensor:  # noqa: ANN001
    """Per-sample autograd weight gradients of F.conv2d, summed per segment (float64)."""
    a64, b64 = a.double().cpu(), b.double().cpu()
    out = torch.zeros(s, b.shape[1], a.shape[1], *ks, dtype=torch.float64)
    for i in range(a.shape[0]):
        w = torch.zeros(b.shape[1], a.shape[1], *ks, dtype=torch.float64, requires_grad=True)
        y = F.conv2d(a64[i:i + 1], w, None, st, pd, dl)
        (g,) = torch.autograd.grad((y * b64[i:i + 1]).sum(), w)
        out[int(ids[i])] += g
    return out


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double().cpu() - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * scale * 10, err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,o,k,s", [(0, 3, 4, 2), (1, 1, 1, 1), (29, 5, 7, 9), (70, 33, 65, 6)])
def test_linear_weight_grad(device, dtype, index_dtype, n, o, k, s):
    g = torch.Generator().manual_seed(n + o + k)
    b = torch.randn(n, o, generator=g).to(dtype=dtype, device=device)
    a = torch.randn(n, k, generator=g).to(dtype=dtype, device=device)
    if s >= 4:
        ids = layout(n, s, seed=n, index_dtype=index_dtype).to(device)
    else:
        ids = torch.randint(0, s, (n,), generator=g).to(device=device, dtype=index_dtype)
    got = ops.segment_linear_weight_grad(b, a, ids, s)
    assert got.shape == (s, o, k) and got.dtype == dtype and got.device == a.device
    want = ref_linear(b, a, ids, s)
    assert_close_scaled(got, want, dtype)
    empty = torch.bincount(ids.long().cpu(), minlength=s) == 0
    assert (got.cpu()[empty] == 0).all()


def conv_inputs(n, ci, co, h, w, ks, st, pd, dl, seed):  # noqa: ANN001, ANN201
    """float64 input [n, ci, h, w] and grad_out of the matching conv output size."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    oh = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    return a, torch.randn(n, co, oh, ow, generator=g, dtype=torch.float64)


def check_conv_kernel(device, b, a, ids, s, ks, st, pd, dl) -> None:  # noqa: ANN001
    """The kernel in float64/32/bf16 against ref_conv; the last two segments are empty."""
    want = ref_conv(b, a, ids, s, ks, st, pd, dl)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        got = ops.segment_conv2d_weight_grad(b.to(device, dtype), a.to(device, dtype), ids.to(device), s,
                                             ks, st, pd, dl)
        assert got.shape == (s, b.shape[1], a.shape[1], *ks) and got.dtype == dtype
        assert_close_scaled(got, want, dtype)
        assert (got[-2:] == 0).all()


CONV_CASES = [  # (kernel, stride, padding, dilation, H, W)
    ((3, 3), (1, 1), (1, 1), (1, 1), 8, 8),
    ((3, 2), (2, 1), (1, 0), (1, 2), 9, 7),
    ((1, 1), (2, 2), (0, 0), (1, 1), 5, 6),
    ((5, 3), (1, 3), (2, 4), (2, 1), 11, 10),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_conv2d_weight_grad(device, case, index_dtype):
    ks, st, pd, dl, h, w = case
    n, ci, co, s = 13, 3, 5, 7
    a, b = conv_inputs(n, ci, co, h, w, ks, st, pd, dl, seed=h * w)
    check_conv_kernel(device, b, a, layout(n, s, seed=h, index_dtype=index_dtype), s, ks, st, pd, dl)


@pytest.mark.parametrize("rows", ["consecutive", "interleaved"])
def test_conv2d_weight_grad_many_blocks_in_one_segment(rows):
    # 70 rows of one segment exceed the CPU kernel's block of rows, so the
    # segment is summed over several blocks: read in place when the rows are
    # consecutive, gathered when another segment's rows lie between them.
    a = torch.randn(70, 4, 256, 256)
    b = torch.randn(70, 4, 256, 256)
    ids = torch.zeros(70, dtype=torch.long) if rows == "consecutive" else torch.arange(70) % 2
    got = ops.segment_conv2d_weight_grad(b, a, ids, 3, 3, 1, 1, 1)
    for k in range(2):
        m = ids == k
        want = torch.nn.grad.conv2d_weight(a[m].double(), (4, 4, 3, 3), b[m].double(), 1, 1, 1)
        # float32 sums of 70 x 256 x 256 products: rounding relative to the largest entry.
        assert (got[k].double() - want).abs().max() <= 1e-4 * want.abs().max()
        if rows == "consecutive":
            break
    assert (got[2] == 0).all()


@pytest.mark.parametrize("case", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (0, 1), (2, 1))])
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_conv2d_weight_grad_many_small_segments(device, case, order):
    # 60 rows in ~25 segments of 16 input channels: the CPU kernel's per-sample
    # path (one grouped backward per block of rows), with blocks of 25 rows at
    # 64 px, so segments straddle blocks; unsorted ids are gathered.
    ks, st, pd, dl = case
    n, ci, co, s, h = 60, 16, 4, 27, 64
    a, b = conv_inputs(n, ci, co, h, h, ks, st, pd, dl, seed=5)
    ids = layout(n, s, seed=11)
    if order == "sorted":
        ids = ids.sort().values
    check_conv_kernel(device, b, a, ids, s, ks, st, pd, dl)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_weight_grads_mixed_consecutive_and_scattered_segments(op):
    # Segments 0 and 3 are consecutive runs (read in place), 1 and 2 interleave
    # (gathered), 4 is empty: the kernel picks the path per block.
    ids = torch.tensor([0, 0, 0, 1, 2, 1, 2, 2, 3, 3, 3, 3, 3])
    g = torch.Generator().manual_seed(3)
    n = ids.numel()
    if op == "linear":
        b, a = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
        got, want = ops.segment_linear_weight_grad(b, a, ids, 5), ref_linear(b, a, ids, 5)
    else:
        a = torch.randn(n, 3, 7, 6, generator=g, dtype=torch.float64)
        b = torch.randn(n, 4, 7, 6, generator=g, dtype=torch.float64)
        got = ops.segment_conv2d_weight_grad(b, a, ids, 5, (3, 3), (1, 1), (1, 1), (1, 1))
        want = ref_conv(b, a, ids, 5, (3, 3), (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[4] == 0).all()


def test_non_contiguous_inputs(device):
    a = torch.randn(6, 10, 9, device=device).transpose(1, 2)  # [6, 9, 10] viewed
    b = torch.randn(4, 6, device=device).t()
    ids = torch.tensor([2, 0, 2, 1, 0, 2], device=device)
    got = ops.segment_linear_weight_grad(b, a[:, :, 3], ids, 3)
    assert_close_scaled(got, ref_linear(b, a[:, :, 3], ids, 3), torch.float32)
    x = torch.randn(6, 9, 8, 3, device=device).permute(0, 3, 1, 2)  # channels-last-like view
    gy = torch.randn(6, 2, 9, 8, device=device)
    got = ops.segment_conv2d_weight_grad(gy, x, ids, 3, 3, 1, 1, 1)
    assert_close_scaled(got, ref_conv(gy, x, ids, 3, (3, 3), (1, 1), (1, 1), (1, 1)), torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic(device, threads):
    torch.set_num_threads(threads)
    a = torch.randn(200, 8, 12, 12, device=device)
    b = torch.randn(200, 6, 12, 12, device=device)
    ids = torch.randint(0, 5, (200,), device=device)
    one = ops.segment_conv2d_weight_grad(b, a, ids, 5, 3, 1, 1, 1)
    assert torch.equal(one, ops.segment_conv2d_weight_grad(b, a, ids, 5, 3, 1, 1, 1))
    a2, b2 = a.flatten(1), b.flatten(1)
    lin = ops.segment_linear_weight_grad(b2, a2, ids, 5)
    assert torch.equal(lin, ops.segment_linear_weight_grad(b2, a2, ids, 5))


def test_reference_paths_match_kernels():
    a, b = torch.randn(31, 3, 7, 6, dtype=torch.float64), torch.randn(31, 4, 4, 6, dtype=torch.float64)
    ids = layout(31, 8, seed=5)
    want = ref_conv(b, a, ids, 8, (2, 3), (2, 1), (1, 1), (1, 1))
    ref = ops._segment_conv2d_weight_grad_reference(b, a, ids, 8, (2, 3), (2, 1), (1, 1), (1, 1))
    assert_close_scaled(ref, want, torch.float64)
    ref = ops._segment_linear_weight_grad_reference(b.flatten(1), a.flatten(1), ids, 8)
    assert_close_scaled(ref, ref_linear(b.flatten(1), a.flatten(1), ids, 8), torch.float64)


def test_errors(device):
    b, a = torch.randn(10, 3, device=device), torch.randn(10, 4, device=device)
    ids = torch.randint(0, 4, (10,), device=device)
    lin = ops.segment_linear_weight_grad
    with pytest.raises(ValueError, match="outside"):
        lin(b, a, torch.full((10,), 4, device=device), 4)
    with pytest.raises(ValueError, match="rows"):
        lin(b[:5], a, ids, 4)
    with pytest.raises(ValueError, match="entries"):
        lin(b, a, ids[:5], 4)
    with pytest.raises(ValueError, match="2-D"):
        lin(b[:, 0], a, ids, 4)
    with pytest.raises(TypeError, match="same dtype"):
        lin(b.double(), a, ids, 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        lin(b, a, ids.float(), 4)
    with pytest.raises(ValueError, match="positive"):
        lin(b, a, ids, 0)
    x, gy = torch.randn(10, 2, 8, 8, device=device), torch.randn(10, 3, 8, 8, device=device)
    conv = ops.segment_conv2d_weight_grad
    with pytest.raises(ValueError, match="does not match"):
        conv(gy, x, ids, 4, 3, 1, 0, 1)  # padding 0 gives 6x6, not 8x8
    with pytest.raises(ValueError, match="4-D"):
        conv(gy.flatten(2), x, ids, 4, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        conv(gy, x, ids, 4, 3, 0, 1, 1)
    with pytest.raises(TypeError, match="pair"):
        conv(gy, x, ids, 4, (3, 3, 3), 1, 1, 1)


@compiled
def test_kernel_errors_are_value_errors():
    # The C++ boundary checks too (for callers of torch.ops.fastfair.* directly).
    b, a = torch.randn(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.fastfair.segment_linear_weight_grad(b, a, torch.full((10,), 5), 4)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.fastfair.segment_linear_weight_grad(b[:3], a, torch.zeros(10, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.fastfair.segment_linear_weight_grad(b.double(), a, torch.zeros(10, dtype=torch.long), 4)
    x, gy = torch.randn(10, 2, 8, 8), torch.randn(10, 3, 8, 8)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.fastfair.segment_conv2d_weight_grad(gy, x, torch.zeros(10, dtype=torch.long), 4,
                                                      [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="outside"):
        torch.ops.fastfair.segment_conv2d_weight_grad(gy, x, torch.full((10,), -1), 4,
                                                      [3, 3], [1, 1], [1, 1], [1, 1])


@compiled
def test_opcheck(device):
    ids = torch.tensor([3, 0, 3, 1, 0, 3, 3], device=device)  # segment 2 and 4 empty
    b = torch.randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastfair.segment_linear_weight_grad.default, (b, a, ids, 5))
    x = torch.randn(7, 2, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    gy = torch.randn(7, 3, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastfair.segment_conv2d_weight_grad.default,
                          (gy, x, ids.int(), 5, [3, 2], [2, 1], [1, 0], [1, 1]))


def test_gradcheck(device):
    ids = torch.tensor([2, 0, 2, 2, 1, 0], device=device)
    b = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    lin = lambda b, a: ops.segment_linear_weight_grad(b, a, ids, 4)  # noqa: E731
    assert torch.autograd.gradcheck(lin, (b, a))
    assert torch.autograd.gradgradcheck(lin, (b, a))
    x = torch.randn(6, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    gy = torch.randn(6, 3, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    conv = lambda gy, x: ops.segment_conv2d_weight_grad(gy, x, ids, 4, (3, 2), 2, (1, 0), (1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(conv, (gy, x))
    assert torch.autograd.gradgradcheck(conv, (gy, x))


# ---------------------------------------------------------------------------
# segment_gradients against per-segment autograd loops.


def loop_grads(model, x, y, ids, s):  # noqa: ANN001
    params = [p for p in model.parameters() if p.requires_grad]
    out = [torch.zeros(s, *p.shape, dtype=p.dtype) for p in params]
    for k in range(s):
        m = ids == k
        if m.any():
            gs = torch.autograd.grad(F.cross_entropy(model(x[m]), y[m]), params, allow_unused=True)
            for o, g in zip(out, gs):
                if g is not None:
                    o[k] = g
    return out


class TokenMLP(nn.Module):
    """A Linear over [N, T, K] tokens, a LayerNorm on them, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(48, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(160, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(x.shape[0], 3, 16, 16).permute(0, 2, 1, 3).reshape(x.shape[0], 16, 48)
        return self.head(torch.tanh(self.norm(self.tok(t))).flatten(1))


class Shared(nn.Module):
    """One conv applied twice (both calls add to its gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))


MODELS = {
    "convnet": lambda: get_network("ConvNet", 3, 4, 16, width=8, depth=3),
    "conv_variants": lambda: nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.GroupNorm(5, 5), nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
        nn.Conv2d(6, 6, (2, 3), stride=(1, 2)), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 4, 2, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.MaxPool2d(2), nn.Flatten(),
        nn.LazyLinear(4)),
    "mlp_layernorm": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 12), nn.LayerNorm(12), nn.ReLU(),
                                           nn.Dropout(0.5), nn.Linear(12, 4)).eval(),
    "tokens": TokenMLP,
    "shared_conv": Shared,
    "bn_eval": lambda: get_network("ConvNet", 3, 4, 16, width=8, depth=2, norm="batchnorm").eval(),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_segment_gradients_match_loop(name, dtype, tol):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(29, 3, 16, 16)
    model(x)  # materialise lazy layers
    if name == "bn_eval":  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = model.to(dtype)
    x = x.to(dtype)
    y = torch.randint(0, 4, (29,))
    ids = layout(29, 9, seed=1, index_dtype=torch.int32 if dtype == torch.float32 else torch.int64)
    got = pergroup.segment_gradients(model, x, y, ids, 9)
    want = loop_grads(model, x, y, ids, 9)
    assert len(got) == len(want) == len(list(model.parameters()))
    # A conv bias followed by instance norm has an exactly-zero gradient (the
    # norm removes per-channel shifts): measure such rounding-level values
    # against the scale of the whole gradient.
    scale = max(w.norm().item() for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        err = ((g - w).norm() / max(w.norm().item(), 1e-3 * scale)).item()
        assert err <= tol, err
    assert all((g[-2:] == 0).all() for g in got)
    if dtype == torch.float64:
        loop = pergroup.segment_gradients(model, x, y, ids, 9, fallback="loop")
        for g, w in zip(loop, want):
            torch.testing.assert_close(g, w)
    # Nothing is left hooked on the model.
    assert not any(m._forward_hooks for m in model.modules())


def test_frozen_parameters_are_skipped():
    torch.manual_seed(1)
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=2)
    model.features[0].weight.requires_grad_(False)
    model.features[1].bias.requires_grad_(False)
    x, y, ids = torch.randn(12, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (12,)), layout(12, 6, 2)
    model = model.double()
    got = pergroup.segment_gradients(model, x, y, ids, 6)
    want = loop_grads(model, x, y, ids, 6)
    assert len(got) == len(list(model.parameters())) - 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_batchnorm_is_refused_with_layer_name():
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=2, norm="batchnorm")
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match=r"features\.1.*couples the samples"):
        pergroup.segment_gradients(model, x, y, torch.zeros(6, dtype=torch.long), 1)
    got = pergroup.segment_gradients(model, x, y, torch.zeros(6, dtype=torch.long), 1, fallback="loop")
    assert len(got) == len(list(model.parameters()))


@pytest.mark.parametrize("bad,match", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                           nn.LazyLinear(3)), r"'1' \(Conv2d\).*groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(), nn.Flatten(), nn.LazyLinear(3)),
     r"'1' \(PReLU\).*cannot be decomposed"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False).eval(), nn.Flatten(),
                           nn.LazyLinear(3)), r"'1' \(BatchNorm2d\).*no running statistics"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3)),
     r"'0' \(Conv2d\).*in place"),
])
def test_undecomposable_models_are_refused(bad, match):
    model = bad()
    x, y, ids = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,)), torch.tensor([0, 1, 0, 1, 1])
    model(x)
    with pytest.raises(ValueError, match=match):
        pergroup.segment_gradients(model, x, y, ids, 2)
    assert not any(m._forward_hooks for m in model.modules())
    # The loop fallback takes any model.
    got = pergroup.segment_gradients(model, x, y, ids, 2, fallback="loop")
    want = loop_grads(model, x, y, ids, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_hooks_removed_when_the_forward_fails():
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=1)
    x, ids = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises((IndexError, RuntimeError)):
        pergroup.segment_gradients(model, x, torch.full((4,), 9), ids, 1)  # label 9 of 4 classes
    assert not any(m._forward_hooks for m in model.modules())


def test_argument_errors():
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=1)
    x, y = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="same length"):
        pergroup.segment_gradients(model, x, y[:3], torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="outside"):
        pergroup.segment_gradients(model, x, y, torch.full((4,), 3), 2)
    with pytest.raises(ValueError, match="fallback"):
        pergroup.segment_gradients(model, x, y, torch.zeros(4, dtype=torch.long), 1, fallback="vmap")


def test_class_gradients_carry_autograd():
    model = get_network("ConvNet", 3, 3, 16, width=8, depth=2)
    syn = torch.randn(6, 3, 16, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grads = pergroup.class_gradients(model, syn, labels, 3)
    assert [g.shape[0] for g in grads] == [3] * len(grads)
    (gx,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), syn)
    assert gx.abs().sum() > 0


def test_class_gradients_batched_equals_loop():
    torch.manual_seed(3)
    model = get_network("ConvNet", 3, 4, 12, width=8, depth=2).double()
    syn = torch.randn(7, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0])  # class 3 has no rows
    loop = pergroup.class_gradients(model, syn, labels, 4)
    batched = pergroup.class_gradients(model, syn, labels, 4, batched=True)
    for a, b in zip(loop, batched):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        assert (b[3] == 0).all()
    # The same gradient reaches the synthetic images through both.
    w = [torch.randn_like(g) for g in loop]
    (ga,) = torch.autograd.grad(sum((g * v).sum() for g, v in zip(loop, w)), syn)
    (gb,) = torch.autograd.grad(sum((g * v).sum() for g, v in zip(batched, w)), syn)
    torch.testing.assert_close(gb, ga, rtol=1e-8, atol=1e-12)
