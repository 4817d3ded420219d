// CPU kernels for the segmented weight gradients of one-pass per-group DC
// (docs/architecture.md, op 3):
//   segment_linear_weight_grad(B [N, O], A [N, K], ids, S)  -> [S, O, K]
//   segment_conv2d_weight_grad(B [N, O, H', W'], A [N, I, H, W], ids, S, ...)
//                                                       -> [S, O, I, kh, kw]
// out[s] = sum over rows i with ids[i] == s of the weight gradient of row i
// alone (B_i^T A_i for Linear; the conv weight gradient of sample i).
//
// Strategy: a stable counting sort of the ids gives every segment's rows in
// order; each segment is then reduced by ATen's own dense weight-gradient
// code (one at::mm per segment for Linear, at::convolution_backward on
// bounded blocks of the segment's rows for Conv2d), in float32 for half and
// bfloat16. Nothing of size N x O x K (Linear) or N x K x H'W' (the unfolded
// conv input of the whole batch) is ever materialised: the largest temporary
// is one block of gathered rows (none when a segment's rows are consecutive).
//
// Deterministic: no atomics; segments and blocks are visited in a fixed
// order that depends only on the ids and the shapes, and each block's sum
// is added to its segment's slot in that order. Whether the result is also
// bitwise identical across thread counts is up to the BLAS / oneDNN call
// inside (it is for a fixed thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace fastfair {

// Argument checks shared with csrc/cuda/segment_weight_grad.cu (declared
// there): they run before any kernel so that bad input is a Python
// ValueError / TypeError, never a crash.
void check_weight_grad_common(const at::Tensor& grad_out, const at::Tensor& input,
                              const at::Tensor& ids, int64_t num_segments,
                              const char* op) {
  check_ids(ids, num_segments, op);
  TORCH_CHECK_VALUE(grad_out.size(0) == input.size(0), op, ": grad_out has ",
                    grad_out.size(0), " rows but input has ", input.size(0));
  TORCH_CHECK_VALUE(input.size(0) == ids.size(0), op, ": input has ", input.size(0),
                    " rows but ids has ", ids.size(0), " entries");
  TORCH_CHECK_VALUE(grad_out.device() == input.device() && input.device() == ids.device(),
                    op, ": grad_out, input and ids must be on one device, got ",
                    grad_out.device(), ", ", input.device(), " and ", ids.device());
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   op, ": input must be float32/float64/float16/bfloat16, got ", t);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == t, op, ": grad_out (", grad_out.scalar_type(),
                   ") and input (", t, ") must have the same dtype");
}

void check_linear_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& ids, int64_t num_segments) {
  const char* op = "segment_linear_weight_grad";
  TORCH_CHECK_VALUE(grad_out.dim() == 2, op, ": grad_out must be 2-D [N, O], got shape ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must be 2-D [N, K], got shape ",
                    input.sizes());
  check_weight_grad_common(grad_out, input, ids, num_segments, op);
  check_output_size(num_segments, {grad_out.size(1), input.size(1)}, input.element_size(), op);
}

void check_conv2d_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& ids, int64_t num_segments,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "segment_conv2d_weight_grad";
  TORCH_CHECK_VALUE(grad_out.dim() == 4, op,
                    ": grad_out must be 4-D [N, O, H', W'], got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [N, I, H, W], got shape ",
                    input.sizes());
  check_weight_grad_common(grad_out, input, ids, num_segments, op);
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                        dilation.size() == 2,
                    op, ": kernel_size, stride, padding and dilation must have 2 entries each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(kernel_size[d] > 0 && stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0,
                      op, ": need kernel_size, stride, dilation > 0 and padding >= 0, got ",
                      kernel_size, ", ", stride, ", ", dilation, ", ", padding);
    const int64_t expect =
        conv_out_size(input.size(2 + d), kernel_size[d], stride[d], padding[d], dilation[d]);
    TORCH_CHECK_VALUE(expect > 0 && grad_out.size(2 + d) == expect, op, ": grad_out spatial size ",
                      grad_out.sizes().slice(2), " does not match a convolution of input size ",
                      input.sizes().slice(2), " with kernel_size ", kernel_size, ", stride ", stride,
                      ", padding ", padding, ", dilation ", dilation, " (expected ",
                      d == 0 ? "H' = " : "W' = ", expect, ")");
  }
  check_output_size(num_segments,
                    {grad_out.size(1), input.size(1), kernel_size[0], kernel_size[1]},
                    input.element_size(), op);
}

