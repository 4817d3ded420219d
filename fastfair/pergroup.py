"""One-pass per-segment parameter gradients of an nn.Module.

FairDD's DC runs one extra backward pass per group; COBRA's DC needs the same
per-group gradients. Here ONE forward and ONE backward of the summed
per-sample losses over the whole real batch (all classes, all groups) give
every segment's gradient (docs/architecture.md, op 3): hooks capture each layer's input A
and, from the one backward, the gradient B at its output; then

- Linear / Conv2d weight: sum_{i in s} B_i^T A_i, by the segmented kernels
  ``fastfair.ops.segment_linear_weight_grad`` / ``segment_conv2d_weight_grad``
  (a grouped GEMM over each segment's rows; the conv's im2col is implicit);
- biases: segment sums of B summed over positions;
- GroupNorm / LayerNorm / eval-mode BatchNorm scale: segment sums of
  B * xhat summed over positions (xhat the normalised input, from A and its
  statistics), shift: of B;

all through ``fastfair.ops.segment_sum``, then divided by the segment counts.
This is exact for networks whose samples do not interact (instance, group or
layer norm; BatchNorm only in eval mode). BatchNorm in training mode couples
the samples of a batch and is refused. Counts stay on the device: no host
sync on this path beyond, at most, one range check of the ids.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops, wgrad

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, _BatchNorm)


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


# Parameter-free layers that mix the rows of a batch when they act on the
# batch dimension (dim 0; None is Softmax's implicit dim, 0 for 1-D and 3-D
# inputs): (type, attribute naming the dimension, values that do).
_BATCH_DIM_MIXERS: tuple[tuple[type, str, tuple], ...] = (
    (nn.Softmax, "dim", (0, None)), (nn.Softmin, "dim", (0, None)), (nn.LogSoftmax, "dim", (0, None)),
    (nn.Flatten, "start_dim", (0,)), (nn.Unflatten, "dim", (0,)), (nn.CosineSimilarity, "dim", (0,)),
)


def _refusal(name: str, m: nn.Module) -> str | None:
    """Why layer ``m`` cannot be decomposed per sample (None when it can).

    Layers that couple the samples of a batch are refused whatever their
    parameters (a frozen or parameter-free BatchNorm in training mode still
    makes every sample's output, and so every gradient above it, depend on
    the others); layers with trainable parameters must also be of a kind the
    hooks split. InstanceNorm normalises each sample with its own statistics
    (or, with track_running_stats in eval mode, with fixed ones), so it never
    couples samples.
    """
    where = f"layer '{name}' ({type(m).__name__})"
    if isinstance(m, _BatchNorm):
        if m.training:
            return (f"{where} is in training mode: BatchNorm couples the samples of a batch, so "
                    "per-group gradients are not separable (with or without affine parameters); use "
                    "instance/group norm, call model.eval(), or fallback='loop'")
        if m.running_mean is None or m.running_var is None:
            return (f"{where} has no running statistics, so it normalises with batch statistics even "
                    "in eval mode: it couples the samples, per-group gradients are not separable; "
                    "use fallback='loop'")
        return None
    for kind, attr, values in _BATCH_DIM_MIXERS:
        if isinstance(m, kind) and getattr(m, attr, None) in values:
            return (f"{where} acts on the batch dimension ({attr}={getattr(m, attr)}), so it mixes the "
                    "samples: per-group gradients are not separable; use fallback='loop'")
    if not _trainable(m):
        return None  # no gradient of its own, and (past the checks above) per sample
    if not isinstance(m, _SUPPORTED):
        return (f"{where} has trainable parameters that cannot be decomposed per sample (supported: "
                "Conv2d, Linear, GroupNorm, LayerNorm, BatchNorm in eval mode); use fallback='loop'")
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"{where} has groups={m.groups}; only groups=1 is supported; use fallback='loop'"
    return None


def check_decomposable(model: nn.Module) -> None:
    """Raise ValueError naming the first layer whose parameter gradients are
    not a sum of per-sample terms (or that this module cannot split). Every
    module is checked, with or without trainable parameters."""
    for name, m in model.named_modules():
        why = _refusal(name, m)
        if why is not None:
            raise ValueError(f"segment_gradients: {why}")


def _parameter_uses(root: torch.autograd.graph.Node | None) -> dict[int, int]:
    """How often each leaf parameter (by id) enters the graph below ``root``:
    the number of edges from a node that is NOT a pure function of one
    parameter into one that is (the parameter's AccumulateGrad, or a chain of
    pure functions of it such as a transpose or autocast's cached copy, which
    several calls may share). A module call counts once per parameter."""
    if root is None:
        return {}
    pure: dict[torch.autograd.graph.Node, int | None] = {}  # node -> id of the one parameter it is a function of
    uses: dict[int, int] = {}
    stack: list[tuple[torch.autograd.graph.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: children are classified before their parents
        node, ready = stack.pop()
        if node in pure:
            continue
        kids = [f for f, _ in node.next_functions if f is not None]
        if not ready:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if k not in pure)
            continue
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad of a leaf
            pure[node] = id(var)
            continue
        owners = {pure[k] for k in kids}
        pure[node] = owners.pop() if len(owners) == 1 and None not in owners and kids else None
        if pure[node] is None:
            for k in kids:
                if pure[k] is not None:
                    uses[pure[k]] = uses.get(pure[k], 0) + 1
    return uses


def check_parameter_uses(model: nn.Module, total: Tensor, calls: list) -> None:
    """Raise ValueError when a hooked parameter enters the loss more often than
    its modules were called (e.g. ``F.linear(h, self.a.weight)`` in a
    forward): the hooks see only the module calls, so such a use would be
    missing from the per-segment gradients."""
    hooked: dict[int, int] = {}
    for c in calls:
        for p in c.module.parameters(recurse=False):
            if p.requires_grad:
                hooked[id(p)] = hooked.get(id(p), 0) + 1
    uses = _parameter_uses(total.grad_fn)
    for name, p in model.named_parameters():
        n_uses, n_calls = uses.get(id(p), 0), hooked.get(id(p), 0)
        if p.requires_grad and n_uses > n_calls:
            raise ValueError(
                f"segment_gradients: parameter '{name}' enters the loss {n_uses} time(s) but its layer is "
                f"called {n_calls} time(s): a use outside the layer's own call (e.g. F.linear(h, "
                f"self.layer.weight) in forward) is not split per segment; call the layer instead, or use "
                "fallback='loop'")


@dataclass
class _Call:
    """One call of a hooked layer: its input A and output (later: gradient B)."""

    name: str
    module: nn.Module
    a: Tensor
    out: Tensor | None
    versions: tuple[int, int]
    b: Tensor | None = None


def _capture(model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor],
             create_graph: bool) -> list[_Call]:
    """One forward and one backward; every hooked call's A and B.

    The backward asks autograd for the layer outputs' gradients only, so it
    skips the batch weight gradients that the segment sums replace.
    """
    calls: list[_Call] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        a = args[0] if create_graph else args[0].detach()
        calls.append(_Call(names[mod], mod, a, out, (args[0]._version, out._version)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, _SUPPORTED) and _trainable(m)]
    try:
        with torch.enable_grad():
            total = loss_fn(model(inputs))
            check_parameter_uses(model, total, calls)
            for c in calls:
                # A layer input or output overwritten in place later on (e.g.
                # ReLU(inplace=True) after a conv) would give silently wrong A or B.
                if (c.a._version, c.out._version) != c.versions:
                    raise ValueError(
                        f"segment_gradients: the input or output of layer '{c.name}' "
                        f"({type(c.module).__name__}) is modified in place later in the forward "
                        "(e.g. ReLU(inplace=True)); use out-of-place ops or fallback='loop'"
                    )
            needs = [c for c in calls if c.out.requires_grad]
            if needs:
                bs = torch.autograd.grad(total, [c.out for c in needs], allow_unused=True,
                                         create_graph=create_graph)
                for c, b in zip(needs, bs):
                    c.b = b if create_graph or b is None else b.detach()
    finally:
        for h in handles:
            h.remove()
    for c in calls:
        c.out = None  # drop the graph of the real side
    return calls


def _conv_input_and_padding(m: nn.Conv2d, a: Tensor) -> tuple[Tensor, tuple[int, int]]:
    # 'same' / 'valid' padding and non-zero padding modes: pad A the way
    # Conv2d's forward does, then the conv itself has no padding.
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(a, m._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return a, tuple(m.padding)


def _spatial_sum(t: Tensor) -> Tensor:
    """[N, C, *] -> [N, C]."""
    return t.flatten(2).sum(2) if t.dim() > 2 else t


def _layer_sums(c: _Call, ids: Tensor, s: int) -> list[tuple[nn.Parameter, Tensor]]:
    """Per-segment SUMS of this call's parameter gradients, [S, numel] each."""
    m, a, b = c.module, c.a, c.b
    n = a.shape[0]
    dt = torch.promote_types(a.dtype, b.dtype)  # autocast may give B another dtype
    a, b = a.to(dt), b.to(dt)
    out: list[tuple[nn.Parameter, Tensor]] = []
    want = lambda p: p is not None and p.requires_grad  # noqa: E731
    if isinstance(m, nn.Linear):
        if a.dim() < 2:
            raise ValueError(f"segment_gradients: Linear '{c.name}' needs a batched input [N, ..., K]")
        if want(m.weight):
            if a.dim() == 2:
                w = ops.segment_linear_weight_grad(b, a, ids, s)
            else:  # [N, T, K]: every position of a sample joins its segment's reduction
                t = a[0].numel() // a.shape[-1] if n else 0
                w = ops.segment_linear_weight_grad(
                    b.reshape(-1, b.shape[-1]), a.reshape(-1, a.shape[-1]), ids.repeat_interleave(t), s)
            out.append((m.weight, w.reshape(s, -1)))
        if want(m.bias):
            out.append((m.bias, _segment_sum(b.reshape(n, -1, b.shape[-1]).sum(1), ids, s)))
    elif isinstance(m, nn.Conv2d):
        if a.dim() != 4:
            raise ValueError(f"segment_gradients: Conv2d '{c.name}' needs a batched input [N, C, H, W]")
        if want(m.weight):
            a_pad, padding = _conv_input_and_padding(m, a)
            w = ops.segment_conv2d_weight_grad(b, a_pad, ids, s, m.kernel_size, m.stride, padding, m.dilation)
            out.append((m.weight, w.reshape(s, -1)))
        if want(m.bias):
            out.append((m.bias, _segment_sum(_spatial_sum(b), ids, s)))
    else:  # normalisation layers: y = xhat * weight + bias
        if isinstance(m, nn.LayerNorm):  # affine over the trailing normalized_shape
            d = len(m.normalized_shape)
            per = lambda t: t.reshape(t.shape[0], -1, *t.shape[t.dim() - d:]).sum(1).flatten(1)  # noqa: E731
        else:  # GroupNorm, eval-mode BatchNorm: affine per channel (dim 1)
            per = _spatial_sum
        if want(m.weight):
            out.append((m.weight, _segment_sum(_norm_scale_grad(m, a, b, per), ids, s)))
        if want(m.bias):
            out.append((m.bias, _segment_sum(per(b), ids, s)))
    return out


