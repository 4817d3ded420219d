"""Per-segment weight gradients: which implementation, measured side by side.

Two parts, one run, one JSON:

layers  every weight-gradient layer of the DC ConvNet (width 128, instance
        norm) at the driver's sizes, the rows sorted by segment as
        fastfair.pergroup delivers them (C = 10 classes, each split over G
        groups with Dirichlet(1) sizes, so some groups are empty at large G):
          cdigits   N = 2560 real images, 32 px, depth 3;
          imagenet  N = 1365 (one GPU pass of pergroup's automatic chunk), 64 px, depth 4.
        Methods: ``simt`` (the hand-written CUDA kernel,
        segment_*_weight_grad_simt), ``grouped_bf16`` / ``grouped_tf32`` /
        ``grouped_fp32`` (fastfair.wgrad: one grouped GEMM, sorted fast path,
        the casts and im2col included), ``cudnn_per_segment``
        (wgrad.per_segment_weight_grad: the segment offsets read back once,
        then torch.nn.grad.conv2d_weight / one mm per non-empty segment on
        its slice of rows), ``cpu_kernel`` (the C++
        CPU op, CPU only) and ``dense`` (ONE weight gradient of all rows: what
        vanilla pays, the floor). Each row has its error against float64
        (the float64 SIMT kernel on CUDA, the C++ kernel on CPU), relative to
        the largest entry.
network fastfair.pergroup.segment_gradients of the whole cdigits ConvNet per
        precision, against ONE vanilla backward over the same batch and the
        reference loop (one forward + backward per non-empty segment).

FLOPs per layer (2 N H'W' O I kh kw) and the attained TFLOP/s are in the rows.

Usage: python -m fastfair.bench.wgrad [--device cuda] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, wgrad
from ..nets import get_network
from ..pergroup import segment_gradients
from .segment import parse_groups
from .timing import add_run_args, default_json, describe_machine, parse_device, samples_ms, write_json

NAME = "wgrad"
GROUPS = [1, 2, 5, 10, 20, 50, 100]
CLASSES = 10
WIDTH = 128
# scale -> (rows, image side, depth)
SCALES = {"cdigits": (2560, 32, 3), "imagenet": (1365, 64, 4)}
GROUPED = ("grouped_bf16", "grouped_tf32", "grouped_fp32")


def segment_ids(rows: int, groups: int, gen: torch.Generator) -> Tensor:
    """Sorted ids class * G + group: C equal classes, Dirichlet(1) group sizes."""
    per = [rows // CLASSES + (1 if c < rows % CLASSES else 0) for c in range(CLASSES)]
    parts = []
    for c, n in enumerate(per):
        w = torch.distributions.Dirichlet(torch.ones(groups)).sample() if groups > 1 else torch.ones(1)
        g = torch.multinomial(w, n, replacement=True, generator=gen) if groups > 1 else torch.zeros(n, dtype=torch.long)
        parts.append(c * groups + g.sort().values)
    return torch.cat(parts)


def layer_shapes(side: int, depth: int, width: int = WIDTH) -> list[tuple[str, int, int, int]]:
    """(name, in channels, out channels, side) of the ConvNet's convs, then the classifier."""
    shapes = [("conv1", 3, width, side)]
    for d in range(1, depth):
        shapes.append((f"conv{d + 1}", width, width, side >> d))
    shapes.append(("fc", width * (side >> depth) ** 2, CLASSES, 0))
    return shapes


