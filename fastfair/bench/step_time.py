"""End-to-end step time and peak memory of DM and DC against the group count G.

One distillation step is timed, as the driver runs it: for DM one iteration
(fresh network, real batch of every class, DSA, embeddings, loss, one image
update); for DC one outer iteration with ONE matching step (fresh network, the
real-gradient side, the synthetic side with its graph, the loss, one image
update) and no inner network training (``outer_loop=1``). Implementations:

  vanilla          ``fastfair.distill.dm.dm_iteration`` / ``dc.dc_iteration``
                   with objective ``vanilla``. The vanilla method ignores
                   groups, so it runs with ONE group (``match_groups`` 1 in
                   the row); given G groups the driver's vanilla DM would
                   compute G-segment statistics for nothing and flatter the
                   ratios (vanilla DC matches one segment per class anyway).
  loop fairdd      reference-style FairDD written here the way the papers'
                   public code does it (docs/methods.md, "Cost of the reference
                   implementation"): per class a forward of that class's real
                   and synthetic rows; then per group present in the class
                   (found with a host sync) DM masks the group's rows and takes
                   their mean, DC masks the group's rows of the class output and
                   runs its own ``autograd.grad`` through the class graph
                   (``retain_graph``): one extra backward pass per group, which
                   matches the paper's Table 13 growth (DC 3.0x at G = 10).
  fastfair fairdd  the driver's step with objective ``fairdd``.
  fastfair cobra   the driver's step with objective ``cobra``. COBRA's DM
                   warm-up of the random network on the synthetic set is a
                   cost independent of G and is left out unless
                   ``--cobra-warmup N`` asks for N epochs.

Before the timings of each (dataset, method, G), the loop and the fastfair
FairDD step are run once on the same iteration (same network, batch and DSA)
in float32 (TF32 off) and their synthetic-image gradients compared
(``allclose`` with rtol 1e-3 and atol 1e-3 x max |gradient|): the rows then
compare equal computations. A mismatch is recorded in the rows and raises
after the JSON is written.

Datasets: ``cdigits-fg`` (10 classes, 32 px; its real colour groups when
G = 10, otherwise uniformly random group labels in [0, G)) and ``synthetic``
(random normal images at ImageNet-subset scale: 100 classes, 64x64x3, real
batch 256 per class with exactly 256 images per class so every step uses all
of them; uniformly random groups). ``--quick``: synthetic 10 classes, batch 64,
32 px; width 32. Network: ConvNet, instance norm, width 128, depth 3 at 32 px
and 4 at 64 px (the final map is 4x4), IPC 10.

Timing: ``fastfair.bench.timing.samples_ms`` (CUDA events after an L2 flush;
wall clock on CPU), iteration index rotated between calls so each call has a
new network, batch and DSA draw; each implementation runs one untimed warm-up
step and one untimed memory step first, then the implementations are timed
round-robin, one step each per round, and each reports its median.

Peak memory (``peak_mb``) is the memory the step itself adds on top of what is
held between steps (dataset, synthetic images, momentum buffer; ``base_mb``):
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
        minus ``memory_allocated`` at the start of the step (tensors only, no
        allocator cache or CUDA context);
  CPU:  the rise of the process's resident set over the step: free heap is
        returned with glibc ``malloc_trim(0)``, the kernel's high-water mark is
        reset (``/proc/self/clear_refs`` 5), then ``VmHWM`` after the step
        minus ``VmRSS`` before it. It counts every page the step touches
        (tensors, allocator slack, code paged in), so it is an upper bound on
        live tensor memory and not comparable with the CUDA number. Where
        ``clear_refs`` is not writable the value is null.

Out of memory (CUDA) is caught and recorded as ``error`` with null ms; on CPU a
configuration whose first-layer activations alone (two of them live at once)
would exceed ``MemAvailable`` is skipped rather than risking the OOM killer.
The driver's steps put the real batch through the network in chunks of
``RunContext.real_chunk`` rows (by default 2^24 input values on a GPU: 1365
images at 64 px, so the full synthetic scale, 25600 images, fits an 80 GB
GPU; ``--real-chunk N`` sets it). On CPU use ``--quick``: at the full scale the loop
rows alone take hours per step. A full CUDA sweep runs longer than 10 minutes
(the DC loop at G = 50 and 100 dominates); split it with ``--dataset``,
``--methods`` and ``--groups`` (each run writes its own ``--json``).

Usage: python -m fastfair.bench.step_time --device cpu|cuda [--quick]
       [--dataset cdigits-fg|synthetic|both] [--groups 1,2,5,10,20,50,100]
       [--methods dm,dc] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
from typing import Callable, Iterator

import torch
from torch import Tensor

from .. import ops, wgrad
from ..data import BiasedDataset
from ..distill import rng
from ..distill.context import RunContext, build_context
from ..distill.dc import RandomBatches, dc_iteration
from ..distill.dm import dm_iteration
from ..distill.synset import init_images
from .step_config import (DATASETS, DEFAULT_DATASETS, IMPLS, METHODS, Scale, base_dataset, depth_for, make_config,
                          natural_groups, with_groups)
from .step_loops import loop_dc_step, loop_dm_step
from .step_memory import PeakMeter, cpu_too_big, free_cache, is_oom
from .step_report import label, plot, ratios, summary
from .timing import add_run_args, default_json, describe_machine, parse_device, samples_ms, stopped_cleanly, write_json

# The pieces live in step_config (sizes, datasets, configs), step_loops (the
# reference-style loops), step_memory (peak memory, OOM guards) and
# step_report (target ratios, plots); this module times them.
__all__ = ["DATASETS", "IMPLS", "METHODS", "PeakMeter", "Scale", "base_dataset", "cells_present", "fastfair_step",
           "grad_check", "loop_dc_step", "loop_dm_step", "main", "make_config", "natural_groups", "plot", "ratios",
           "summary", "with_groups"]

NAME = "step_time"
GRAD_RTOL = 1e-3

Step = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]]


def fastfair_step(ctx: RunContext) -> Step:
    """The driver's own iteration (DC: one matching step, ``outer_loop`` 1)."""
    if ctx.cfg.method == "dm":
        return lambda images, buf, it: dm_iteration(ctx, images, buf, it)
    source = RandomBatches()
    return lambda images, buf, it: dc_iteration(ctx, images, buf, it, source)