def _segment_sum(x: Tensor, ids: Tensor, s: int) -> Tensor:
    """Segment sums of a layer's bias / norm terms: from the pass's shared
    sorted layout where there is one (GPUs: no per-layer sort), else
    ops.segment_sum."""
    shared = wgrad.sorted_segment_sum(x, ids, s)
    return ops.segment_sum(x, ids, s) if shared is None else shared


# Rows per chunk of the normalised input are capped at this many elements.
_CHUNK_ELEMS = 1 << 22


def _normalise(m: nn.Module, a: Tensor) -> Tensor:
    """xhat, the normalised input before the affine map, as m's forward computes it."""
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, None, None, m.eps)
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    # eval-mode BatchNorm: a fixed per-channel affine map of the running statistics
    return F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _norm_scale_grad(m: nn.Module, a: Tensor, b: Tensor, per: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-sample gradients of a norm's scale, per(B * xhat), [N, numel].

    xhat is recomputed in bounded chunks of rows, so no second tensor of A's
    size is allocated (at width 128 and a real batch of 2560 one is 1.3 GB).
    """
    n = a.shape[0]
    rows = max(1, _CHUNK_ELEMS // max(1, a[0].numel())) if n else 1
    parts = [per(b[r0:r0 + rows] * _normalise(m, a[r0:r0 + rows])) for r0 in range(0, n, rows)]
    return torch.cat(parts) if parts else per(b)


def _hooked_segment_gradients(model: nn.Module, inputs: Tensor, labels: Tensor, loss: str,
                              ids: Tensor, num_segments: int, counts: Tensor,
                              create_graph: bool, chunk: int | str | None = None) -> tuple[Tensor, ...]:
    params = [p for p in model.parameters() if p.requires_grad]
    n = inputs.shape[0]
    if n == 0:  # every segment empty (e.g. a rank or a block of classes without real rows)
        return tuple(p.new_zeros((num_segments, *p.shape)) for p in params)
    rows = _chunk_rows(chunk, model, inputs)
    chunked = rows < n
    if n > 1:
        # Rows sorted by segment ONCE per call (stable: a segment keeps its
        # row order), so every layer's A and B arrive sorted: the
        # weight-gradient kernels read each segment's rows in place instead
        # of gathering them (the CUDA grouped GEMM skips its sort and shares
        # one set of offsets across layers: wgrad.sorted_segments below), and
        # a chunk of rows spans a contiguous range of segments, so it only
        # produces and adds that range's sums (S x |W| per chunk would swamp
        # small chunks when S is large).
        order = torch.argsort(ids, stable=True)
        inputs, labels, ids = inputs[order], labels[order], ids[order]
    if not chunked:
        spans = [(0, n, 0, num_segments)]
    else:
        # Segment SUMS add across chunks, so only one chunk's activations are
        # alive at a time and the result equals the one-pass result (up to
        # the order of floating-point additions). One host sync for the
        # chunks' segment ranges.
        starts = list(range(0, n, rows))
        ends = [min(n, r0 + rows) for r0 in starts]
        at = torch.tensor(starts + [r1 - 1 for r1 in ends], device=ids.device)
        edge = ids[at].tolist()
        spans = [(r0, r1, lo, hi + 1 - lo)
                 for r0, r1, lo, hi in zip(starts, ends, edge[:len(starts)], edge[len(starts):])]
    sums: dict[int, Tensor] = {}
    filled: dict[int, int] = {}  # chunked: rows [0, filled) of sums[id(p)] are written
    for r0, r1, lo, width in spans:
        calls = _capture(model, inputs[r0:r1], _summed_loss(labels[r0:r1], loss), create_graph)
        part_ids = ids[r0:r1] - lo if lo else ids[r0:r1]
        # The ids were range-checked once by the caller's segment_count: the
        # per-layer ops skip the check (it is a host sync on GPUs). On GPUs
        # the chunk's segment offsets are computed once for all its layers.
        shared = (wgrad.sorted_segments(wgrad.SegmentLayout.of_sorted(part_ids, width))
                  if part_ids.device.type != "cpu" else contextlib.nullcontext())
        with ops.validate_ids(False), shared:
            part: dict[int, Tensor] = {}
            for c in calls:
                if c.b is None:  # the loss does not depend on this layer's output
                    continue
                for p, g in _layer_sums(c, part_ids, width):
                    # Shared parameters and layers called twice add up.
                    part[id(p)] = g if id(p) not in part else part[id(p)] + g
        del calls
        if not chunked:
            sums = part
            continue
        for key, g in part.items():
            if key not in sums:
                # Uninitialised: per-segment gradients can be gigabytes (1000
                # segments x a width-128 ConvNet), so every row is written
                # exactly once below instead of zero-filled first.
                sums[key], filled[key] = g.new_empty((num_segments, g.shape[1])), 0
            _merge_rows(sums[key], filled[key], lo, g)
            filled[key] = lo + width
    for key, total in sums.items():
        if chunked and filled[key] < num_segments:
            total[filled[key]:].zero_()
    result = []
    inv = None
    for p in params:
        g = sums.get(id(p))
        if g is None:  # a parameter the loss does not reach
            result.append(p.new_zeros((num_segments, *p.shape)))
            continue
        if inv is None:
            inv = (1.0 / counts.clamp(min=1).to(g.dtype)).unsqueeze(1)
        # In place where nothing else holds g: one pass less over [S, |p|].
        g = g * inv if create_graph else g.mul_(inv)
        result.append(g.to(p.dtype).reshape(num_segments, *p.shape))
    return tuple(result)


def _merge_rows(total: Tensor, filled: int, lo: int, g: Tensor) -> None:
    """Write a chunk's segment sums ``g`` (segments lo .. lo + len(g)) into
    ``total``, whose rows below ``filled`` hold earlier chunks' sums. Chunks
    run over rows sorted by segment, so they overlap at most in segment
    ``filled - 1``; segments no chunk holds (empty ones) are zeroed."""
    if lo > filled:
        total[filled:lo].zero_()
    shared = max(0, filled - lo)
    if shared:
        total[lo:filled] += g[:shared]
    total[lo + shared:lo + g.shape[0]] = g[shared:]


# chunk="auto" on CPU: rows per pass such that one pass's input holds about
# this many elements (40 images of 3x32x32). On CPUs the one pass is
# memory-bound once the activations leave the caches: ConvNet w128 at 32 px,
# 400 rows at once ran slower than the same rows 40 at a time (2-core Xeon;
# benchmarks/NOTES.md has the numbers).
_CPU_AUTO_INPUT_ELEMS = 3 * 32 * 32 * 40
# On GPUs: 2^24 input elements per pass (1365 images of 3x64x64, 5461 of
# 3x32x32). Big enough to fill an H100 with a width-128 ConvNet, small enough
# that an ImageNet-subset batch (100 classes x 256 images at 64 px) does not
# keep the activations of 25600 images at once: its first conv output alone
# would be 54 GB in float32.
_GPU_AUTO_INPUT_ELEMS = 1 << 24


def auto_chunk(model: nn.Module, inputs: Tensor) -> int:
    """Rows per network pass that ``chunk="auto"`` picks for this batch.

    All rows for models whose samples interact (BatchNorm in training mode:
    its batch statistics would change with the chunk); otherwise blocks of
    about 2^17 input elements on CPUs, so the activations stay in cache, and
    of 2^24 on GPUs, so large batches stay within memory.
    """
    n = inputs.shape[0]
    if n == 0 or _couples_samples(model):
        return max(n, 1)
    budget = _CPU_AUTO_INPUT_ELEMS if inputs.device.type == "cpu" else _GPU_AUTO_INPUT_ELEMS
    return max(1, min(n, budget // max(1, inputs[0].numel())))


def _couples_samples(model: nn.Module) -> bool:
    # The BatchNorm cases _refusal refuses are exactly those that normalise
    # with batch statistics.
    return any(isinstance(m, _BatchNorm) and _refusal(name, m) is not None
               for name, m in model.named_modules())


def _chunk_rows(chunk: int | str | None, model: nn.Module, inputs: Tensor) -> int:
    """Rows per forward/backward pass for ``chunk`` (see segment_gradients)."""
    if chunk is None:
        return max(inputs.shape[0], 1)
    if chunk == "auto":
        return auto_chunk(model, inputs)
    return chunk  # type: ignore[return-value]


def _summed_loss(labels: Tensor, loss: str) -> Callable[[Tensor], Tensor]:
    if loss == "ce":
        return lambda logits: F.cross_entropy(logits, labels, reduction="sum")
    if loss == "mse":
        return lambda out: 0.5 * (out - labels).pow(2).sum()
    raise ValueError(f"unknown loss {loss!r}; choose 'ce' or 'mse'")


def segment_gradients(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    loss: str = "ce",
    fallback: str | None = None,
    chunk: int | str | None = "auto",
) -> tuple[Tensor, ...]:
    """Gradient of each segment's MEAN loss w.r.t. every trainable parameter.

    inputs: the real batch [N, ...] (all classes and groups together); labels:
    [N] class labels ('ce') or targets ('mse', 0.5 * squared error);
    segment_ids: [N] int32/int64 in [0, num_segments), typically
    ``class * num_groups + group``. Returns one tensor per trainable parameter
    (model.parameters() order), shape [num_segments, *p.shape]; empty
    segments give zeros. One forward and one backward in all; the real side is
    a constant (no graph is kept).

    Raises ValueError naming the layer for models whose gradients are not a
    sum over samples (BatchNorm in training mode) or that contain trainable
    layers other than Conv2d (groups=1), Linear, GroupNorm, LayerNorm and
    eval-mode BatchNorm. ``fallback="loop"`` instead runs one forward and one
    backward per non-empty segment and works for any model (the reference
    code's way; it syncs with the host).

    ``chunk``: at most this many rows per forward/backward; None: all at
    once; "auto" (default): :func:`auto_chunk`, on CPUs blocks of 40 images
    of 3x32x32 (or as many input elements), which keeps the activations in
    cache (measured faster than one pass), on GPUs blocks of 2^24 input
    elements (all rows of most batches; 1365 images at 64 px). The rows
    are sorted by segment first, so each chunk covers a contiguous range of
    segments; the per-segment gradient sums of the chunks are added before
    the division by the counts, so the result is the same (up to the order
    of floating-point additions), while the activation memory is that of one
    chunk: large real batches (ImageNet subsets, 100 classes x 256 images)
    fit on one GPU.
    """
    if fallback not in (None, "loop"):
        raise ValueError(f"fallback must be None or 'loop', got {fallback!r}")
    if chunk is not None and chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, 'auto' or None, got {chunk!r}")
    if not (inputs.shape[0] == labels.shape[0] == segment_ids.shape[0]):
        raise ValueError(
            f"segment_gradients: inputs, labels and segment_ids need the same length, got "
            f"{inputs.shape[0]}, {labels.shape[0]} and {segment_ids.shape[0]}"
        )
    _summed_loss(labels, loss)  # an unknown loss name fails here, before any work
    counts = ops.segment_count(segment_ids, num_segments)  # also checks the ids
    if fallback == "loop":
        return _loop_gradients(model, inputs, labels, segment_ids, num_segments, loss)
    check_decomposable(model)
    return _hooked_segment_gradients(model, inputs, labels, loss, segment_ids, num_segments, counts,
                                     create_graph=False, chunk=chunk)


def _loop_gradients(model: nn.Module, inputs: Tensor, labels: Tensor, segment_ids: Tensor,
                    num_segments: int, loss: str) -> tuple[Tensor, ...]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = [p.new_zeros((num_segments, *p.shape)) for p in params]
    for s in range(num_segments):
        rows = (segment_ids == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        with torch.enable_grad():
            value = _summed_loss(labels[rows], loss)(model(inputs[rows])) / rows.numel()
            gs = torch.autograd.grad(value, params, allow_unused=True)
        for o, g in zip(out, gs):
            if g is not None:
                o[s] = g.detach()
    return tuple(out)


def class_gradients(
    model: nn.Module,
    syn_images: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    create_graph: bool = True,
    batched: bool = False,
    class_sizes: Sequence[int] | None = None,
) -> tuple[Tensor, ...]:
    """Per-class gradients of the synthetic set's mean loss, [C, *p.shape] each
    (one per trainable parameter), differentiable w.r.t. the synthetic images
    when ``create_graph`` is set. Classes without rows give zeros.

    ``batched=False``: a loop over classes, one forward and one backward per
    class on the small synthetic batch (the DC reference's way; BatchNorm in
    training mode then sees one class at a time, as there).
    ``batched=True``: one forward and one backward over all classes with the
    segmented kernels (segments = classes), for per-sample-independent models
    only (ValueError otherwise, like :func:`segment_gradients`).

    ``class_sizes`` (loop only): the rows are class-major with these many rows
    per class (the synthetic set's layout, known on the host), so each class
    is a slice and the loop never reads the device. Without it the rows are
    sorted by label once and the per-class sizes read back once: one host
    sync per call instead of one per class (boolean-mask indexing).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if batched:
        if syn_images.shape[0] != syn_labels.shape[0]:
            raise ValueError("class_gradients: syn_images and syn_labels need the same length")
        check_decomposable(model)
        counts = ops.segment_count(syn_labels, num_classes)
        return _hooked_segment_gradients(model, syn_images, syn_labels, "ce", syn_labels,
                                         num_classes, counts, create_graph=create_graph)
    if syn_images.shape[0] != syn_labels.shape[0]:
        raise ValueError("class_gradients: syn_images and syn_labels need the same length")
    if class_sizes is None:
        order = torch.argsort(syn_labels, stable=True)
        sizes = ops.segment_count(syn_labels, num_classes).tolist()  # the one host read
        if sum(sizes) != syn_labels.shape[0]:
            raise ValueError(f"class_gradients: syn_labels must lie in [0, {num_classes})")
        syn_images, syn_labels = syn_images[order], syn_labels[order]
    else:
        sizes = [int(v) for v in class_sizes]
        if len(sizes) != num_classes or sum(sizes) != syn_labels.shape[0] or min(sizes, default=0) < 0:
            raise ValueError(
                f"class_gradients: class_sizes must give {num_classes} non-negative row counts summing "
                f"to {syn_labels.shape[0]}, got {list(class_sizes)}"
            )
    per_class: list[list[Tensor]] = []
    for x, y in zip(syn_images.split(sizes), syn_labels.split(sizes)):
        if x.shape[0] == 0:
            per_class.append([p.new_zeros(p.shape) for p in params])
            continue
        with torch.enable_grad():
            value = F.cross_entropy(model(x), y)
            gs = torch.autograd.grad(value, params, create_graph=create_graph, allow_unused=True)
        per_class.append([g if g is not None else p.new_zeros(p.shape) for g, p in zip(gs, params)])
    return tuple(torch.stack([pc[i] for pc in per_class]) for i in range(len(params)))
