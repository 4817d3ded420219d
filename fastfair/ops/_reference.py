"""Pure-PyTorch reference implementations of the ops (the fallback when no
compiled kernel serves a device, the path under torch.func transforms, and
the float64-exact building blocks the tests compare against)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import _reference_check_range

# Rows per chunk of the reference weight-gradient paths are capped so that the
# per-sample products of one chunk stay below this many elements.
_REF_CHUNK_ELEMS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

def _segment_sum_reference(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_sum")
    acc = _acc_dtype(x.dtype)
    out = torch.zeros(num_segments, x.shape[1], dtype=acc, device=x.device)
    return out.index_add(0, ids.long(), x.to(acc)).to(x.dtype)


def _segment_count_reference(ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_count")
    out = torch.zeros(num_segments, dtype=torch.int64, device=ids.device)
    return out.index_add(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))


def _segment_mean_reference(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_mean")
    acc = _acc_dtype(x.dtype)
    total = torch.zeros(num_segments, x.shape[1], dtype=acc, device=x.device)
    total = total.index_add(0, ids.long(), x.to(acc))
    count = _segment_count_reference(ids, num_segments).clamp(min=1).to(acc)
    return (total / count.unsqueeze(1)).to(x.dtype)


# ---------------------------------------------------------------------------

def _segment_linear_weight_grad_reference(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_linear_weight_grad")
    acc = _acc_dtype(inp.dtype)
    n, o, k = inp.shape[0], grad_out.shape[1], inp.shape[1]
    out = torch.zeros(num_segments, o * k, dtype=acc, device=inp.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, o * k))
    for r0 in range(0, n, rows):
        outer = torch.einsum("no,nk->nok", grad_out[r0:r0 + rows].to(acc), inp[r0:r0 + rows].to(acc))
        out = out.index_add(0, ids[r0:r0 + rows].long(), outer.reshape(outer.shape[0], -1))
    return out.view(num_segments, o, k).to(inp.dtype)


def _segment_conv2d_weight_grad_reference(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                                          ks, st, pd, dl) -> Tensor:  # noqa: ANN001
    _reference_check_range(ids, num_segments, "segment_conv2d_weight_grad")
    acc = _acc_dtype(inp.dtype)
    n, o, i = inp.shape[0], grad_out.shape[1], inp.shape[1]
    kk = i * ks[0] * ks[1]
    out = torch.zeros(num_segments, o * kk, dtype=acc, device=inp.device)
    # Unfold a bounded chunk of rows at a time: the whole batch's unfolded
    # input would be N * K * H'W' elements.
    per_row = kk * (grad_out.shape[2] * grad_out.shape[3] + o)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, per_row))
    for r0 in range(0, n, rows):
        cols = F.unfold(inp[r0:r0 + rows].to(acc), ks, dl, pd, st)  # [n, K, L]
        b = grad_out[r0:r0 + rows].to(acc).flatten(2)  # [n, O, L]
        per = torch.bmm(b, cols.transpose(1, 2))  # [n, O, K]
        out = out.index_add(0, ids[r0:r0 + rows].long(), per.reshape(per.shape[0], -1))
    return out.view(num_segments, o, i, ks[0], ks[1]).to(inp.dtype)