namespace {

// Stable counting sort of the ids: perm lists the rows of segment 0, then of
// segment 1, ..., each in row order; offsets[s] .. offsets[s + 1] bounds
// segment s in perm. Checks the range as it reads.
template <typename index_t>
void sort_rows(const index_t* ids, int64_t n, int64_t num_segments, const char* op,
               std::vector<int64_t>& offsets, at::Tensor& perm) {
  offsets.assign(num_segments + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(s >= 0 && s < num_segments, op, ": ids[", i, "] = ", s,
                      " is outside [0, num_segments = ", num_segments, ")");
    offsets[s + 1] += 1;
  }
  for (int64_t s = 0; s < num_segments; ++s) offsets[s + 1] += offsets[s];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  perm = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) p[next[static_cast<int64_t>(ids[i])]++] = i;
}

at::Tensor sorted_rows(const at::Tensor& ids_in, int64_t num_segments, const char* op,
                       std::vector<int64_t>& offsets) {
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor perm;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastfair_sort_rows", [&] {
    sort_rows(ids.const_data_ptr<index_t>(), ids.size(0), num_segments, op, offsets, perm);
  });
  return perm;
}

// Rows per block are capped at this many elements (input + grad_out of the
// block, in the accumulation dtype): 8 MB in float32. Small on purpose: a
// block's operands then stay in the last-level cache while oneDNN / BLAS
// reads them several times, and measured on a 2-core Xeon, weight gradients
// of 40-row blocks ran 2x faster than one call over 400 rows.
constexpr int64_t kBlockElems = int64_t(1) << 21;

// The output starts uninitialised: every non-empty segment's slot is written
// by its first block, so only the empty ones are zeroed (at a thousand
// segments of a width-128 ConvNet, zero-filling all of them first was one
// more pass over 0.6 GB per layer).
void zero_empty_segments(at::Tensor& out, const std::vector<int64_t>& offsets) {
  const int64_t num_segments = out.size(0);
  for (int64_t s = 0; s < num_segments;) {
    if (offsets[s + 1] > offsets[s]) {
      ++s;
      continue;
    }
    int64_t e = s + 1;  // a run of empty segments is zeroed in one call
    while (e < num_segments && offsets[e + 1] == offsets[e]) ++e;
    out.narrow(0, s, e - s).zero_();
    s = e;
  }
}

// Rows r0 .. r1 of perm as a tensor of row indices, or an empty optional when
// they are consecutive rows of the input: then the block is a narrow() view
// and nothing is copied. The counting sort is stable, so a segment's rows are
// increasing in perm and the run is consecutive iff its ends are r1 - r0 - 1
// apart. A batch sorted by segment (pergroup sorts it) always takes this path.
c10::optional<int64_t> consecutive_start(const at::Tensor& perm, int64_t r0, int64_t r1) {
  const int64_t* p = perm.const_data_ptr<int64_t>();
  if (p[r1 - 1] - p[r0] == r1 - r0 - 1) return p[r0];
  return c10::nullopt;
}

// Like consecutive_start for a run of perm that may span several segments,
// where perm is increasing only within each segment: every entry is checked.
c10::optional<int64_t> consecutive_start_any(const at::Tensor& perm, int64_t r0, int64_t r1) {
  const int64_t* p = perm.const_data_ptr<int64_t>();
  for (int64_t r = r0 + 1; r < r1; ++r) {
    if (p[r] != p[r0] + (r - r0)) return c10::nullopt;
  }
  return p[r0];
}

