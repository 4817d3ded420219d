"""Per-group gradients of one DC outer step: the reference loop vs one pass.

The real-gradient side of one DC matching step for C = 10 classes (a real
batch of 256 per class; 40 with --quick) at G = 1, 2, 5, 10, 20, 50, 100
groups, on the default DC network (ConvNet width 128, depth 3, instance norm,
32x32x3 input). Each class's batch is split over its G groups with random
sizes (Dirichlet(1) proportions), so at large G some groups are empty. Timed
side by side in one run:

  loop     vanilla  per class one forward, one torch.autograd.grad of the
                    class mean loss (the DC reference code);
  loop     fairdd   per class one forward, then one torch.autograd.grad per
                    group present (retain_graph) of that group's mean loss
                    (the FairDD reference code);
  fastfair vanilla  fastfair.pergroup.segment_gradients over the whole batch,
                    segment = class (S = C);
  fastfair fairdd   with --layout compact (the default; what the driver
                    runs in one process): the gradients of the (class, group)
                    segments present in the batch only
                    (fastfair.distill.dc.present_segment_gradients: one
                    torch.unique, then segment_gradients over the present
                    ids); with --layout dense: segment_gradients over every
                    segment = class * G + group (S = C * G), empty ones
                    zero. Both also take the segment counts that
                    fastfair.objectives.dc_matching_loss needs.

The synthetic side (per-class gradients of the small synthetic batch, the
matching loss and the image update) is the same for every row and is left
out. Before timing, loop and fastfair are checked once per G to give the
same gradients (float32; per parameter tensor ||a - b|| <= 1e-3 ||b|| plus a
floor of 1e-5 of the whole gradient's norm, for the conv biases that instance
norm makes ~0; TF32 off during the check only), so the rows cannot compare
different computations. The JSON also holds the ratios the targets are about
(issue 4): fastfair fairdd / fastfair vanilla (target <= 1.3 at G = 10; the
FairDD paper reports 3.0 for its loop), loop fairdd / fastfair fairdd (target
>= 3 at G = 10, >= 20 at G = 100).

A loop call slower than --loop-budget seconds is timed once (its check call)
instead of warm-up + 3 repeats; the row says so in "samples".

``--precision`` chooses the CUDA weight-gradient path that is TIMED (the
check always runs in fp32, whose error bound it asserts: bf16 weight
gradients are ~3e-3 relative, above the check's 1e-3). The timed fastfair
calls run under ``ops.validate_ids(False)``, as the driver's hot loop does.
The JSON is rewritten after every G, and SIGTERM / Ctrl-C stop the sweep
keeping the finished points (exit code 130).

Usage: fastfair bench dc [--device cpu|cuda] [--quick]
       python benchmarks/dc_step.py --device cpu|cuda [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, wgrad
from ..nets import get_network
from ..distill.dc import compact_layout, present_segment_gradients
from ..pergroup import segment_gradients
from .segment import parse_groups
from .timing import (add_run_args, default_json, describe_machine, loglog_plot, parse_device, samples_ms,
                     step_ratios, stopped_cleanly, write_json)

NAME = "dc_step"
GROUPS = [1, 2, 5, 10, 20, 50, 100]
IMPLS = ("loop", "fastfair")
OBJECTIVES = ("vanilla", "fairdd")
LAYOUTS = ("compact", "dense")
# (G, numerator, denominator, target) of the ratios the issue sets targets for.
RATIOS = [
    (10, ("fastfair", "fairdd"), ("fastfair", "vanilla"), "<= 1.3"),
    (10, ("loop", "fairdd"), ("fastfair", "fairdd"), ">= 3"),
    (100, ("fastfair", "fairdd"), ("fastfair", "vanilla"), None),
    (100, ("loop", "fairdd"), ("fastfair", "fairdd"), ">= 20"),
    (10, ("loop", "fairdd"), ("loop", "vanilla"), "the FairDD paper: 3.0"),
]

Batch = tuple[Tensor, Tensor, Tensor]  # images [C*B, 3, H, W], labels [C*B], groups [C*B]
Grads = list[Tensor]  # per trainable parameter: [segments, *p.shape]


def make_batch(classes: int, per_class: int, groups: int, image_size: int, gen: torch.Generator,
               device: str) -> Batch:
    """A class-sorted real batch whose classes split over groups with random sizes."""
    x = torch.randn(classes * per_class, 3, image_size, image_size, generator=gen)
    y = torch.arange(classes).repeat_interleave(per_class)
    # Dirichlet(1) group proportions per class (normalised exponentials), then
    # each sample draws its group: sizes vary, and groups can be empty.
    p = -torch.rand(classes, groups, generator=gen).clamp(min=1e-12).log()
    grp = torch.multinomial(p / p.sum(1, keepdim=True), per_class, replacement=True, generator=gen).flatten()
    return x.to(device), y.to(device), grp.to(device)


def _class_slices(classes: int, per_class: int) -> list[slice]:
    return [slice(c * per_class, (c + 1) * per_class) for c in range(classes)]


def loop_vanilla(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int,
                 groups: int) -> list[tuple[int, tuple[Tensor, ...]]]:
    """The DC reference: per class one forward and one grad of the class mean loss."""
    x, y, _ = batch
    out = []
    for c, rows in enumerate(_class_slices(classes, x.shape[0] // classes)):
        loss = F.cross_entropy(model(x[rows]), y[rows])
        out.append((c, torch.autograd.grad(loss, params)))
    return out


def loop_fairdd(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int,
                groups: int) -> list[tuple[int, tuple[Tensor, ...]]]:
    """The FairDD reference: per class one forward, one grad per group present."""
    x, y, grp = batch
    out = []
    for c, rows in enumerate(_class_slices(classes, x.shape[0] // classes)):
        losses = F.cross_entropy(model(x[rows]), y[rows], reduction="none")
        gc = grp[rows]
        present = torch.unique(gc).tolist()  # a host sync, as in the reference code
        for j, g in enumerate(present):
            gs = torch.autograd.grad(losses[gc == g].mean(), params, retain_graph=j < len(present) - 1)
            out.append((c * groups + g, gs))
    return out


def fastfair_vanilla(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int,
                     groups: int) -> tuple[Tensor, ...]:
    x, y, _ = batch
    return segment_gradients(model, x, y, y, classes)


def fastfair_fairdd(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int,
                    groups: int) -> tuple[Tensor, ...]:
    x, y, grp = batch
    seg = y * groups + grp
    grads = segment_gradients(model, x, y, seg, classes * groups)
    ops.segment_count(seg, classes * groups)  # the counts dc_matching_loss weighs the groups with
    return grads


class Present(NamedTuple):
    """Gradients of the present segments only: row i is segment ``segments[i]``."""

    grads: tuple[Tensor, ...]
    segments: Tensor


def fastfair_fairdd_compact(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int,
                            groups: int) -> tuple[Tensor, ...] | Present:
    """The driver's layout: only the segments present (dense at G = 1, as there)."""
    x, y, grp = batch
    if not compact_layout(groups, "intersection"):
        return fastfair_fairdd(model, params, batch, classes, groups)
    seg = y * groups + grp
    grads, present = present_segment_gradients(model, x, y, seg, chunk="auto")
    ops.segment_count(seg, classes * groups)
    return Present(grads, present)


