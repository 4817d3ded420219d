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
                   public code does it (REFERENCE.md, "Cost of the reference
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
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..augment import dsa
from ..data import BiasedDataset, Split
from ..distill import rng
from ..distill.config import DistillConfig, resolve
from ..distill.context import RunContext, build_context
from ..distill.dc import RandomBatches, dc_iteration
from ..distill.dm import dm_iteration
from ..distill.synset import init_images, sgd_step
from .timing import check_device, default_json, describe_machine, samples_ms, write_json

NAME = "step_time"
DATASETS = ("cdigits-fg", "synthetic")
METHODS = ("dm", "dc")
# (impl, objective) in plotting order.
IMPLS = (("vanilla", "vanilla"), ("loop", "fairdd"), ("fastfair", "fairdd"), ("fastfair", "cobra"))
# Issue #6 targets for fastfair FairDD / vanilla, and the FairDD paper's own code at G = 10.
TIME_TARGETS = {("dm", 10): 1.05, ("dm", 100): 1.1, ("dc", 10): 1.3, ("dc", 100): 1.5}
PAPER_CODE_AT_10 = {"dm": 1.41, "dc": 3.0}
MEMORY_TARGET_DC = 1.1
GRAD_RTOL = 1e-3

Step = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Scale:
    classes: int       # synthetic only (cdigits has 10)
    batch: int         # real images per class per step
    image_size: int    # synthetic only (cdigits is 32 px)
    width: int
    ipc: int
    real_chunk: int | None = None  # rows per network pass over the real batch (fastfair rows)
    dc_block_classes: int | None = None  # DC: classes matched per block (fastfair rows); None: the driver's


def _depth(image_size: int) -> int:
    """ConvNet depth that pools the image down to 4x4 (3 at 32 px, 4 at 64 px)."""
    return max(1, round(math.log2(image_size)) - 2)


# --------------------------------------------------------------------- data

def _base_dataset(name: str, scale: Scale, device: torch.device) -> BiasedDataset:
    if name == "cdigits-fg":
        from .. import data

        ds = data.load("cdigits-fg")
        tr = ds.train
        return dataclasses.replace(ds, train=Split(tr.images.to(device), tr.labels, tr.groups))
    if name == "synthetic":
        c, b, s = scale.classes, scale.batch, scale.image_size
        gen = torch.Generator(device=device).manual_seed(0)
        # Generated where it is used: no 1.3 GB host copy at full scale.
        images = torch.randn(c * b, 3, s, s, generator=gen, device=device)
        labels = torch.arange(c).repeat_interleave(b)
        split = Split(images, labels, torch.zeros_like(labels))
        return BiasedDataset(name="synthetic", train=split, test=split, num_classes=c, num_groups=1, channels=3,
                             image_size=s, class_names=[str(i) for i in range(c)], group_names=["0"])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _with_groups(base: BiasedDataset, groups: int, real_groups: Tensor | None) -> BiasedDataset:
    """``base`` with ``groups`` groups: ``real_groups`` when it has that many
    (cdigits at G = 10), else uniformly random labels (seeded)."""
    tr = base.train
    if groups == 1:
        g = torch.zeros_like(tr.labels)
    elif real_groups is not None and int(real_groups.max()) + 1 == groups:
        g = real_groups
    else:
        g = torch.randint(0, groups, (len(tr),), generator=torch.Generator().manual_seed(groups))
    return dataclasses.replace(base, train=Split(tr.images, tr.labels, g), num_groups=groups,
                               group_names=[str(i) for i in range(groups)])


def _config(dataset: str, method: str, objective: str, scale: Scale, image_size: int,
            cobra_warmup: int) -> DistillConfig:
    warm = cobra_warmup if (method == "dm" and objective == "cobra") else None
    return resolve(DistillConfig(dataset=dataset, method=method, objective=objective, ipc=scale.ipc,
                                 batch_real=scale.batch, width=scale.width, depth=_depth(image_size),
                                 outer_loop=1, inner_loop=1, cobra_warmup_epochs=warm, seed=0,
                                 real_chunk=scale.real_chunk, dc_block_classes=scale.dc_block_classes))


# -------------------------------------------------------------------- steps

def fastfair_step(ctx: RunContext) -> Step:
    """The driver's own iteration (DC: one matching step, ``outer_loop`` 1)."""
    if ctx.cfg.method == "dm":
        return lambda images, buf, it: dm_iteration(ctx, images, buf, it)
    source = RandomBatches()
    return lambda images, buf, it: dc_iteration(ctx, images, buf, it, source)


def _per_class(ctx: RunContext, sizes: list[int], real: Tensor, groups: Tensor, syn: Tensor, it: int,
               *keys: int) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """(class, augmented real rows, augmented synthetic rows, groups) per class,
    with the DSA seed the driver gives that class (siamese, per class)."""
    cfg = ctx.cfg
    for c, (r, s, g) in enumerate(zip(torch.split(real, sizes), torch.split(syn, ctx.syn_sizes),
                                      torch.split(groups, sizes))):
        if cfg.dsa:
            seed = rng.derive(cfg.seed, it, rng.DSA, *keys, c)
            r, s = dsa(r, seed, cfg.dsa_strategy), dsa(s, seed, cfg.dsa_strategy)
        yield c, r, s, g


def loop_dm_step(ctx: RunContext, images: Tensor, buf: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference-style FairDD DM: per class forwards, per group a masked mean."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE))
    real, _, groups = ctx.real_batch(batch)
    x = images.detach().requires_grad_(True)
    loss = x.new_zeros(())
    for _, r, s, g in _per_class(ctx, batch.sizes, real, groups, x, it):
        out_real = net.embed(r).detach()
        syn_mean = net.embed(s).mean(0)
        for a in torch.unique(g).tolist():  # host sync per class, as in the reference code
            loss = loss + (out_real[g == a].mean(0) - syn_mean).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    new_images, new_buf = sgd_step(images.detach(), buf, grad, cfg.lr_img, cfg.momentum)
    return new_images, new_buf, loss.detach()


def _match_loss(gw_syn: list[Tensor], gw_real: list[Tensor]) -> Tensor:
    """DC's 'ours' distance: per-output-unit 1 - cosine, summed; 1-D parameters add 0."""
    dis = gw_syn[0].new_zeros(())
    for gs, gr in zip(gw_syn, gw_real):
        if gs.dim() <= 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        dis = dis + (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()
    return dis


def loop_dc_step(ctx: RunContext, images: Tensor, buf: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference-style FairDD DC, one matching step: per class one forward of the
    real rows and one synthetic gradient with a graph; per group present one
    ``autograd.grad`` of the group's masked loss through the class graph."""
    cfg = ctx.cfg
    net = ctx.new_network(it)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    batch = ctx.sampler.draw(rng.generator(cfg.seed, it, rng.SAMPLE, 0))
    real, labels, groups = ctx.real_batch(batch)
    y_real = torch.split(labels, batch.sizes)
    x = images.detach().requires_grad_(True)
    loss = x.new_zeros(())
    for c, r, s, g in _per_class(ctx, batch.sizes, real, groups, x, it, 0):
        y_syn = torch.full((s.shape[0],), c, dtype=torch.long, device=s.device)
        gw_syn = list(torch.autograd.grad(F.cross_entropy(net(s), y_syn), params, create_graph=True))
        out_real = net(r)
        present = torch.unique(g).tolist()  # host sync per class
        for k, a in enumerate(present):
            m = g == a
            l_real = F.cross_entropy(out_real[m], y_real[c][m])
            gw_real = torch.autograd.grad(l_real, params, retain_graph=k + 1 < len(present))
            loss = loss + _match_loss(gw_syn, [t.detach() for t in gw_real])
    (grad,) = torch.autograd.grad(loss, x)
    new_images, new_buf = sgd_step(images.detach(), buf, grad, cfg.lr_img, cfg.momentum)
    return new_images, new_buf, loss.detach()


# ------------------------------------------------------------------ memory

def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory a call adds (module docstring, "Peak memory")."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.reason: str | None = None
        self._trim = None
        if self.cuda:
            self.method = "cuda max_memory_allocated - memory_allocated at step start"
            return
        self.method = "cpu VmHWM after step - VmRSS before (clear_refs 5, malloc_trim)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_kb("VmHWM")
        except OSError as e:
            self.reason = f"no resettable resident-set high-water mark here ({e})"
        libc = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(libc).malloc_trim if libc else None
        except (OSError, AttributeError):
            self._trim = None

    def measure(self, fn: Callable[[], object]) -> tuple[float | None, float | None]:
        """(peak_mb, base_mb) of one call of ``fn``."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return peak / 2**20, base / 2**20
        if self.reason is not None:
            fn()
            return None, None
        if self._trim is not None:
            self._trim(0)  # hand free heap back, so the step's pages show as a rise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_kb("VmRSS")
        out = fn()
        peak = _proc_kb("VmHWM") - base
        del out
        return peak / 1024, base / 1024


def _cpu_too_big(rows: int, width: int, size: int) -> str | None:
    """Refusal text when two first-layer activations of ``rows`` images cannot fit."""
    need = 2 * rows * width * size * size * 4
    avail = _mem_available_bytes()
    if avail is not None and need > avail:
        return (f"skipped: needs at least {need / 2**30:.1f} GiB (two first-layer activations of "
                f"{rows} images) and {avail / 2**30:.1f} GiB is available")
    return None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def _free(device: torch.device) -> None:
    # CUDA only: a full collection costs ~0.2 s once torch._dynamo is imported,
    # and on CPU freed tensors go back to the allocator without it.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


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


# -------------------------------------------------------------------- sweep

def _label(row: dict) -> str:
    return row["impl"] if row["impl"] == row["objective"] else f"{row['impl']} {row['objective']}"


def _sweep_one(dataset: str, method: str, groups: int, base: BiasedDataset, real_groups: Tensor | None,
               scale: Scale, device: torch.device, repeats: int, cobra_warmup: int, meter: PeakMeter,
               common: dict, skip_loop: bool = False, memory_only: bool = False) -> list[dict]:
    size = base.image_size
    ds_g = _with_groups(base, groups, real_groups)
    ds_1 = _with_groups(base, 1, None)
    ctx_f = build_context(_config(dataset, method, "fairdd", scale, size, cobra_warmup), ds_g, device)
    ctx_v = build_context(_config(dataset, method, "vanilla", scale, size, cobra_warmup), ds_1, device)
    ctx_c = dataclasses.replace(ctx_f, cfg=_config(dataset, method, "cobra", scale, size, cobra_warmup))
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

    refusal = _cpu_too_big(one_pass_rows, scale.width, size) if device.type == "cpu" else None
    check = "not run (too big for this machine's memory)"
    if skip_loop:
        del steps[("loop", "fairdd")]
        check = "not run (--skip-loop)"
    elif memory_only:
        check = "not run (--memory-only)"
    elif refusal is None:
        try:
            ok, err = grad_check(loop, steps[("fastfair", "fairdd")][0], images)
            check = "ok" if ok else f"MISMATCH (max |diff| / max |grad| = {err:.2e})"
        except Exception as e:  # noqa: BLE001 - OOM is a result here; anything else re-raises
            if not _is_oom(e):
                raise
            check = "not run (out of memory)"
        _free(device)
    if check.startswith("MISMATCH"):
        print(f"  {dataset} {method.upper()} G={groups}: loop and fastfair FairDD gradients differ: {check}")

    rows = []
    timed: list[tuple[dict, Step]] = []
    for (impl, objective), (step, match_groups) in steps.items():
        row = {"dataset": dataset, "method": method, "impl": impl, "objective": objective, "groups": groups,
               "match_groups": match_groups, "ms": None, "peak_mb": None, "base_mb": None, "grad_check": check,
               "classes": base.num_classes, "batch_real": scale.batch, "image_size": size, "width": scale.width,
               "depth": _depth(size), "ipc": scale.ipc, "peak_method": meter.method}
        if method == "dm" and objective == "cobra":
            row["cobra_warmup_epochs"] = cobra_warmup
        rows_in = loop_rows if impl == "loop" else one_pass_rows
        skip = _cpu_too_big(rows_in, scale.width, size) if device.type == "cpu" else None
        if skip is not None:
            row["error"] = skip
        elif meter.reason is not None:
            row["peak_note"] = meter.reason
        if skip is None:
            try:
                _call(step, images, buf, 0)  # warm-up (kernels, caches, lazy init)
                row["peak_mb"], row["base_mb"] = meter.measure(lambda: _call(step, images, buf, 1))
                timed.append((row, step))
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                row["error"] = "out of memory"
                row["ms"] = row["peak_mb"] = None
        _free(device)
        row.update(common)
        rows.append(row)
    if not memory_only:
        _time_interleaved(timed, images, buf, device, repeats)
    for row in rows:
        ms = "-" if row["ms"] is None else f"{row['ms']:.2f} ms"
        mb = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f} MB"
        print(f"  {dataset:<10} {method.upper()} G={groups:<4} {_label(row):<16} {ms:>12} {mb:>12}"
              + (f"  ({row['error']})" if "error" in row else ""), flush=True)
    return rows


# An implementation stops getting samples once it has this many seconds of
# them (and at least 3), so a slow reference loop does not stall the sweep.
_MAX_SECONDS = 20.0


def _time_interleaved(timed: list[tuple[dict, Step]], images: Tensor, buf: Tensor, device: torch.device,
                      repeats: int) -> None:
    """Median step time of each implementation, sampled round-robin (one call
    of each per round) so slow drifts of the machine (other tenants, clock,
    allocator state) land on every implementation alike instead of on
    whichever ran last; the ratios between rows are what the targets are about."""
    samples: dict[int, list[float]] = {id(row): [] for row, _ in timed}
    for r in range(repeats):
        for row, step in timed:
            got = samples[id(row)]
            if "error" in row or (len(got) >= 3 and sum(got) / 1e3 >= _MAX_SECONDS):
                continue
            try:
                got += samples_ms(lambda i: _call(step, images, buf, 2 + r), device=str(device), warmup=0,
                                  repeats=1)
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                row["error"] = "out of memory"
                row["peak_mb"] = None
                _free(device)
    for row, _ in timed:
        got = samples[id(row)]
        row["ms"] = statistics.median(got) if got and "error" not in row else None
        row["samples"] = len(got)


def _find(rows: list[dict], dataset: str, method: str, groups: int, impl: str, objective: str) -> dict | None:
    for r in rows:
        if (r["dataset"], r["method"], r["groups"], r["impl"], r["objective"]) == (dataset, method, groups, impl,
                                                                                   objective):
            return r
    return None


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def ratios(rows: list[dict]) -> dict[str, dict]:
    """The ratios issue #6 targets (and the loop's, beside the FairDD paper's
    own code), keyed by a readable name: {"ratio", "target"} (target None:
    for information)."""
    out: dict[str, dict] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["dataset"] == dataset):
            for g in (10, 100):
                van = _find(rows, dataset, method, g, "vanilla", "vanilla")
                fair = _find(rows, dataset, method, g, "fastfair", "fairdd")
                loop = _find(rows, dataset, method, g, "loop", "fairdd")
                head = f"{dataset} {method.upper()} G={g}"
                items = [(f"{head} time fastfair fairdd / vanilla", _ratio(fair, van, "ms"),
                          TIME_TARGETS[(method, g)]),
                         (f"{head} time loop fairdd / vanilla", _ratio(loop, van, "ms"), None)]
                if method == "dc":
                    items.append((f"{head} peak memory fastfair fairdd / vanilla", _ratio(fair, van, "peak_mb"),
                                  MEMORY_TARGET_DC))
                for name, value, target in items:
                    if value is not None:
                        out[name] = {"ratio": value, "target": target}
    return out


def summary(rows: list[dict]) -> list[str]:
    """:func:`ratios`, one line each, saying whether each target is met."""
    lines = []
    for name, r in ratios(rows).items():
        line = f"{name}: {r['ratio']:.2f}"
        if r["target"] is not None:
            line += f" ({'meets' if r['ratio'] <= r['target'] else 'misses'} <= {r['target']})"
        elif "loop" in name and "G=10 " in name:
            method = "dm" if " DM " in name else "dc"
            line += f" (the FairDD paper's own code: {PAPER_CODE_AT_10[method]})"
        lines.append(line)
    return lines


def plot(rows: list[dict], dataset: str, method: str, title: str, path: str) -> None:
    """ms and peak_mb against G (log-x; log-y where the values span a decade),
    one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("ms", "step time (ms)"), ("peak_mb", "peak memory added by the step (MB)"))
    for ax, (key, unit) in zip(axes, panels):
        values = []
        for name in dict.fromkeys(_label(r) for r in sub):
            pts = sorted((r["groups"], r[key]) for r in sub if _label(r) == name and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                values += [p[1] for p in pts]
        if not values:  # e.g. --memory-only: no times
            ax.text(0.5, 0.5, f"no {unit.split(' (')[0]} measured", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        # log-log where the values span a decade or more (the reference loop
        # grows with G and would flatten the other lines on a linear axis);
        # within one decade a log axis would have no labelled tick.
        ax.set_xscale("log")
        if min(values) > 0 and max(values) >= 10 * min(values):
            ax.set_yscale("log")
        gs = sorted({r["groups"] for r in sub})
        ax.set_xticks(gs, [str(g) for g in gs])
        ax.minorticks_off()
        ax.set_xlabel("groups G")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="synthetic 10 classes x 64 at 32 px, width 32")
    p.add_argument("--json", default=None, help="output (default benchmarks/results/step_time_<device>.json)")
    p.add_argument("--dataset", default="both", choices=(*DATASETS, "both"))
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
                        "default: the driver's max(1, C // G); C = one block, the fewest network passes)")
    p.add_argument("--classes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ipc", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    try:
        device_name = check_device(a.device)
    except ValueError as exc:
        p.error(str(exc))
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
    scales = {"synthetic": syn, "cdigits-fg": digits}
    repeats = a.repeats or (5 if quick else 7)
    datasets = list(DATASETS) if a.dataset == "both" else [a.dataset]

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
    for dataset in datasets:
        scale = scales[dataset]
        base = _base_dataset(dataset, scale, device)
        real_groups = base.train.groups if dataset == "cdigits-fg" else None
        print(f"{dataset}: {base.num_classes} classes, {base.image_size} px, real batch {scale.batch}/class, "
              f"ConvNet width {scale.width} depth {_depth(base.image_size)}, IPC {scale.ipc}", flush=True)
        for method in a.methods:
            for g in a.groups:
                rows += _sweep_one(dataset, method, g, base, real_groups, scale, device, repeats, a.cobra_warmup,
                                   meter, common, skip_loop=a.skip_loop, memory_only=a.memory_only)
        del base
        _free(device)

    path = a.json or default_json(NAME, device_name)
    settings = {**{d: dataclasses.asdict(scales[d]) for d in datasets}, "repeats": repeats,
                "cobra_warmup_epochs": a.cobra_warmup, "dtype": "float32", "quick": quick, "real_chunk": a.real_chunk,
                "dc_block_classes": a.dc_block_classes, "skip_loop": a.skip_loop,
                "memory_only": a.memory_only}
    payload = {"benchmark": NAME, "machine": machine, "settings": settings, "peak_method": meter.method,
               "peak_unavailable": meter.reason, "ratios": ratios(rows), "rows": rows}
    write_json(path, payload)
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