def _methods(device: str, conv: bool) -> dict[str, Callable[[Tensor, Tensor, Tensor, int], Tensor]]:
    cuda = torch.device(device).type == "cuda"
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])
    m: dict[str, Callable] = {}
    if cuda and ops.backend() == "cuda":
        if conv:
            m["simt"] = lambda b, a, i, s: torch.ops.fastfair.segment_conv2d_weight_grad_simt(b, a, i, s, *geo)
        else:
            m["simt"] = lambda b, a, i, s: torch.ops.fastfair.segment_linear_weight_grad_simt(b, a, i, s)
    for name in GROUPED:
        p = name.split("_")[1]
        if not cuda and p == "tf32":
            continue  # the same computation as fp32 on a CPU
        if conv:
            m[name] = lambda b, a, i, s, p=p: wgrad.grouped_conv2d_weight_grad(b, a, i, s, *geo, precision=p)
        else:
            m[name] = lambda b, a, i, s, p=p: wgrad.grouped_linear_weight_grad(b, a, i, s, precision=p)
    m["cudnn_per_segment" if cuda else "aten_per_segment"] = (
        lambda b, a, i, s: wgrad.per_segment_weight_grad(b, a, i, s, ((3, 3), (1, 1), (1, 1), (1, 1)) if conv else None))
    if not cuda and ops.backend() != "reference":
        if conv:
            m["cpu_kernel"] = lambda b, a, i, s: torch.ops.fastfair.segment_conv2d_weight_grad(b, a, i, s, *geo)
        else:
            m["cpu_kernel"] = lambda b, a, i, s: torch.ops.fastfair.segment_linear_weight_grad(b, a, i, s)
    if conv:
        m["dense"] = lambda b, a, i, s: torch.nn.grad.conv2d_weight(a, (b.shape[1], a.shape[1], 3, 3), b, 1, 1)
    else:
        m["dense"] = lambda b, a, i, s: b.t() @ a
    return m


def _reference(b: Tensor, a: Tensor, ids: Tensor, s: int, conv: bool) -> Tensor:
    with wgrad.weight_grad_precision("simt"):  # float64 takes the exact kernel on every device
        if conv:
            return ops.segment_conv2d_weight_grad(b.double(), a.double(), ids, s, 3, 1, 1, 1)
        return ops.segment_linear_weight_grad(b.double(), a.double(), ids, s)


