"""Shared timing helpers for the benchmarks: medians after warm-up, device
events and an L2 flush on CUDA, inputs rotated so caches do not flatter
(callers pass ``fn(i)`` and pick input set ``i % k``), the machine
description, JSON output and log-log plots."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch

from ..figures import pyplot, save_png
from ..interrupts import holds_interrupts


def check_device(device: str) -> str:
    """``device`` (default: cuda when available, else cpu); ValueError (one
    line) for a malformed name, another device type, or a GPU this machine
    does not have."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are benchmarked")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__})")
    return device


def add_run_args(p: argparse.ArgumentParser, name: str, quick: str | None,
                 beside: str | None = "the PNG goes beside it") -> None:
    """The options every benchmark takes: ``--device``, ``--quick`` (helped by
    ``quick``; none when None) and ``--json`` (default_json(name, device);
    ``beside`` says what is written next to it)."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", default=None, help=f"output JSON (default benchmarks/results/{name}_<device>.json)"
                                                + (f"; {beside}" if beside else ""))


def parse_device(parser: argparse.ArgumentParser, device: str | None) -> str:
    """check_device, with a bad ``--device`` as the parser's one-line usage
    error (exit 2) instead of a traceback."""
    try:
        return check_device(device)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def default_json(name: str, device: str) -> str:
    """benchmarks/results/<name>_<device type>.json, relative to the current directory."""
    return os.path.join("benchmarks", "results", f"{name}_{torch.device(device).type}.json")


def describe_machine(device: str) -> dict:
    """What the numbers were measured on (works with and without a GPU)."""
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": None,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["sms"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
        # cuDNN convolutions may use TF32 by default; say which way it was.
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    # The vector instruction set of fastfair's CPU loops (csrc/cpu/cpu_isa.h).
    try:
        from .. import ops  # noqa: F401  (loads the extension)
        info["fastfair_cpu_isa"] = torch.ops.fastfair.cpu_isa()
    except Exception:  # no extension, or one built before cpu_isa existed
        info["fastfair_cpu_isa"] = None
    info["name"] = info["gpu"] or cpu  # what a table or plot title shows
    return info


_flush_buf: torch.Tensor | None = None


def _flush_l2(device: str) -> None:
    # 256 MB is well above the H100/H200 L2 (50-60 MB).
    global _flush_buf
    if _flush_buf is None or _flush_buf.device != torch.device(device):
        _flush_buf = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=device)
    _flush_buf.zero_()


def samples_ms(
    fn: Callable[[int], object],
    *,
    device: str,
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 20.0,
) -> list[float]:
    """Wall times of fn(i) in milliseconds, after ``warmup`` untimed calls;
    i rotates the inputs.

    CUDA: timed with events around each call after an L2 flush. CPU: wall
    clock. Stops early (with at least 3 samples) when max_seconds is spent, so
    very slow baselines do not stall a sweep.
    """
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup):
        fn(i)
    if cuda:
        torch.cuda.synchronize()
    samples: list[float] = []
    start_all = time.perf_counter()
    for i in range(repeats):
        samples.append(time_call_ms(fn, warmup + i, device))
        if len(samples) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return samples


def time_call_ms(fn: Callable[[int], object], i: int, device: str) -> float:
    """Wall time (ms) of one call fn(i): CUDA events after an L2 flush on a
    GPU, the wall clock on a CPU."""
    if torch.device(device).type == "cuda":
        _flush_l2(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[int], object], *, device: str, warmup: int = 2, repeats: int = 7,
              max_seconds: float = 20.0) -> float:
    """Median of :func:`samples_ms`."""
    return statistics.median(samples_ms(fn, device=device, warmup=warmup, repeats=repeats,
                                        max_seconds=max_seconds))


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), device=device, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stopped_cleanly(path: str) -> Iterator[None]:
    """Run a benchmark that writes ``path`` after every point: SIGTERM (the GPU
    script's stage timeout) is turned into KeyboardInterrupt like Ctrl-C, and
    either ends the benchmark with exit code 130 and one line saying that the
    points finished so far are in ``path``, instead of a traceback."""
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except KeyboardInterrupt:
        print(f"stopped; the points finished so far are in {path}", flush=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, old)


def step_ratios(rows: Sequence[dict], ratios: Sequence[tuple]) -> dict[str, dict]:
    """The step benchmarks' target ratios: for each ``(G, (impl, objective),
    (impl, objective), target)`` whose two rows were measured, the ratio of
    their ``ms`` under a readable name; pairs not measured are left out."""
    ms = {(r["impl"], r["objective"], r["groups"]): r["ms"] for r in rows}
    out: dict[str, dict] = {}
    for g, num, den, target in ratios:
        a, b = ms.get((*num, g)), ms.get((*den, g))
        if a is not None and b is not None:
            out[f"{' '.join(num)} / {' '.join(den)} at G={g}"] = {"groups": g, "ratio": a / b, "target": target}
    return out


def write_json(path: str, payload: object) -> None:
    """``payload`` as indented JSON at ``path`` through atomic_write: a full
    disk keeps the previous results and leaves no temporary file."""
    from ..distill.outdir import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    text = json.dumps(payload, indent=1).encode()
    atomic_write(path, lambda f: f.write(text))


@holds_interrupts
def loglog_plot(rows: Sequence[dict], x: str, y: str, series: str | Callable[[dict], str], title: str,
                path: str) -> None:
    """One line per implementation (``series``: a row key or a function of
    the row), log-log axes; writes a PNG at ``path``."""
    plt = pyplot()

    key = series if callable(series) else (lambda r: r[series])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(key(r) for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if key(r) == name and r.get(y) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)
