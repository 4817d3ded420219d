// CPU kernels for segment_sum / segment_mean / segment_count.
//
// Deterministic by construction: no atomics, and the work split depends only
// on the shapes (never on the thread count), so results are bitwise identical
// run to run and across OMP_NUM_THREADS.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace fastfair {
namespace {

template <typename index_t>
void check_range_cpu(const index_t* ids, int64_t n, int64_t num_segments,
                     const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(s >= 0 && s < num_segments, op, ": ids[", i, "] = ", s,
                " is outside [0, num_segments = ", num_segments, ")");
  }
}

// Rows in fixed chunks of this many; a chunk's partial sums are combined in
// chunk order. Used when D is too small to split the work by columns.
constexpr int64_t kRowChunk = 4096;
// Cap on the partial-sum buffer (elements) of the row-chunk strategy.
constexpr int64_t kMaxPartial = int64_t(1) << 24;
// Columns per task of the column strategy: 64 floats = four cache lines.
constexpr int64_t kColBlock = 64;
// Below this many column blocks the column split leaves cores idle.
constexpr int64_t kMinColBlocks = 4;

template <typename scalar_t, typename index_t>
void segment_sum_kernel(const at::Tensor& x, const index_t* ids,
                        int64_t num_segments, bool mean, const int64_t* counts,
                        at::Tensor& out_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t sr = x.stride(0), sc = x.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out_acc.data_ptr<acc_t>();
  const int64_t nchunks = (n + kRowChunk - 1) / kRowChunk;
  const int64_t ncolblocks = (d + kColBlock - 1) / kColBlock;

  // The row-chunk strategy pays nchunks * S * D for zeroing and combining
  // its buffers: worth it only while that stays below the N * D main pass.
  if (nchunks > 1 && ncolblocks < kMinColBlocks && nchunks * num_segments <= n &&
      nchunks * num_segments * d <= kMaxPartial) {
    // Few columns, many rows: each row chunk sums into its own buffer, then
    // the buffers are added in chunk order.
    std::vector<acc_t> partial(nchunks * num_segments * d, acc_t(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* p = partial.data() + c * num_segments * d;
        const int64_t r1 = std::min(n, (c + 1) * kRowChunk);
        for (int64_t i = c * kRowChunk; i < r1; ++i) {
          acc_t* dst = p + static_cast<int64_t>(ids[i]) * d;
          const scalar_t* src = xp + i * sr;
          for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<acc_t>(src[j * sc]);
        }
      }
    });
    at::parallel_for(0, num_segments * d, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        acc_t v = 0;
        for (int64_t c = 0; c < nchunks; ++c) v += partial[c * num_segments * d + e];
        op[e] = v;
      }
    });
  } else {
    // Column blocks in parallel: every task streams all rows for its
    // columns, so each output element has exactly one writer.
    at::parallel_for(0, ncolblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kColBlock, j1 = std::min(d, j0 + kColBlock);
        for (int64_t i = 0; i < n; ++i) {
          acc_t* dst = op + static_cast<int64_t>(ids[i]) * d;
          const scalar_t* src = xp + i * sr;
          for (int64_t j = j0; j < j1; ++j) dst[j] += static_cast<acc_t>(src[j * sc]);
        }
      }
    });
  }
  if (mean) {
    at::parallel_for(0, num_segments, 256, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        if (counts[s] > 1) {
          const acc_t inv = acc_t(1) / static_cast<acc_t>(counts[s]);
          for (int64_t j = 0; j < d; ++j) op[s * d + j] *= inv;
        }
      }
    });
  }
}

template <typename index_t>
void count_kernel(const index_t* ids, int64_t n, int64_t* counts) {
  for (int64_t i = 0; i < n; ++i) counts[static_cast<int64_t>(ids[i])] += 1;
}

at::Tensor segment_count_cpu(const at::Tensor& ids_in, int64_t num_segments) {
  check_ids(ids_in, num_segments, "segment_count");
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor counts = at::zeros({num_segments}, ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_count_cpu", [&] {
    check_range_cpu(ids.const_data_ptr<index_t>(), ids.size(0), num_segments,
                    "segment_count");
    count_kernel(ids.const_data_ptr<index_t>(), ids.size(0),
                 counts.data_ptr<int64_t>());
  });
  return counts;
}

at::Tensor segment_reduce_cpu(const at::Tensor& x, const at::Tensor& ids_in,
                              int64_t num_segments, bool mean,
                              const char* name) {
  check_ids(ids_in, num_segments, name);
  check_rows(x, ids_in, name);
  const at::Tensor ids = ids_in.contiguous();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor out_acc =
      at::zeros({num_segments, x.size(1)}, x.options().dtype(acc_type));
  at::Tensor counts;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_reduce_cpu_ids", [&] {
    const index_t* idp = ids.const_data_ptr<index_t>();
    check_range_cpu(idp, ids.size(0), num_segments, name);
    if (mean) {
      counts = at::zeros({num_segments}, ids.options().dtype(at::kLong));
      count_kernel(idp, ids.size(0), counts.data_ptr<int64_t>());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cpu", [&] {
          segment_sum_kernel<scalar_t, index_t>(
              x, idp, num_segments, mean,
              mean ? counts.const_data_ptr<int64_t>() : nullptr, out_acc);
        });
  });
  return acc_type == x.scalar_type() ? out_acc : out_acc.to(x.scalar_type());
}

at::Tensor segment_sum_cpu(const at::Tensor& x, const at::Tensor& ids,
                           int64_t num_segments) {
  return segment_reduce_cpu(x, ids, num_segments, false, "segment_sum");
}

at::Tensor segment_mean_cpu(const at::Tensor& x, const at::Tensor& ids,
                            int64_t num_segments) {
  return segment_reduce_cpu(x, ids, num_segments, true, "segment_mean");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfair, CPU, m) {
  m.impl("segment_sum", &segment_sum_cpu);
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_count", &segment_count_cpu);
}

}  // namespace fastfair