FNS: dict[tuple[str, str], Callable[..., object]] = {
    ("loop", "vanilla"): loop_vanilla,
    ("loop", "fairdd"): loop_fairdd,
    ("fastfair", "vanilla"): fastfair_vanilla,
    ("fastfair", "fairdd"): fastfair_fairdd_compact,
}


def functions(layout: str) -> dict[tuple[str, str], Callable[..., object]]:
    """The timed implementations, fastfair fairdd in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return {**FNS, ("fastfair", "fairdd"): FNS[("fastfair", "fairdd")] if layout == "compact" else fastfair_fairdd}


def densify(got: object, params: list[nn.Parameter], segments: int) -> Sequence[Tensor]:
    """A compact result as the dense [S, ...] gradients (absent segments zero)."""
    if not isinstance(got, Present):
        return got  # type: ignore[return-value]
    out = [p.new_zeros((segments, *p.shape)) for p in params]
    for o, g in zip(out, got.grads):
        o[got.segments] = g
    return out


def _dense(pairs: Sequence[tuple[int, tuple[Tensor, ...]]], params: list[nn.Parameter], segments: int) -> Grads:
    out = [p.new_zeros((segments, *p.shape)) for p in params]
    for s, gs in pairs:
        for o, g in zip(out, gs):
            o[s] = g
    return out


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def compare(got: Sequence[Tensor], ref: Sequence[Tensor], what: str, rtol: float = 1e-3) -> float:
    """Largest per-parameter relative error, with the floor (1e-5 of the whole
    gradient's norm) counted in the scale; AssertionError above ``rtol``."""
    floor = 1e-5 * torch.sqrt(sum(r.double().pow(2).sum() for r in ref)).item()
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            raise AssertionError(f"{what}: parameter {i} has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        err = (a.double() - b.double()).norm().item()
        scale = b.double().norm().item()
        if not err <= rtol * scale + floor:
            raise AssertionError(f"{what}: parameter {i} {tuple(b.shape[1:])} differs: |a-b| = {err:.3e}, "
                                 f"|b| = {scale:.3e} (rtol {rtol})")
        # The effective relative error (<= rtol when the check passes).
        worst = max(worst, err / max(scale + floor / rtol, 1e-30))
    return worst


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def check_point(model: nn.Module, params: list[nn.Parameter], batch: Batch, classes: int, groups: int,
                device: str, fns: dict[tuple[str, str], Callable[..., object]] | None = None,
                ) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Loop and fastfair agree (both objectives) on ``batch``; returns the
    worst relative errors and the wall time of each call of the check. A
    compact result is compared as its dense equivalent, so a present segment
    it leaves out (or an absent one it invents) fails the check too."""
    fns = FNS if fns is None else fns
    ms: dict[tuple[str, str], float] = {}
    errs: dict[str, float] = {}
    with _no_tf32():
        for obj in OBJECTIVES:
            loop_fn, ff_fn = fns[("loop", obj)], fns[("fastfair", obj)]
            ref, ms[("loop", obj)] = _timed(lambda f=loop_fn: f(model, params, batch, classes, groups), device)
            got, ms[("fastfair", obj)] = _timed(lambda f=ff_fn: f(model, params, batch, classes, groups), device)
            segments = classes * (groups if obj == "fairdd" else 1)
            errs[obj] = compare(densify(got, params, segments), _dense(ref, params, segments),
                                f"dc_step G={groups} {obj}: fastfair vs loop")
    return errs, ms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dc_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, NAME, "a real batch of 40 per class instead of 256", "the PNG goes beside it")
    p.add_argument("--groups", type=parse_groups, default=None, help="comma-separated G values (default "
                                                                     + ",".join(map(str, GROUPS)) + ")")
    p.add_argument("--batch", type=int, default=None, help="real images per class (default 256; 40 with --quick)")
    p.add_argument("--classes", type=int, default=10, help="classes C")
    p.add_argument("--width", type=int, default=128, help="ConvNet width")
    p.add_argument("--depth", type=int, default=3, help="ConvNet depth")
    p.add_argument("--image-size", type=int, default=32, help="image side (3 channels)")
    p.add_argument("--loop-budget", type=float, default=120.0,
                   help="seconds: a loop call slower than this is timed once (its check call)")
    p.add_argument("--precision", default="fp32", choices=wgrad.PRECISIONS,
                   help="CUDA weight-gradient path of the TIMED fastfair calls (the check runs in fp32); "
                        "no effect on CPU")
    p.add_argument("--layout", default="compact", choices=LAYOUTS,
                   help="fastfair fairdd: compact computes only the (class, group) segments present, as the "
                        "driver does in one process; dense computes all C * G (the layout before it, and "
                        "torchrun's) (default: compact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the network and the batches")
    p.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)  # timed calls per point
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    a = parser.parse_args(argv)
    device = parse_device(parser, a.device)
    per_class = a.batch or (40 if a.quick else 256)
    groups_list = a.groups or GROUPS
    if min(per_class, a.classes, a.width, a.depth, a.image_size) < 1:
        parser.error("--batch, --classes, --width, --depth and --image-size must be >= 1")
    machine = describe_machine(device)
    torch.manual_seed(a.seed)
    model = get_network("ConvNet", 3, a.classes, a.image_size, width=a.width, depth=a.depth,
                        norm="instancenorm").to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    setting = (f"C={a.classes} x {per_class} real images, ConvNet w{a.width} d{a.depth} instancenorm "
               f"{a.image_size}x{a.image_size}x3")
    print(f"DC real-gradient side, {setting}, float32 on {machine['name']}, {machine['threads']} threads, "
          f"fastfair backend {ops.backend()}")
    base = {"device": device, "machine": machine["name"], "cpu": machine["cpu"], "gpu": machine["gpu"],
            "threads": machine["threads"], "torch": machine["torch"], "batch": per_class, "classes": a.classes,
            "width": a.width, "depth": a.depth, "image_size": a.image_size, "backend": ops.backend(),
            "layout": a.layout}
    rows: list[dict] = []
    checks: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(a.seed)
    head = f"{'G':>5} " + " ".join(f"{i + ' ' + o:>18}" for i in IMPLS for o in OBJECTIVES) + "   (ms)"
    print(head)
    path = a.json or default_json(NAME, device)
    base["precision"] = a.precision

    def save() -> None:
        write_json(path, {"benchmark": NAME, "machine": machine, "setting": setting, "dtype": "float32",
                          "precision": a.precision, "layout": a.layout, "ratios": step_ratios(rows, RATIOS), "check_max_rel_err": checks,
                          "complete": len(checks) == len(groups_list), "rows": rows})

    with stopped_cleanly(path):
        for g in groups_list:
            _point(a, model, params, g, per_class, gen, device, base, rows, checks)
            save()
    ratios = step_ratios(rows, RATIOS)
    for name, r in ratios.items():
        print(f"{name}: {r['ratio']:.2f}" + (f"  (target {r['target']})" if r["target"] else ""))
    png = os.path.splitext(path)[0] + ".png"
    loglog_plot(rows, "groups", "ms", lambda r: f"{r['impl']} {r['objective']}",
                f"DC per-group gradients, C={a.classes} x {per_class}, ConvNet w{a.width} d{a.depth} "
                f"{a.image_size}px\n{machine['name']}, {machine['threads']} threads", png)
    print(f"wrote {path} and {png}")
    return rows


def _point(a: argparse.Namespace, model: nn.Module, params: list[nn.Parameter], g: int, per_class: int,
           gen: torch.Generator, device: str, base: dict, rows: list[dict], checks: dict) -> None:
    """One G: the fp32 check, then every implementation timed (fastfair at ``a.precision``)."""
    batches = [make_batch(a.classes, per_class, g, a.image_size, gen, device) for _ in range(3)]
    fns = functions(a.layout)
    errs, check_ms = check_point(model, params, batches[0], a.classes, g, device, fns)
    checks[str(g)] = errs
    cells = []
    for impl in IMPLS:
        for obj in OBJECTIVES:
            fn = fns[(impl, obj)]
            if impl == "loop" and check_ms[(impl, obj)] > a.loop_budget * 1e3:
                ts = [check_ms[(impl, obj)]]  # too slow to repeat: its check call, already timed
            elif impl == "loop":
                ts = samples_ms(lambda i, fn=fn: fn(model, params, batches[i % 3], a.classes, g), device=device,
                                warmup=1, repeats=min(3, a.repeats))
            else:
                with wgrad.weight_grad_precision(a.precision), ops.validate_ids(False):
                    ts = samples_ms(lambda i, fn=fn: fn(model, params, batches[i % 3], a.classes, g),
                                    device=device, warmup=2, repeats=a.repeats)
            ms = statistics.median(ts)
            rows.append({"impl": impl, "objective": obj, "groups": g, "ms": ms, "samples": len(ts), **base})
            cells.append(f"{ms:18.2f}")
    print(f"{g:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
