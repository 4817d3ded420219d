"""One-pass per-segment parameter gradients of an nn.Module.

FairDD's DC runs one extra backward pass per group; COBRA's DC needs the same
per-group gradients. Here ONE forward and ONE backward of the summed
per-sample losses over the whole real batch (all classes, all groups) give
every segment's gradient: hooks capture each layer's input A and output
gradient B, and the gradient of segment s's summed loss is
sum_{i in s} B_i^T A_i for a weight (DESIGN.md, op 3), sum_{i in s} B_i for a
bias, and sum_{i in s} B_i * xhat_i for a norm scale. This is exact for
networks whose samples do not interact (instance/group/layer norm), not for
BatchNorm in training mode, which is refused.

The per-sample products are formed in bounded chunks of rows and reduced with
fastfair.ops.segment_sum; counts stay on the device (no host sync).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)
# Rows per chunk when per-sample weight gradients are materialised.
_CHUNK_ELEMS = 1 << 24


def _check_model(model: nn.Module) -> None:
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"segment_gradients: layer '{name}' ({type(m).__name__}) is in training mode: "
                "BatchNorm couples the samples of a batch, so per-group gradients are not "
                "separable; use instance/group norm, call model.eval(), or fallback='loop'"
            )
        if not isinstance(m, _SUPPORTED):
            raise ValueError(
                f"segment_gradients: layer '{name}' ({type(m).__name__}) has parameters that "
                "cannot be decomposed per sample (supported: Conv2d, Linear, GroupNorm, "
                "LayerNorm); use fallback='loop'"
            )
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"segment_gradients: Conv2d '{name}' needs groups=1 and zero padding")


def _per_sample_loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    if loss == "mse":
        return 0.5 * (logits - labels).pow(2).sum()
    raise ValueError(f"unknown loss {loss!r}; choose 'ce' or 'mse'")


def _linear_weight(a: Tensor, b: Tensor, ids: Tensor, s: int) -> Tensor:
    if a.dim() > 2:  # [N, T, K]: sequence positions add up within a sample
        outer = torch.einsum("nto,ntk->nok", b, a)
    else:
        outer = torch.einsum("no,nk->nok", b, a)
    return ops.segment_sum(outer.reshape(outer.shape[0], -1), ids, s)


def _conv_weight(m: nn.Conv2d, a: Tensor, b: Tensor, ids: Tensor, s: int) -> Tensor:
    o = b.shape[1]
    k = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    l = b.shape[2] * b.shape[3]
    # The unfolded input of the whole batch would be N*K*L elements
    # (gigabytes at width 128): unfold a bounded chunk of rows at a time.
    rows = max(1, _CHUNK_ELEMS // max(1, k * l))
    total = None
    for r0 in range(0, a.shape[0], rows):
        cols = F.unfold(a[r0:r0 + rows], m.kernel_size, m.dilation, m.padding, m.stride)  # [n, K, L]
        per = torch.bmm(b[r0:r0 + rows].reshape(-1, o, l), cols.transpose(1, 2))  # [n, O, K]
        part = ops.segment_sum(per.reshape(per.shape[0], -1), ids[r0:r0 + rows], s)
        total = part if total is None else total + part
    return total


def segment_gradients(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    loss: str = "ce",
    fallback: str | None = None,
) -> tuple[Tensor, ...]:
    """Gradient of each segment's MEAN loss w.r.t. every trainable parameter.

    Returns one tensor per trainable parameter (model.parameters() order),
    shape [num_segments, *p.shape]; empty segments give zeros. The real side
    is a constant (no graph is kept). ``fallback="loop"`` runs one backward
    per segment and works for any model (the reference code's way).
    """
    if fallback not in (None, "loop"):
        raise ValueError(f"fallback must be None or 'loop', got {fallback!r}")
    if inputs.shape[0] != labels.shape[0] or labels.shape[0] != segment_ids.shape[0]:
        raise ValueError("segment_gradients: inputs, labels and segment_ids need the same length")
    params = [p for p in model.parameters() if p.requires_grad]
    counts = ops.segment_count(segment_ids, num_segments)
    if fallback == "loop":
        return _loop_gradients(model, params, inputs, labels, segment_ids, num_segments, loss)
    _check_model(model)

    captured: dict[nn.Module, list] = {}
    handles = []

    def forward_hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if mod in captured:
            raise ValueError(f"segment_gradients: {type(mod).__name__} is used twice in one forward")
        captured[mod] = [args[0].detach(), out]

    for m in model.modules():
        if isinstance(m, _SUPPORTED) and any(p.requires_grad for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(forward_hook))
    try:
        with torch.enable_grad():
            out = model(inputs)
            total = _per_sample_loss(out, labels, loss)
            # Ask for the layer outputs' gradients B only: autograd then skips
            # the batch weight gradients, which the segment sums replace.
            outs = [slot[1] for slot in captured.values()]
            bs = torch.autograd.grad(total, outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for slot, b in zip(captured.values(), bs):
        slot[1] = None if b is None else b.detach()

    grads: dict[int, Tensor] = {}
    for m, (a, b) in captured.items():
        if b is None:
            continue
        if isinstance(m, nn.Linear):
            grads[id(m.weight)] = _linear_weight(a, b, segment_ids, num_segments)
            if m.bias is not None:
                bb = b.reshape(b.shape[0], -1, b.shape[-1]).sum(1)
                grads[id(m.bias)] = ops.segment_sum(bb, segment_ids, num_segments)
        elif isinstance(m, nn.Conv2d):
            grads[id(m.weight)] = _conv_weight(m, a, b, segment_ids, num_segments)
            if m.bias is not None:
                grads[id(m.bias)] = ops.segment_sum(b.sum((2, 3)), segment_ids, num_segments)
        elif isinstance(m, nn.GroupNorm):
            xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
            red = tuple(range(2, a.dim()))
            if m.weight is not None:
                grads[id(m.weight)] = ops.segment_sum((b * xhat).sum(red), segment_ids, num_segments)
            if m.bias is not None:
                grads[id(m.bias)] = ops.segment_sum(b.sum(red), segment_ids, num_segments)
        elif isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
            n = a.shape[0]
            lead = a.dim() - len(m.normalized_shape)
            red = tuple(range(1, lead))
            if m.weight is not None:
                w = (b * xhat).sum(red) if red else b * xhat
                grads[id(m.weight)] = ops.segment_sum(w.reshape(n, -1), segment_ids, num_segments)
            if m.bias is not None:
                bb = b.sum(red) if red else b
                grads[id(m.bias)] = ops.segment_sum(bb.reshape(n, -1), segment_ids, num_segments)
    inv = 1.0 / counts.clamp(min=1).to(inputs.dtype if inputs.is_floating_point() else torch.float32)
    result = []
    for p in params:
        g = grads.get(id(p))
        if g is None:  # a parameter the loss does not reach
            g = p.new_zeros((num_segments, p.numel()))
        result.append((g * inv.to(g.dtype).unsqueeze(1)).reshape(num_segments, *p.shape))
    return tuple(result)


def _loop_gradients(model, params, inputs, labels, segment_ids, num_segments, loss) -> tuple[Tensor, ...]:
    out = [p.new_zeros((num_segments, *p.shape)) for p in params]
    for s in range(num_segments):
        rows = (segment_ids == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        with torch.enable_grad():
            value = _per_sample_loss(model(inputs[rows]), labels[rows], loss) / rows.numel()
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
) -> tuple[Tensor, ...]:
    """Per-class gradients of the synthetic set's mean loss, [C, *p.shape] each,
    differentiable w.r.t. the synthetic images when create_graph is set.

    A loop over classes on the small synthetic batch (the synthetic side has
    IPC rows per class); classes without rows give zeros.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    per_class: list[Sequence[Tensor]] = []
    for c in range(num_classes):
        rows = syn_labels == c
        x, y = syn_images[rows], syn_labels[rows]
        if x.shape[0] == 0:
            per_class.append([p.new_zeros(p.shape) for p in params])
            continue
        value = F.cross_entropy(model(x), y)
        gs = torch.autograd.grad(value, params, create_graph=create_graph, allow_unused=True)
        per_class.append([g if g is not None else p.new_zeros(p.shape) for g, p in zip(gs, params)])
    return tuple(torch.stack([pc[i] for pc in per_class]) for i in range(len(params)))
