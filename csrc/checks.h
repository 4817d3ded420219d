// Input checks shared by the CPU and CUDA kernels. They run before any kernel
// so that bad input is a clear Python exception, never a crash.
#pragma once
#include <ATen/ATen.h>

namespace fastfair {

inline void check_ids(const at::Tensor& ids, int64_t num_segments,
                      const char* op) {
  TORCH_CHECK_VALUE(ids.dim() == 1, op, ": ids must be 1-D, got shape ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              op, ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(num_segments > 0, op, ": num_segments must be positive, got ",
              num_segments);
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

}  // namespace fastfair
