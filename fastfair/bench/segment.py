"""Group-count scaling of per-segment means.

Times, side by side in one run, at a fixed N x D and G = 1 .. 10^5 segments
(10^4 with --quick):
  loop            the reference code's masked loop over groups
                  (torch.stack([x[ids == g].mean(0) for g in ids.unique()]));
                  skipped above --loop-max-groups (it is O(G * N))
  index_add       index_add_ sums divided by counts
  scatter_reduce  scatter_reduce_(..., "mean")
  torch_scatter   torch_scatter.scatter_mean, where that package imports
  fastfair        fastfair.ops.segment_mean

torch_scatter: PyPI has only the 2.1.2 source distribution, and a plain
``pip install torch-scatter`` fails (its setup.py imports torch inside pip's
isolated build environment). It builds against the installed torch with
``pip install --no-build-isolation --no-deps torch-scatter`` (CPU only unless
CUDA is found; about 4 minutes on 2 cores). Where it does not import, the JSON
says ``"torch_scatter": "not installed: <reason>"`` and the sweep runs without
it.

Before timing, every implementation is checked once per G against fastfair
(float32, relative error <= 1e-4 on the present segments), so the sweep cannot
compare different computations.

Usage: fastfair bench segment [--device cpu|cuda] [--quick]
       python benchmarks/segment_ops.py --device cpu|cuda [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from .timing import check_device, copy_bandwidth_gbs, default_json, describe_machine, loglog_plot, samples_ms, write_json

NAME = "segment_ops"
FULL_GROUPS = [1, 2, 4, 16, 100, 1000, 10_000, 100_000]
QUICK_GROUPS = [g for g in FULL_GROUPS if g <= 10_000]
# How to get torch_scatter where it is missing (see the docstring).
_SCATTER_BUILD_NOTE = ("only the 2.1.2 sdist is on PyPI; build it against the installed torch with "
                       "pip install --no-build-isolation --no-deps torch-scatter")

Impl = Callable[[Tensor, Tensor, int], Tensor]


def _loop(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return torch.stack([x[ids == g].mean(0) for g in ids.unique()])


def _index_add(x: Tensor, ids: Tensor, s: int) -> Tensor:
    total = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)
    count = torch.zeros(s, dtype=x.dtype, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
    return total / count.clamp(min=1).unsqueeze(1)


def _scatter_reduce(x: Tensor, ids: Tensor, s: int) -> Tensor:
    out = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(0, ids.unsqueeze(1).expand_as(x), x, "mean", include_self=False)


def _fastfair(x: Tensor, ids: Tensor, s: int) -> Tensor:
    return ops.segment_mean(x, ids, s)


def impls() -> tuple[dict[str, Impl], str]:
    """The implementations, and the torch_scatter status line for the JSON."""
    out: dict[str, Impl] = {"loop": _loop, "index_add": _index_add, "scatter_reduce": _scatter_reduce}
    try:
        import torch_scatter  # type: ignore[import-not-found]

        out["torch_scatter"] = lambda x, ids, s: torch_scatter.scatter_mean(x, ids, dim=0, dim_size=s)
        status = f"installed: {getattr(torch_scatter, '__version__', '?')}"
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ImportError):
            reason += f" ({_SCATTER_BUILD_NOTE})"
        status = f"not installed: {reason}"
    out["fastfair"] = _fastfair
    return out, status


def _check(name: str, got: Tensor, ref: Tensor, ids: Tensor) -> None:
    if name == "loop":  # rows of the present segments only, in id order
        ref = ref[ids.unique()]
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    if not err <= 1e-4:
        raise AssertionError(f"segment benchmark: {name} disagrees with fastfair (relative error {err:.2e})")


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
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="N / 8 and G up to 10^4")
    p.add_argument("--json", default=None, help=f"output JSON (default benchmarks/results/{NAME}_<device>.json); "
                                                "the PNG goes beside it")
    p.add_argument("--n", type=int, default=None, help="rows (default 2^20 on CUDA, 2^17 on CPU; / 8 with --quick)")
    p.add_argument("--d", type=int, default=None, help="features (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--groups", type=parse_groups, default=None,
                   help="comma-separated G values (default 1,2,4,16,100,1000,10000,100000; up to 10^4 with --quick)")
    p.add_argument("--loop-max-groups", type=int, default=1000, help="skip the loop above this G (it is O(G*N))")
    p.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)  # timed calls per point
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        device = check_device(a.device)
    except ValueError as exc:
        parser.error(str(exc))
    cuda = torch.device(device).type == "cuda"
    n = a.n or ((1 << 20) if cuda else (1 << 17)) // (8 if a.quick else 1)
    d = a.d or (512 if cuda else 64)
    groups = a.groups or (QUICK_GROUPS if a.quick else FULL_GROUPS)
    machine = describe_machine(device)
    # On CUDA 1 GB (far past the L2, as the flushed timed calls are); on CPU
    # the three rotated inputs' size, since their working set (100 MB) may sit
    # in a large shared L3, and the fraction should compare like with like.
    bw = copy_bandwidth_gbs(device, nbytes=(1 << 30) if cuda else 3 * n * d * 4)
    fns, scatter_status = impls()
    print(f"segment mean, N={n} D={d} float32 on {machine['name']}, {machine['threads']} threads, "
          f"fastfair backend {ops.backend()}" + (f", copy bandwidth {bw:.0f} GB/s" if bw else ""))
    print(f"torch_scatter: {scatter_status}")
    bytes_moved = n * d * 4  # the read of x dominates; outputs are G x D
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        # Three input sets, rotated between calls.
        xs = [torch.randn(n, d, generator=gen).to(device) for _ in range(3)]
        idss = [torch.randint(0, g, (n,), generator=gen).to(device) for _ in range(3)]
        ref = _fastfair(xs[0], idss[0], g)
        line = [f"G={g:>6}"]
        for name, fn in fns.items():
            if name == "loop" and g > a.loop_max_groups:
                line.append(f"{name}=skipped")
                continue
            if name != "fastfair":
                _check(name, fn(xs[0], idss[0], g), ref, idss[0])
            ts = samples_ms(lambda i: fn(xs[i % 3], idss[i % 3], g), device=device,
                            repeats=min(3, a.repeats) if name == "loop" else a.repeats)
            ms = statistics.median(ts)
            row = {"impl": name, "groups": g, "n": n, "d": d, "ms": ms, "samples": len(ts), "device": device,
                   "machine": machine["name"], "threads": machine["threads"], "torch": machine["torch"],
                   "backend": ops.backend()}
            if bw:
                row["gbs"] = bytes_moved / (ms * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbs"] / (bw / 2)  # copy bw counts read + write
            rows.append(row)
            line.append(f"{name}={ms:.3f}ms")
        print("  ".join(line), flush=True)
    path = a.json or default_json(NAME, device)
    payload = {"benchmark": NAME, "machine": machine, "n": n, "d": d, "dtype": "float32",
               "torch_scatter": scatter_status, "copy_bandwidth_gbs": bw, "rows": rows}
    write_json(path, payload)
    png = os.path.splitext(path)[0] + ".png"
    loglog_plot(rows, "groups", "ms", "impl", f"segment mean N={n} D={d} ({machine['name']})", png)
    print(f"wrote {path} and {png}")
    return rows


if __name__ == "__main__":
    main()
