"""Python face of fastfair's custom ops: dispatch, checks, autograd, fake kernels.

The kernels live in ``csrc/`` and are registered as ``torch.ops.fastfair.*``.
When the compiled extension is missing (or has no kernel for the tensor's
device) the same functions run on pure-PyTorch reference implementations, so
``import fastfair`` never fails; :func:`backend` says which path is active.

Contracts (docs/architecture.md): the caller passes ``num_segments``; ids are int32 or
int64 in any order; empty segments give zeros; half/bfloat16 accumulate in
float32; the kernels are deterministic (no atomics, fixed reduction order).

Modules, one job each (imported in this order; none imports the package):
``_dispatch`` (kernel or reference, per op and device), ``_checks`` (argument
checks and the out-of-range id record), ``_reference`` (pure-PyTorch
implementations), ``segment`` (segment sums / means / counts), ``dm_loss``
(the fair DM loss from one pass), ``weight_grad`` (segmented weight
gradients and their CUDA kernels, built on :mod:`fastfair.wgrad`).
"""
from __future__ import annotations

# ruff: noqa: F401  (a package face: every import is a re-export)

# The private names are the package's own helpers, re-exported for fastfair's
# other modules (nn, distill) and the tests.
from ._checks import (_after_kernel, _as_size, _check_args, _check_conv_geometry, _check_rows_1d,
                      _check_same_device, _check_weight_grad_args, _first_out_of_range, _naming_bad_rows,
                      raise_pending_errors, validate_ids)
from ._dispatch import _under_func_transform, _use_kernel, backend
from ._reference import (_segment_conv2d_weight_grad_reference, _segment_count_reference,
                         _segment_linear_weight_grad_reference, _segment_mean_reference, _segment_sum_reference)
from .dm_loss import fair_dm_loss, fair_dm_terms
from .segment import _gather_segment_rows, segment_count, segment_ids, segment_mean, segment_sum
from .weight_grad import (get_weight_grad_precision, segment_conv2d_weight_grad, segment_linear_weight_grad,
                          set_weight_grad_precision, weight_grad_precision)

__all__ = ["backend", "fair_dm_loss", "fair_dm_terms", "get_weight_grad_precision", "raise_pending_errors",
           "segment_conv2d_weight_grad", "segment_count", "segment_ids", "segment_linear_weight_grad",
           "segment_mean", "segment_sum", "set_weight_grad_precision", "validate_ids", "weight_grad_precision"]