def _rel(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:  # dense: one gradient of all rows
        want = want.sum(0)
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def bench_layers(device: str, scales: dict, groups: list[int], repeats: int, log: Callable[[str], None],
                 width: int = WIDTH, done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """``done(rows)`` after every layer (the caller saves: a cut-off keeps what finished)."""
    rows: list[dict] = []
    for scale, (n, side, depth) in scales.items():
        for name, ci, co, h in layer_shapes(side, depth, width):
            conv = h > 0
            gen = torch.Generator().manual_seed(n + ci + h)
            if conv:
                a = torch.randn(n, ci, h, h, generator=gen).relu_().to(device)
                b = torch.randn(n, co, h, h, generator=gen).mul_(1e-3).to(device)
                flops = 2 * n * h * h * co * ci * 9
            else:
                a = torch.randn(n, ci, generator=gen).relu_().to(device)
                b = torch.randn(n, co, generator=gen).mul_(1e-3).to(device)
                flops = 2 * n * co * ci
            for g in groups:
                s = CLASSES * g
                ids = segment_ids(n, g, gen).to(device)
                layout = wgrad.SegmentLayout.of_sorted(ids, s)
                want = _reference(b, a, ids, s, conv)
                for method, fn in _methods(device, conv).items():
                    with wgrad.sorted_segments(layout), ops.validate_ids(False):
                        got = fn(b, a, ids, s)
                        err = _rel(got, want)
                        del got
                        # The operands bound now: the loop deletes a and b after its last method.
                        t = samples_ms(lambda i, fn=fn, a=a, b=b, ids=ids, s=s: fn(b, a, ids, s), device=device,
                                       repeats=repeats, max_seconds=10)
                    ms = statistics.median(t)
                    rows.append({"part": "layers", "scale": scale, "layer": name, "rows": n, "in": ci, "out": co,
                                 "side": h, "groups": g, "segments": s, "method": method, "ms": ms,
                                 "samples": len(t), "gflop": flops / 1e9,
                                 "tflops": flops / (ms * 1e-3) / 1e12, "rel_err_vs_fp64": err})
                    log(f"{scale:8s} {name:5s} G={g:3d} {method:18s} {ms:9.3f} ms  err {err:.1e}")
                del want
            del a, b
            if done is not None:
                done(rows)
    return rows


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_network(device: str, rows_n: int, side: int, depth: int, width: int, groups: list[int], repeats: int,
                  loop_budget: float, log: Callable[[str], None],
                  done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, CLASSES, side, width=width, depth=depth).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows_n, 3, side, side, generator=gen).to(device)
    out = []

    precisions = ["bf16", "tf32", "fp32", "cudnn", "simt"] if torch.device(device).type == "cuda" else ["fp32"]
    for g in groups:
        s = CLASSES * g
        ids = segment_ids(rows_n, g, gen).to(device)
        y = ids // g

        def vanilla(i: int) -> object:
            return torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), params)

        t = samples_ms(vanilla, device=device, repeats=repeats, max_seconds=10)
        out.append({"part": "network", "groups": g, "segments": s, "method": "vanilla_backward",
                    "ms": statistics.median(t), "samples": len(t)})
        for p in precisions:
            with wgrad.weight_grad_precision(p), ops.validate_ids(False):
                t = samples_ms(lambda i: segment_gradients(net, x, y, ids, s), device=device, repeats=repeats,
                               max_seconds=10)
            out.append({"part": "network", "groups": g, "segments": s, "method": f"segment_gradients_{p}",
                        "ms": statistics.median(t), "samples": len(t)})
        _sync(device)
        t0 = time.perf_counter()
        segment_gradients(net, x, y, ids, s, fallback="loop")
        _sync(device)
        once = (time.perf_counter() - t0) * 1e3
        if once / 1e3 > loop_budget:
            t = [once]
        else:
            t = samples_ms(lambda i: segment_gradients(net, x, y, ids, s, fallback="loop"), device=device,
                           warmup=0, repeats=3, max_seconds=loop_budget)
        out.append({"part": "network", "groups": g, "segments": s, "method": "loop",
                    "ms": statistics.median(t), "samples": len(t)})
        for r in out[-len(precisions) - 2:]:
            log(f"network G={g:3d} {r['method']:26s} {r['ms']:9.2f} ms")
        if done is not None:
            done(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wgrad", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, NAME, "reduced sizes for a CPU: width 32, 40 / 20 rows, G = 1, 10, a width-16 network of 40 rows",
                 beside=None)
    p.add_argument("--groups", type=parse_groups, default=None, help="comma-separated G (default 1,2,5,10,20,50,100)")
    p.add_argument("--parts", default="layers,network", help="layers, network or both (default)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per point")
    p.add_argument("--loop-budget", type=float, default=20.0, help="seconds for the reference loop per G")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    a = parser.parse_args(argv)
    device = parse_device(parser, a.device)
    groups = a.groups or ([1, 10] if a.quick else GROUPS)
    scales = {"cdigits": (40, 32, 3), "imagenet": (20, 64, 4)} if a.quick else SCALES
    width = 32 if a.quick else WIDTH
    net_rows, net_width = (40, 16) if a.quick else (2560, WIDTH)
    parts = set(a.parts.split(","))
    path = a.json or default_json(NAME, device)
    machine = describe_machine(device)
    setting = {"scales": {k: {"rows": v[0], "side": v[1], "depth": v[2]} for k, v in scales.items()},
               "classes": CLASSES, "width": width, "groups": groups, "network_rows": net_rows,
               "network_width": net_width, "quick": a.quick, "ids": "sorted by segment (as pergroup delivers)"}
    rows: list[dict] = []

    def save(extra: list[dict] | None = None) -> None:  # often, so a cut-off keeps what finished
        write_json(path, {"benchmark": NAME, "machine": machine, "setting": setting, "rows": rows + (extra or [])})

    log = lambda line: print(line, flush=True)  # noqa: E731
    if "layers" in parts:
        rows += bench_layers(device, scales, groups, a.repeats, log, width, done=save)
        save()
    if "network" in parts:
        rows += bench_network(device, net_rows, 32, 3, net_width, groups, a.repeats, a.loop_budget, log, done=save)
        save()
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
