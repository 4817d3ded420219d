// Input checks shared by the CPU and CUDA kernels. They run before any kernel
// so that bad input is a clear Python exception (ValueError / TypeError),
// never a crash, an overflowed size or uninitialised memory: callers of
// torch.ops.fastfair.* directly get the same checks as fastfair.ops.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <initializer_list>
#include <limits>

namespace fastfair {

inline void check_ids(const at::Tensor& ids, int64_t num_segments,
                      const char* op) {
  TORCH_CHECK_VALUE(ids.dim() == 1, op, ": ids must be 1-D, got shape ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              op, ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(num_segments > 0, op, ": num_segments must be positive, got ",
              num_segments);
}

// Every tensor argument of an op on one device (the dispatcher picks the
// kernel by the highest-priority device among them; a mix would let, e.g.,
// a CPU kernel read a meta tensor's missing data).
inline void check_same_device(const char* op, std::initializer_list<const at::Tensor*> ts,
                              std::initializer_list<const char*> names) {
  const at::Tensor* first = *ts.begin();
  auto name = names.begin();
  const char* first_name = *name;
  for (const at::Tensor* t : ts) {
    TORCH_CHECK_VALUE(t->device() == first->device(), op, ": ", first_name, " is on ",
                      first->device(), " but ", *name, " is on ", t->device(),
                      " (all tensors must be on one device)");
    ++name;
  }
}

// The output has num_segments * (product of inner) elements of elem_bytes;
// refuse sizes whose byte count overflows int64 with a message naming
// num_segments (ATen would say "Storage size calculation overflowed").
inline void check_output_size(int64_t num_segments, c10::IntArrayRef inner,
                              int64_t elem_bytes, const char* op) {
  int64_t bytes = elem_bytes;
  bool overflow = c10::mul_overflows(bytes, num_segments, &bytes);
  for (int64_t v : inner) overflow |= c10::mul_overflows(bytes, v, &bytes);
  TORCH_CHECK_VALUE(!overflow, op, ": num_segments = ", num_segments, " with rows of ", inner,
                    " elements gives an output of more than 2^63 bytes");
}

inline void check_rows(const at::Tensor& x, const at::Tensor& ids,
                       const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == ids.size(0), op, ": x has ", x.size(0),
              " rows but ids has ", ids.size(0), " entries");
  TORCH_CHECK_VALUE(x.device() == ids.device(), op, ": x is on ", x.device(),
              " but ids is on ", ids.device());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf ||
                  t == at::kBFloat16,
              op, ": x must be float32/float64/float16/bfloat16, got ", t);
}

// Output size of a convolution along one axis, in overflow-safe arithmetic:
// 0 when the (dilated) kernel does not fit the padded input or when any
// intermediate value would overflow int64 (such a geometry has no output).
// Arguments must already be checked: size >= 0, kernel, stride,
// dilation >= 1, padding >= 0.
inline int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride,
                             int64_t padding, int64_t dilation) {
  int64_t span = 0, padded = 0;
  if (c10::mul_overflows(dilation, kernel - 1, &span) ||
      c10::add_overflows(span, int64_t(1), &span))
    return 0;
  if (c10::mul_overflows(padding, int64_t(2), &padded) ||
      c10::add_overflows(padded, size, &padded))
    return 0;
  return padded >= span ? (padded - span) / stride + 1 : 0;
}

}  // namespace fastfair
