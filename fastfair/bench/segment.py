"""Segment reductions (mean, and sum where the driver sums) at the shapes the
driver uses, G = 1 .. 10^5 segments.

Cases (``--n/--d/--groups`` replace them with one custom case):
  d64       N = 2^17 (2^20 on CUDA; D = 512 there), mean: group-count scaling
  d512      N = 20000, D = 512, mean
  dm-emb    N = 2560, D = 2048, mean: DM's real embeddings (ConvNet width
            128 at 32 px, 256 images a class x 10 classes)
  dc-bias   N = 2560, D = 128, sum: the DC bias / GroupNorm sums of
            fastfair.pergroup (B summed over positions, [N, C_out] rows,
            S = C * G up to 1000)
Implementations, timed round-robin in one process (one call of each in turn,
so that load from other processes hits all alike):
  loop            the reference code's masked loop over groups
                  (torch.stack([x[ids == g].mean(0) for g in ids.unique()]));
                  skipped above --loop-max-groups (it is O(G * N))
  index_add       index_add_ sums (divided by counts for the mean)
  scatter_reduce  scatter_reduce_(..., "mean" or "sum")
  torch_scatter   torch_scatter.scatter_mean / scatter_sum, where it imports
  fastfair        fastfair.ops.segment_mean / segment_sum

torch_scatter: PyPI has only the 2.1.2 source distribution, and a plain
``pip install torch-scatter`` fails (its setup.py imports torch inside pip's
isolated build environment). It builds against the installed torch with
``pip install --no-build-isolation --no-deps torch-scatter`` (CPU only unless
CUDA is found; about 4 minutes on 2 cores). Where it does not import, the JSON
says ``"torch_scatter": "not installed: <reason>"`` and the sweep runs without
it.

Before timing, every implementation is checked once per point against
fastfair (float32, relative error <= 1e-4 on the present segments), so the
sweep cannot compare different computations.

Usage: fastfair bench segment [--device cpu|cuda] [--quick]
       python benchmarks/segment_ops.py --device cpu|cuda [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from .timing import (add_run_args, copy_bandwidth_gbs, default_json, describe_machine, loglog_plot, parse_device,
                     stopped_cleanly, time_call_ms, write_json)

NAME = "segment_ops"
FULL_GROUPS = [1, 2, 4, 16, 100, 1000, 10_000, 100_000]
QUICK_GROUPS = [g for g in FULL_GROUPS if g <= 10_000]
# How to get torch_scatter where it is missing (see the docstring).
_SCATTER_BUILD_NOTE = ("only the 2.1.2 sdist is on PyPI; build it against the installed torch with "
                       "pip install --no-build-isolation --no-deps torch-scatter")

Impl = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    groups: tuple[int, ...]
    op: str  # "mean" or "sum"


def cases(device: str, quick: bool) -> list[Case]:
    """The default sweep: group-count scaling at one width, then the driver's shapes."""
    cuda = torch.device(device).type == "cuda"
    q = 8 if quick else 1
    scaling = QUICK_GROUPS if quick else FULL_GROUPS
    out = [Case("d64" if not cuda else "d512-scaling", ((1 << 20) if cuda else (1 << 17)) // q,
                512 if cuda else 64, tuple(scaling), "mean")]
    if not cuda:
        out.append(Case("d512", 20000 // q, 512, (1, 4, 16, 100, 1000) + (() if quick else (10_000,)), "mean"))
    out.append(Case("dm-emb", 2560, 2048, (1, 10, 100, 1000), "mean"))
    out.append(Case("dc-bias", 2560, 128, (1, 10, 100, 1000), "sum"))
    return out


def _loop(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return torch.stack([x[ids == g].mean(0) for g in ids.unique()])


def _loop_sum(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return torch.stack([x[ids == g].sum(0) for g in ids.unique()])


def _index_add_sum(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)


def _index_add(x: Tensor, ids: Tensor, s: int) -> Tensor:
    total = _index_add_sum(x, ids, s)
    count = torch.zeros(s, dtype=x.dtype, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
    return total / count.clamp(min=1).unsqueeze(1)


def _scatter_reduce(x: Tensor, ids: Tensor, s: int, how: str = "mean") -> Tensor:
    out = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(0, ids.unsqueeze(1).expand_as(x), x, how, include_self=False)


def _fastfair(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return ops.segment_mean(x, ids, s)


def impls(op: str = "mean") -> tuple[dict[str, Impl], str]:
    """The implementations of ``op`` ("mean" or "sum"), and the torch_scatter
    status line for the JSON."""
    mean = op == "mean"
    out: dict[str, Impl] = {
        "loop": _loop if mean else _loop_sum,
        "index_add": _index_add if mean else _index_add_sum,
        "scatter_reduce": lambda x, ids, s: _scatter_reduce(x, ids, s, op),
    }
    try:
        import torch_scatter  # type: ignore[import-not-found]

        fn = torch_scatter.scatter_mean if mean else torch_scatter.scatter_sum
        out["torch_scatter"] = lambda x, ids, s: fn(x, ids, dim=0, dim_size=s)
        status = f"installed: {getattr(torch_scatter, '__version__', '?')}"
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ImportError):
            reason += f" ({_SCATTER_BUILD_NOTE})"
        status = f"not installed: {reason}"
    out["fastfair"] = _fastfair if mean else ops.segment_sum
    return out, status


def _check(name: str, got: Tensor, ref: Tensor, ids: Tensor) -> None:
    if name == "loop":  # rows of the present segments only, in id order
        ref = ref[ids.unique()]
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    if not err <= 1e-4:
        raise AssertionError(f"segment benchmark: {name} disagrees with fastfair (relative error {err:.2e})")


def round_robin_ms(fns: dict[str, Callable[[int], object]], *, device: str, repeats: int, warmup: int = 2,
                   max_seconds: float = 20.0) -> dict[str, list[float]]:
    """Wall times (ms) of every fn(i), one call of each per round, so that a
    burst of load from other processes lands on all of them alike. ``i``
    counts calls (of any implementation), so a caller that rotates its inputs
    by ``i`` modulo more inputs than there are implementations never hands a
    call the input the call before it read: every implementation meets the
    caches alike (when every call of a round read the round's input, the
    first paid the memory reads and the others found it in cache: 0.9 against
    0.5 ms at 2560 x 2048 on this CPU). The order of the implementations
    rotates by one each round, so none always follows the same one (its
    thread wake-ups, its allocations). CUDA: events around each call after an
    L2 flush. An implementation stops after ``max_seconds`` (with >= 3
    samples), so a slow baseline does not stall the sweep."""
    cuda = torch.device(device).type == "cuda"
    names = list(fns)
    calls = 0
    for _ in range(warmup):
        for name in names:
            fns[name](calls)
            calls += 1
    if cuda:
        torch.cuda.synchronize()
    out: dict[str, list[float]] = {k: [] for k in fns}
    spent: dict[str, float] = {k: 0.0 for k in fns}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if len(out[name]) >= 3 and spent[name] > max_seconds:
                continue
            ms = time_call_ms(fns[name], calls, device)
            calls += 1
            out[name].append(ms)
            spent[name] += ms * 1e-3
    return out


def parse_groups(text: str) -> list[int]:
    try:
        groups = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not groups or min(groups) < 1:
        raise argparse.ArgumentTypeError(f"group counts must be >= 1, got {text!r}")
    return groups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segment_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, NAME, "fewer rows and G up to 10^4 in the scaling cases", "one PNG per case goes beside it")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of the default cases (d64, d512, dm-emb, dc-bias; d512-scaling on CUDA)")
    p.add_argument("--n", type=int, default=None, help="one custom case: rows (default 2^17 on CPU, 2^20 on CUDA)")
    p.add_argument("--d", type=int, default=None, help="one custom case: features (default 64 on CPU, 512 on CUDA)")
    p.add_argument("--groups", type=parse_groups, default=None,
                   help="one custom case: comma-separated G values (default 1,2,4,16,100,1000,10000,100000)")
    p.add_argument("--op", choices=["mean", "sum"], default="mean", help="one custom case: the reduction")
    p.add_argument("--loop-max-groups", type=int, default=1000, help="skip the loop above this G (it is O(G*N))")
    p.add_argument("--repeats", type=int, default=31,
                   help="timed calls of each implementation per point, round-robin; the median is reported "
                        "(default 31: a CPU call of 0.1 ms varies 2-3x from call to call on a shared VM, and 7 "
                        "calls left the ranking of two implementations within 20%% of each other to chance)")
    return p


def _select_cases(a: argparse.Namespace, device: str, parser: argparse.ArgumentParser) -> list[Case]:
    if a.n is not None or a.d is not None or a.groups is not None:
        cuda = torch.device(device).type == "cuda"
        n = a.n or ((1 << 20) if cuda else (1 << 17)) // (8 if a.quick else 1)
        d = a.d or (512 if cuda else 64)
        groups = a.groups or (QUICK_GROUPS if a.quick else FULL_GROUPS)
        return [Case("custom", n, d, tuple(groups), a.op)]
    default = cases(device, a.quick)
    if a.cases is None:
        return default
    want = [c.strip() for c in a.cases.split(",") if c.strip()]
    known = {c.name: c for c in default}
    unknown = [w for w in want if w not in known]
    if unknown or not want:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")
    return [known[w] for w in want]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    a = parser.parse_args(argv)
    device = parse_device(parser, a.device)
    cuda = torch.device(device).type == "cuda"
    todo = _select_cases(a, device, parser)
    machine = describe_machine(device)
    # On CUDA 1 GB (far past the L2, as the flushed timed calls are); on CPU
    # the largest case's three rotated inputs, since their working set may sit
    # in a large shared L3, and the fraction should compare like with like.
    biggest = max(c.n * c.d for c in todo)
    bw = copy_bandwidth_gbs(device, nbytes=(1 << 30) if cuda else 3 * biggest * 4)
    print(f"segment reductions, float32 on {machine['name']}, {machine['threads']} threads, "
          f"fastfair backend {ops.backend()}" + (f", copy bandwidth {bw:.0f} GB/s" if bw else ""))
    rows: list[dict] = []
    scatter_status = impls("mean")[1]  # the JSON says it from the first point on
    # Inputs are drawn on the device: on a GPU a host generator plus a copy
    # takes minutes for the 2 GB inputs of the large cases.
    gen = torch.Generator(device=device).manual_seed(0)
    path = a.json or default_json(NAME, device)

    def save() -> None:  # after every point: a cut-off run keeps what finished
        payload = {"benchmark": NAME, "machine": machine, "dtype": "float32", "torch_scatter": scatter_status,
                   "copy_bandwidth_gbs": bw, "rows": rows,
                   "timing": "round-robin (order rotated each round; inputs rotated per call, one set more than "
                             "implementations), median",
                   "cases": [c.__dict__ | {"groups": list(c.groups)} for c in todo]}
        if len(todo) == 1:
            payload |= {"n": todo[0].n, "d": todo[0].d}
        write_json(path, payload)

    with stopped_cleanly(path):
        for case in todo:
            scatter_status = _run_case(a, case, device, gen, bw, machine, rows, save)
            base = os.path.splitext(path)[0]
            png = base + ".png" if len(todo) == 1 else f"{base}_{case.name}.png"
            loglog_plot([r for r in rows if r["case"] == case.name], "groups", "ms", "impl",
                        f"segment {case.op} N={case.n} D={case.d} ({machine['name']})", png)
    print(f"wrote {path} and its PNGs")
    return rows


# Back-to-back calls whose events give the GPU time of one fastfair call
# without the host's launch and validation inside the measurement.
_BACK_TO_BACK = 50


def _gpu_us_back_to_back(fn: Callable[[int], object]) -> float:
    with ops.validate_ids(False):
        fn(0)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for i in range(_BACK_TO_BACK):
            fn(i)
        b.record()
        b.synchronize()
    return a.elapsed_time(b) * 1e3 / _BACK_TO_BACK


def _run_case(a: argparse.Namespace, case: Case, device: str, gen: torch.Generator, bw: float | None,
              machine: dict, rows: list[dict], save: Callable[[], None]) -> str:
    cuda = torch.device(device).type == "cuda"
    fns, scatter_status = impls(case.op)
    n, d = case.n, case.d
    print(f"[{case.name}] segment {case.op}, N={n} D={d}; torch_scatter: {scatter_status}", flush=True)
    bytes_moved = n * d * 4  # the read of x dominates; outputs are G x D
    for g in case.groups:
        # One input set more than there are implementations, rotated by call
        # (round_robin_ms): no call reads what the call before it read.
        k = len(fns) + 1
        xs = [torch.randn(n, d, generator=gen, device=device) for _ in range(k)]
        idss = [torch.randint(0, g, (n,), generator=gen, device=device) for _ in range(k)]
        ref = fns["fastfair"](xs[0], idss[0], g)
        timed: dict[str, Callable[[int], object]] = {}
        line = [f"G={g:>6}"]
        for name, fn in fns.items():
            if name == "loop" and g > a.loop_max_groups:
                line.append(f"{name}=skipped")
                continue
            if name != "fastfair":
                _check(name, fn(xs[0], idss[0], g), ref, idss[0])
            timed[name] = lambda i, fn=fn: fn(xs[i % k], idss[i % k], g)
        samples = round_robin_ms(timed, device=device, repeats=a.repeats)
        for name, ts in samples.items():
            ms = statistics.median(ts)
            row = {"case": case.name, "op": case.op, "impl": name, "groups": g, "n": n, "d": d, "ms": ms,
                   "samples": len(ts), "device": device, "machine": machine["name"],
                   "threads": machine["threads"], "torch": machine["torch"], "backend": ops.backend()}
            if bw:
                row["gbs"] = bytes_moved / (ms * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbs"] / (bw / 2)  # copy bw counts read + write
            if cuda and name == "fastfair":
                row["gpu_us_back_to_back"] = _gpu_us_back_to_back(timed[name])
            rows.append(row)
            line.append(f"{name}={ms:.3f}ms")
        print("  ".join(line), flush=True)
        save()
    return scatter_status


if __name__ == "__main__":
    main()