// The block's rows of t in the accumulation dtype, contiguous. ``one_segment``:
// the rows r0 .. r1 of perm belong to one segment (the cheap check holds).
at::Tensor block_rows(const at::Tensor& t, const at::Tensor& perm, int64_t r0, int64_t r1,
                      at::ScalarType acc, bool one_segment = true) {
  const auto start = one_segment ? consecutive_start(perm, r0, r1) : consecutive_start_any(perm, r0, r1);
  const at::Tensor rows = start ? t.narrow(0, *start, r1 - r0) : t.index_select(0, perm.narrow(0, r0, r1 - r0));
  return rows.to(acc).contiguous();
}

// Each segment's rows in blocks of at most `rows`, gathered in sorted order
// and cast to `acc`; add_block(slot, b, a, first) puts one block's weight
// gradient into the segment's slot of `out` (the first block writes, later
// ones add: the fixed order keeps the sums deterministic).
template <typename AddBlock>
void for_each_row_block(at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& input,
                        const at::Tensor& perm, const std::vector<int64_t>& offsets, int64_t rows,
                        at::ScalarType acc, AddBlock&& add_block) {
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(offsets.size()); ++s) {
    at::Tensor slot = out.select(0, s);
    for (int64_t r0 = offsets[s]; r0 < offsets[s + 1]; r0 += rows) {
      const int64_t r1 = std::min(r0 + rows, offsets[s + 1]);
      add_block(slot, block_rows(grad_out, perm, r0, r1, acc), block_rows(input, perm, r0, r1, acc),
                r0 == offsets[s]);
    }
  }
}

at::Tensor segment_linear_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                          const at::Tensor& ids, int64_t num_segments) {
  check_linear_weight_grad_args(grad_out, input, ids, num_segments);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t o = grad_out.size(1), k = input.size(1);
  at::Tensor out = at::empty({num_segments, o, k}, input.options().dtype(acc));
  std::vector<int64_t> offsets;
  const at::Tensor perm = sorted_rows(ids, num_segments, "segment_linear_weight_grad", offsets);
  zero_empty_segments(out, offsets);
  const int64_t rows = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(1, o + k));
  for_each_row_block(out, grad_out, input, perm, offsets, rows, acc,
                     [](at::Tensor& slot, const at::Tensor& b, const at::Tensor& a, bool first) {
                       if (first) {
                         at::mm_out(slot, b.t(), a);
                       } else {
                         slot.addmm_(b.t(), a);
                       }
                     });
  return acc == input.scalar_type() ? out : out.to(input.scalar_type());
}

// Below this many rows per non-empty segment on average (and with at least
// kPerSampleMinChannels input channels), the conv weight gradient goes per
// sample instead of per segment: one at::convolution_backward per segment
// costs ~0.05-0.15 ms of fixed overhead on a 2-core Xeon, which for 1000
// segments of 2-3 rows (DC at G = 100) outweighed the FLOPs. Measured there
// (20 rows, 2 rows per segment, width 32): 16 px 1.50 ms per segment vs
// 0.50 ms per sample (dense: 0.46), 8 px 1.26 vs 0.26; with 3 input channels
// per sample was slower (2.59 vs 2.11 ms), at width 128 a tie
// (benchmarks/NOTES.md).
constexpr int64_t kSmallSegmentRows = 8;
constexpr int64_t kPerSampleMinChannels = 16;

