"""segment_gradients refuses every layer that couples the samples of a batch,
whatever its parameters (issue 13.4): without the refusal these models give
per-segment gradients that differ from the per-segment loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastfair import pergroup


def _frozen(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _model(mid: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), mid, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


CASES = {
    "bn-train-no-affine": (lambda: nn.BatchNorm2d(4, affine=False), "training mode"),
    "bn-train-frozen-affine": (lambda: _frozen(nn.BatchNorm2d(4)), "training mode"),
    "bn-eval-no-stats-no-affine": (lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False).eval(),
                                   "no running statistics"),
    "syncbn-train-no-affine": (lambda: nn.SyncBatchNorm(4, affine=False), "training mode"),
    "softmax-dim0": (lambda: nn.Softmax(dim=0), "batch dimension"),
}


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (8,), generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])



@pytest.mark.parametrize("case", list(CASES))
def test_coupling_layers_are_refused(case, monkeypatch):
    make, match = CASES[case]
    model = _model(make())
    x, y, ids = _data()
    with pytest.raises(ValueError, match=rf"'1' \({type(model[1]).__name__}\).*{match}"):
        pergroup.segment_gradients(model, x, y, ids, 4)
    # ... because the one pass would be wrong: it differs from the per-segment loop.
    loop = pergroup.segment_gradients(model, x, y, ids, 4, fallback="loop")
    monkeypatch.setattr(pergroup, "check_decomposable", lambda model: None)
    one = pergroup.segment_gradients(model, x, y, ids, 4, chunk=None)
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(one, loop)) > 1e-3


@pytest.mark.parametrize("mid", [
    lambda: nn.InstanceNorm2d(4),
    lambda: nn.InstanceNorm2d(4, track_running_stats=True),
    lambda: nn.InstanceNorm2d(4, track_running_stats=True).eval(),
    lambda: _frozen(nn.BatchNorm2d(4)).eval(),
    lambda: nn.BatchNorm2d(4, affine=False).eval(),
    lambda: nn.Softmax(dim=1),
    lambda: nn.Identity(),
])
def test_per_sample_layers_are_accepted_and_exact(mid):
    model = _model(mid())
    x, y, ids = _data()
    one = pergroup.segment_gradients(model, x, y, ids, 4)
    loop = pergroup.segment_gradients(model, x, y, ids, 4, fallback="loop")
    for a, b in zip(one, loop):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _OutsideUse(nn.Module):
    """Uses a.weight a second time outside a's own call."""

    def __init__(self, outside: bool) -> None:
        super().__init__()
        self.a, self.b, self.outside = nn.Linear(6, 6), nn.Linear(6, 3), outside

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.outside:
            h = h + torch.nn.functional.linear(h, self.a.weight)
        return self.b(h)


class _Tied(nn.Module):
    """Two layers sharing a weight, and one layer called twice: every use is a module call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(self.a(x))))))


def _vec_data():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g),
            torch.arange(10) % 4)


def test_parameter_used_outside_its_module_is_refused(monkeypatch):
    torch.manual_seed(0)
    model = _OutsideUse(True).double()
    x, y, ids = _vec_data()
    with pytest.raises(ValueError, match=r"parameter 'a\.weight' enters the loss 2 time\(s\).*called 1 time"):
        pergroup.segment_gradients(model, x, y, ids, 4)
    # ... because the hooks alone would miss the outside use.
    loop = pergroup.segment_gradients(model, x, y, ids, 4, fallback="loop")
    monkeypatch.setattr(pergroup, "check_parameter_uses", lambda *a: None)
    one = pergroup.segment_gradients(model, x, y, ids, 4)
    assert float((one[0] - loop[0]).abs().max() / loop[0].abs().max()) > 1e-2


@pytest.mark.parametrize("make", [lambda: _OutsideUse(False), _Tied])
def test_module_calls_only_are_accepted_and_exact(make):
    torch.manual_seed(0)
    model = make().double()
    x, y, ids = _vec_data()
    one = pergroup.segment_gradients(model, x, y, ids, 4)
    loop = pergroup.segment_gradients(model, x, y, ids, 4, fallback="loop")
    for a, b in zip(one, loop):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_autocast_shared_weight_copies_count_per_call():
    # autocast caches one cast copy of a weight for all calls of the layer
    torch.manual_seed(0)
    model = _Tied()
    x, y, ids = _vec_data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pergroup.segment_gradients(model, x.float(), y, ids, 4)
    outside = _OutsideUse(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="a.weight"):
        pergroup.segment_gradients(outside, x.float(), y, ids, 4)