@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 off for the gradient check (it would exceed rtol 1e-3 on its own)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _call(step: Step, images: Tensor, buf: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
    # As the driver's loop runs its steps: no host-synchronising id checks.
    with ops.validate_ids(False):
        return step(images, buf, it)


def grad_check(loop: Step, fast: Step, images: Tensor) -> tuple[bool, float]:
    """(agree, max |diff| / max |grad|) of the two steps' image gradients.

    With a zero momentum buffer the returned buffer IS the gradient."""
    zero = torch.zeros_like(images)
    with _strict_fp32():
        g_loop = _call(loop, images, zero, 0)[1]
        g_fast = _call(fast, images, zero, 0)[1]
    scale = float(g_loop.abs().max())
    err = float((g_fast - g_loop).abs().max()) / max(scale, 1e-30)
    ok = torch.allclose(g_fast, g_loop, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale)
    return bool(ok), err



def cells_present(ctx: RunContext, draws: int = 3) -> float:
    """Mean number of (class, group) cells present in the driver's real batch
    over a few draws: the reference loop runs one backward (DC) or one masked
    mean (DM) per present cell, so its time grows with this, not with G."""
    seen = []
    for it in range(draws):
        batch = ctx.sampler.draw(rng.generator(ctx.cfg.seed, it, rng.SAMPLE, 0))
        _, labels, groups = ctx.real_batch(batch)
        seen.append(int(torch.unique(labels.long() * ctx.num_groups + groups.long()).numel()))
    return sum(seen) / len(seen)


# An implementation stops getting samples once it has this many seconds of
# them (and at least 3), so a slow reference loop does not stall the sweep
# (--max-seconds).
_MAX_SECONDS = 20.0


def _sweep_one(dataset: str, method: str, groups: int, base: BiasedDataset,
               natural: dict[int, tuple[Tensor, str]] | None,
               scale: Scale, device: torch.device, repeats: int, cobra_warmup: int, meter: PeakMeter,
               common: dict, skip_loop: bool = False, memory_only: bool = False,
               precision: str = "fp32", loop_rate: tuple[float, float, int] | None = None,
               loop_max_seconds: float | None = None, max_seconds: float = _MAX_SECONDS) -> list[dict]:
    """One (dataset, method, G) point. ``loop_rate`` (ms, cells present, G)
    of the loop's largest measured G so far: where the loop's step would take
    longer than ``loop_max_seconds`` at this G's cells present (the loop is
    linear in them), it is not run and its time is extrapolated and marked so."""
    size = base.image_size
    ds_g, groups_from = with_groups(base, groups, natural)
    ds_1, _ = with_groups(base, 1, None)
    ctx_f = build_context(make_config(dataset, method, "fairdd", scale, size, cobra_warmup), ds_g, device)
    ctx_v = build_context(make_config(dataset, method, "vanilla", scale, size, cobra_warmup), ds_1, device)
    ctx_c = dataclasses.replace(ctx_f, cfg=make_config(dataset, method, "cobra", scale, size, cobra_warmup))
    images, _ = init_images(ctx_f.sampler.class_pool, ctx_f.train_images, scale.ipc, "real", 1,
                            rng.generator(0, 0, rng.INIT))
    images = images.to(device)
    buf = torch.zeros_like(images)
    loop = (lambda x, b, it: loop_dm_step(ctx_f, x, b, it)) if method == "dm" else \
        (lambda x, b, it: loop_dc_step(ctx_f, x, b, it))
    steps: dict[tuple[str, str], tuple[Step, int]] = {
        ("vanilla", "vanilla"): (fastfair_step(ctx_v), 1),
        ("loop", "fairdd"): (loop, groups),
        ("fastfair", "fairdd"): (fastfair_step(ctx_f), groups),
        ("fastfair", "cobra"): (fastfair_step(ctx_c), groups),
    }
    per_class = ctx_f.sampler.global_sizes()
    one_pass_rows, loop_rows = sum(per_class), max(per_class)
    # Rows per pass as the driver picks them (RunContext.real_chunk: the given
    # real_chunk, else the automatic one), so the one pass on CPU is
    # never refused as "too big".
    sample = images[:1].expand(one_pass_rows, *images.shape[1:])
    one_pass_rows = min(one_pass_rows, ctx_f.real_chunk(ctx_f.new_network(0), sample))

    refusal = cpu_too_big(one_pass_rows, scale.width, size) if device.type == "cpu" else None
    check = "not run (too big for this machine's memory)"
    cells = cells_present(ctx_f)
    extrapolated = None
    if loop_rate is not None and loop_max_seconds is not None and not skip_loop:
        ms_then, cells_then, g_then = loop_rate
        estimate = ms_then * cells / max(cells_then, 1.0)
        if estimate / 1e3 > loop_max_seconds:
            extrapolated = {"extrapolated_ms": estimate, "extrapolated_from_groups": g_then,
                            "error": f"not run: {estimate / 1e3:.0f} s a step, extrapolated from G = {g_then} "
                                     f"({ms_then / 1e3:.1f} s at {cells_then:.0f} cells present, linear in the "
                                     f"cells present: {cells:.0f} here); over --loop-max-seconds "
                                     f"{loop_max_seconds:g}"}
    if skip_loop:
        del steps[("loop", "fairdd")]
        check = "not run (--skip-loop)"
    elif extrapolated is not None:
        del steps[("loop", "fairdd")]
        check = "not run (loop extrapolated)"
    elif memory_only:
        check = "not run (--memory-only)"
    elif refusal is None:
        try:
            ok, err = grad_check(loop, steps[("fastfair", "fairdd")][0], images)
            check = "ok" if ok else f"MISMATCH (max |diff| / max |grad| = {err:.2e})"
        except Exception as e:  # noqa: BLE001 - OOM is a result here; anything else re-raises
            if not is_oom(e):
                raise
            check = "not run (out of memory)"
        free_cache(device)
    if check.startswith("MISMATCH"):
        print(f"  {dataset} {method.upper()} G={groups}: loop and fastfair FairDD gradients differ: {check}")

    rows = []
    timed: list[tuple[dict, Step]] = []
    for (impl, objective), (step, match_groups) in steps.items():
        row = {"dataset": dataset, "method": method, "impl": impl, "objective": objective, "groups": groups,
               "match_groups": match_groups, "ms": None, "peak_mb": None, "base_mb": None, "grad_check": check,
               "classes": base.num_classes, "batch_real": scale.batch, "image_size": size, "width": scale.width,
               "depth": depth_for(size), "ipc": scale.ipc, "peak_method": meter.method,
               "groups_from": groups_from, "cells_present": cells}
        if method == "dm" and objective == "cobra":
            row["cobra_warmup_epochs"] = cobra_warmup
        rows_in = loop_rows if impl == "loop" else one_pass_rows
        skip = cpu_too_big(rows_in, scale.width, size) if device.type == "cpu" else None
        if skip is not None:
            row["error"] = skip
        elif meter.reason is not None:
            row["peak_note"] = meter.reason
        if skip is None:
            try:
                with wgrad.weight_grad_precision(precision):
                    _call(step, images, buf, 0)  # warm-up (kernels, caches, lazy init)
                    row["peak_mb"], row["base_mb"] = meter.measure(lambda: _call(step, images, buf, 1))
                timed.append((row, step))
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                row["error"] = "out of memory"
                row["ms"] = row["peak_mb"] = None
        free_cache(device)
        row.update(common)
        rows.append(row)
    if extrapolated is not None:
        row = {**rows[0], "impl": "loop", "objective": "fairdd", "match_groups": groups, "ms": None,
               "peak_mb": None, "base_mb": None, "grad_check": check, **extrapolated}
        rows.insert(1, row)
    if not memory_only:
        with wgrad.weight_grad_precision(precision):
            _time_interleaved(timed, images, buf, device, repeats, max_seconds)
    for row in rows:
        ms = "-" if row["ms"] is None else f"{row['ms']:.2f} ms"
        mb = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f} MB"
        print(f"  {dataset:<10} {method.upper()} G={groups:<4} {label(row):<16} {ms:>12} {mb:>12}"
              + (f"  ({row['error']})" if "error" in row else ""), flush=True)
    return rows