// Blocks of rows spanning many segments: every row's own weight gradient
// from ONE grouped convolution backward (the block's rows stacked as groups
// of one sample: input [1, rows x I, H, W], weight [rows x O, I, kh, kw]),
// then each segment's consecutive rows summed into its slot. Same FLOPs as
// the dense weight gradient; the temporaries (including the rows x |W|
// per-sample gradients) are bounded by kBlockElems like the per-segment path.
void conv2d_weight_grad_per_sample(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& perm, const std::vector<int64_t>& offsets,
                                   at::Tensor& out, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t per_row, at::ScalarType acc) {
  const int64_t num_segments = out.size(0), n = input.size(0), o = grad_out.size(1);
  const int64_t ci = input.size(1);
  const int64_t w_elems = o * ci * kernel_size[0] * kernel_size[1];
  const int64_t rows = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(1, per_row + 2 * w_elems));
  const std::vector<int64_t> no_output_padding{0, 0};
  at::Tensor flat = out.view({num_segments, w_elems});
  // Only the weight's shape matters to the weight gradient: one zero tensor
  // for the largest block, narrowed for a shorter last one.
  const at::Tensor weight_all = at::zeros({std::min(rows, n) * o, ci, kernel_size[0], kernel_size[1]},
                                          input.options().dtype(acc));
  int64_t s = 0;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(r0 + rows, n), m = r1 - r0;
    const at::Tensor b = block_rows(grad_out, perm, r0, r1, acc, false);
    const at::Tensor a = block_rows(input, perm, r0, r1, acc, false);
    const at::Tensor weight = weight_all.narrow(0, 0, m * o);
    const at::Tensor per = std::get<1>(at::convolution_backward(
        b.view({1, m * o, b.size(2), b.size(3)}), a.view({1, m * ci, a.size(2), a.size(3)}), weight,
        c10::nullopt, stride, padding, dilation, /*transposed=*/false, no_output_padding,
        /*groups=*/m, {false, true, false})).view({m, w_elems});
    // Segments in perm order; a segment may straddle blocks: its first block
    // writes the slot, later ones add (a fixed order: deterministic).
    for (int64_t r = r0; r < r1;) {
      while (offsets[s + 1] <= r) ++s;
      const int64_t e = std::min(offsets[s + 1], r1);
      at::Tensor slot = flat.select(0, s);
      const at::Tensor part = per.narrow(0, r - r0, e - r);
      if (r == offsets[s]) {
        at::sum_out(slot, part, 0);
      } else {
        slot.add_(part.sum(0));
      }
      r = e;
    }
  }
}

at::Tensor segment_conv2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                          const at::Tensor& ids, int64_t num_segments,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv2d_weight_grad_args(grad_out, input, ids, num_segments, kernel_size, stride, padding,
                                dilation);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t o = grad_out.size(1), ci = input.size(1);
  at::Tensor out = at::empty({num_segments, o, ci, kernel_size[0], kernel_size[1]},
                             input.options().dtype(acc));
  std::vector<int64_t> offsets;
  const at::Tensor perm = sorted_rows(ids, num_segments, "segment_conv2d_weight_grad", offsets);
  zero_empty_segments(out, offsets);
  // Only the weight's shape and dtype matter to the weight gradient.
  const at::Tensor weight = at::zeros({o, ci, kernel_size[0], kernel_size[1]},
                                      input.options().dtype(acc));
  const int64_t per_row = input.size(1) * input.size(2) * input.size(3) +
                          o * grad_out.size(2) * grad_out.size(3);
  const int64_t n = input.size(0);
  int64_t nonempty = 0;
  for (int64_t s = 0; s < num_segments; ++s) nonempty += offsets[s + 1] > offsets[s];
  if (n > 0 && ci >= kPerSampleMinChannels && n < kSmallSegmentRows * nonempty) {
    conv2d_weight_grad_per_sample(grad_out, input, perm, offsets, out, kernel_size, stride, padding,
                                  dilation, per_row, acc);
    return acc == input.scalar_type() ? out : out.to(input.scalar_type());
  }
  const int64_t rows = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(1, per_row));
  const std::vector<int64_t> no_output_padding{0, 0};
  for_each_row_block(out, grad_out, input, perm, offsets, rows, acc,
                     [&](at::Tensor& slot, const at::Tensor& b, const at::Tensor& a, bool first) {
                       // ATen's dense conv weight gradient of this block (oneDNN or
                       // im2col + GEMM per sample): it never unfolds more than the block.
                       const at::Tensor w = std::get<1>(at::convolution_backward(
                           b, a, weight, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
                           no_output_padding, /*groups=*/1, {false, true, false}));
                       if (first) {
                         slot.copy_(w);
                       } else {
                         slot.add_(w);
                       }
                     });
  return acc == input.scalar_type() ? out : out.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfair, CPU, m) {
  m.impl("segment_linear_weight_grad", &segment_linear_weight_grad_cpu);
  m.impl("segment_conv2d_weight_grad", &segment_conv2d_weight_grad_cpu);
}

}  // namespace fastfair