def _time_interleaved(timed: list[tuple[dict, Step]], images: Tensor, buf: Tensor, device: torch.device,
                      repeats: int, max_seconds: float = _MAX_SECONDS) -> None:
    """Median step time of each implementation, sampled round-robin (one call
    of each per round) so slow drifts of the machine (other tenants, clock,
    allocator state) land on every implementation alike instead of on
    whichever ran last; the ratios between rows are what the targets are about."""
    samples: dict[int, list[float]] = {id(row): [] for row, _ in timed}
    for r in range(repeats):
        for row, step in timed:
            got = samples[id(row)]
            if "error" in row or (len(got) >= 3 and sum(got) / 1e3 >= max_seconds):
                continue
            try:
                got += samples_ms(lambda i: _call(step, images, buf, 2 + r), device=str(device), warmup=0,
                                  repeats=1)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                row["error"] = "out of memory"
                row["peak_mb"] = None
                free_cache(device)
    for row, _ in timed:
        got = samples[id(row)]
        row["ms"] = statistics.median(got) if got and "error" not in row else None
        row["samples"] = len(got)


def _int_list(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        out = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in out if v not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return out
    return parse


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep, print the table and the target ratios, write the JSON and
    one PNG per (dataset, method) beside it; returns the rows."""
    p = argparse.ArgumentParser(prog="fastfair bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "step_time", "synthetic 10 classes x 64 at 32 px, width 32",
                 "one PNG per (dataset, method) goes beside it")
    p.add_argument("--dataset", default="both", choices=(*DATASETS, "both"),
                   help="both: cdigits-fg and synthetic (no files needed); cmnist-fgbg: the real C-MNIST with "
                        "digit and background colour (needs MNIST under --root): G = 10 its digit colours, 100 the "
                        "colour intersection, 1000 that x a random 10-valued attribute")
    p.add_argument("--root", default=None, help="data directory for cmnist-fgbg (default: $FASTFAIR_DATA, else ./data)")
    p.add_argument("--loop-max-seconds", type=float, default=None,
                   help="skip the reference loop at a G where its step, extrapolated from the largest G measured "
                        "so far (linear in the (class, group) cells present), would take longer; the row then "
                        "holds extrapolated_ms and says so (default: always run it)")
    p.add_argument("--groups", type=_int_list, default=[1, 2, 5, 10, 20, 50, 100])
    p.add_argument("--methods", type=_name_list(METHODS), default=list(METHODS))
    p.add_argument("--cobra-warmup", type=int, default=0,
                   help="COBRA DM warm-up epochs inside the step (default 0: the matching step only)")
    # Small knobs for tests and exploration.
    p.add_argument("--real-chunk", type=int, default=None,
                   help="rows per network pass over the real batch in the fastfair rows (DistillConfig.real_chunk; "
                        "default: the driver's automatic choice, 2^24 input values per pass on a GPU, cache-sized "
                        "blocks on a CPU)")
    p.add_argument("--skip-loop", action="store_true",
                   help="leave out the reference-style loop rows and the gradient check against them (at "
                        "ImageNet-subset scale and G = 100 the DC loop runs 1000 backward passes per step)")
    p.add_argument("--memory-only", action="store_true",
                   help="peak memory only: one warm-up and one measured step per implementation, no gradient "
                        "check and no timing (ms is null); for scales where each step takes minutes")
    p.add_argument("--dc-block-classes", type=int, default=None,
                   help="DC: classes matched per block in the fastfair rows (DistillConfig.dc_block_classes; "
                        "default: the driver's rule, as many as the free memory allows; C = one block, the fewest "
                        "network passes)")
    p.add_argument("--precision", default="fp32", choices=wgrad.PRECISIONS,
                   help="CUDA weight-gradient path of the timed and memory steps (the loop-vs-fastfair gradient "
                        "check runs in fp32); no effect on CPU")
    p.add_argument("--max-seconds", type=float, default=_MAX_SECONDS,
                   help=f"an implementation stops getting timed steps at a point once it has this many seconds "
                        f"of them (and at least 3), so a slow loop does not stall the sweep; raise it for more "
                        f"samples of slow steps (default {_MAX_SECONDS:g}: a DC step of the paper's network on a "
                        f"2-core CPU, 7-8 s, then gets 3)")
    p.add_argument("--classes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=None,
                   help="ConvNet width (default 128, the papers'; 32 with --quick; the cpu budget of "
                        "`fastfair reproduce` distils at 16)")
    p.add_argument("--ipc", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    device_name = parse_device(p, a.device)
    device = torch.device(device_name)
    small = [k for k in ("classes", "batch", "image_size", "width", "ipc", "repeats")
             if getattr(a, k) is not None and getattr(a, k) < 1]
    if small:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in small)} must be >= 1")
    if a.cobra_warmup < 0:
        p.error("--cobra-warmup must be >= 0")
    if a.real_chunk is not None and a.real_chunk < 1:
        p.error("--real-chunk must be >= 1")
    if a.dc_block_classes is not None and a.dc_block_classes < 1:
        p.error("--dc-block-classes must be >= 1")
    quick = a.quick
    syn = Scale(classes=a.classes or (10 if quick else 100), batch=a.batch or (64 if quick else 256),
                image_size=a.image_size or (32 if quick else 64), width=a.width or (32 if quick else 128), ipc=a.ipc,
                real_chunk=a.real_chunk, dc_block_classes=a.dc_block_classes)
    digits = dataclasses.replace(syn, classes=10, image_size=32, batch=a.batch or 256)  # cdigits' own shape
    scales = {"synthetic": syn, "cdigits-fg": digits, "cmnist-fgbg": digits}  # C-MNIST: 10 classes, 32 px
    repeats = a.repeats or (5 if quick else 7)
    datasets = list(DEFAULT_DATASETS) if a.dataset == "both" else [a.dataset]
    if a.loop_max_seconds is not None and a.loop_max_seconds <= 0:
        p.error("--loop-max-seconds must be > 0")
    if not a.max_seconds > 0:
        p.error("--max-seconds must be > 0")

    machine = describe_machine(device_name)
    name = machine["name"]
    common = {"device": device.type, "machine": name, "threads": machine["threads"], "torch": machine["torch"],
              "backend": ops.backend()}
    if device.type == "cuda":
        common["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    meter = PeakMeter(device)
    print(f"step time vs groups on {name} ({device.type}, {machine['threads']} threads); peak: {meter.method}"
          + (f" -- unavailable: {meter.reason}" if meter.reason else ""))

    rows: list[dict] = []
    path = a.json or default_json(NAME, device_name)
    settings = {**{d: dataclasses.asdict(scales[d]) for d in datasets}, "repeats": repeats,
                "cobra_warmup_epochs": a.cobra_warmup, "dtype": "float32", "quick": quick, "real_chunk": a.real_chunk,
                "dc_block_classes": a.dc_block_classes, "skip_loop": a.skip_loop,
                "memory_only": a.memory_only, "precision": a.precision, "loop_max_seconds": a.loop_max_seconds,
                "max_seconds": a.max_seconds}
    points = len(datasets) * len(a.methods) * len(a.groups)

    def save(done: int) -> None:  # after every point: a cut-off run keeps what finished
        write_json(path, {"benchmark": NAME, "machine": machine, "settings": settings, "peak_method": meter.method,
                          "peak_unavailable": meter.reason, "ratios": ratios(rows), "complete": done == points,
                          "rows": rows})

    done = 0
    with stopped_cleanly(path):
        for dataset in datasets:
            scale = scales[dataset]
            try:
                base = base_dataset(dataset, scale, device, root=a.root)
            except (FileNotFoundError, OSError) as exc:
                p.error(f"{dataset}: {exc}")
            natural = natural_groups(base)
            print(f"{dataset}: {base.num_classes} classes, {base.image_size} px, real batch {scale.batch}/class, "
                  f"ConvNet width {scale.width} depth {depth_for(base.image_size)}, IPC {scale.ipc}", flush=True)
            for method in a.methods:
                loop_rate: tuple[float, float, int] | None = None
                for g in sorted(a.groups):
                    new = _sweep_one(dataset, method, g, base, natural, scale, device, repeats,
                                     a.cobra_warmup, meter, common, skip_loop=a.skip_loop,
                                     memory_only=a.memory_only, precision=a.precision, loop_rate=loop_rate,
                                     loop_max_seconds=a.loop_max_seconds, max_seconds=a.max_seconds)
                    measured = [r for r in new if r["impl"] == "loop" and r["ms"] is not None]
                    if measured:
                        loop_rate = (measured[0]["ms"], measured[0]["cells_present"], g)
                    rows += new
                    done += 1
                    save(done)
            del base
            free_cache(device)
    stem = os.path.splitext(path)[0]
    pngs = []
    for dataset in datasets:
        for method in a.methods:
            png = f"{stem}_{dataset}_{method}.png"
            plot(rows, dataset, method, f"{method.upper()} step on {dataset}, {name} ({device.type})", png)
            pngs.append(png)
    print("\n".join(["", "targets (issue #6):"] + ["  " + s for s in summary(rows)]))
    print(f"wrote {path} and {len(pngs)} plots ({', '.join(os.path.basename(q) for q in pngs)})")
    bad = sorted({f"{r['dataset']} {r['method']} G={r['groups']}" for r in rows
                  if r["grad_check"].startswith("MISMATCH")})
    if bad:
        raise RuntimeError(f"loop and fastfair FairDD gradients differ (rtol {GRAD_RTOL}) at: {', '.join(bad)}; "
                           "the timings of those rows compare different computations")
    return rows


if __name__ == "__main__":
    main()
