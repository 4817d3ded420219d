// CUDA kernels for segment_sum / segment_mean / segment_count.
//
// Two-phase chunked reduction over rows visited in segment order:
//   0. a stable sort of ids gives the visiting order (perm) and
//      searchsorted gives every segment's [start, end) in that order; no
//      value is read back to the host;
//   1. block (chunk c, feature tile) walks rows [c*R, (c+1)*R) keeping one
//      running sum per feature; a segment that lies wholly inside the chunk is
//      written straight to the output, a segment cut by a chunk boundary
//      leaves its partial in head[c] (it began before c) or tail[c] (it goes
//      on after c);
//   2. the chunk where a cut segment ends adds tail[first chunk] and head[...]
//      in chunk order.
// No atomics on floating values and a fixed combine order, so results are
// bitwise reproducible, and the cost does not depend on how many segments
// there are (unlike one-thread-per-output or atomic scatter schemes).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h: the
// latter pulls in cuSPARSE/cuBLAS headers that a bare nvcc install lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace fastfair {
namespace {

constexpr int kRowsPerChunk = 256;
constexpr int kTile = 128;

template <typename scalar_t, typename index_t, typename acc_t>
__global__ void segment_chunk_kernel(
    const scalar_t* __restrict__ x, int64_t stride_row, int64_t stride_col,
    const index_t* __restrict__ sorted_ids, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ offsets, int64_t n, int64_t d,
    int64_t num_segments, bool mean, scalar_t* __restrict__ out,
    acc_t* __restrict__ head, acc_t* __restrict__ tail) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  if (col >= d) return;
  const int64_t begin = chunk * kRowsPerChunk;
  const int64_t end = min(n, begin + kRowsPerChunk);

  auto flush = [&](int64_t seg, acc_t acc) {
    const int64_t s0 = offsets[seg], s1 = offsets[seg + 1];
    const bool cut_before = s0 < begin, cut_after = s1 > end;
    if (!cut_before && !cut_after) {
      if (mean) acc /= static_cast<acc_t>(s1 - s0);
      out[seg * d + col] = static_cast<scalar_t>(acc);
      return;
    }
    if (cut_before) head[chunk * d + col] = acc;
    if (cut_after) tail[chunk * d + col] = acc;
  };

  int64_t cur = -1;
  acc_t acc = 0;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t seg = static_cast<int64_t>(sorted_ids[r]);
    // Out-of-range ids sort to the two ends and are skipped: the op's
    // contract rejects them before launch when validation is on.
    if (seg < 0 || seg >= num_segments) continue;
    if (seg != cur) {
      if (cur >= 0) flush(cur, acc);
      cur = seg;
      acc = 0;
    }
    acc += static_cast<acc_t>(x[perm[r] * stride_row + col * stride_col]);
  }
  if (cur >= 0) flush(cur, acc);
}

template <typename scalar_t, typename index_t, typename acc_t>
__global__ void segment_combine_kernel(
    const index_t* __restrict__ sorted_ids, const int64_t* __restrict__ offsets,
    int64_t n, int64_t d, int64_t num_segments, bool mean,
    const acc_t* __restrict__ head, const acc_t* __restrict__ tail,
    scalar_t* __restrict__ out) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  if (col >= d) return;
  const int64_t begin = chunk * kRowsPerChunk;
  // Only the chunk holding the last row of a cut segment combines it, and a
  // cut segment that ends in this chunk must be the one its first row holds.
  int64_t seg = -1;
  for (int64_t r = begin; r < min(n, begin + kRowsPerChunk); ++r) {
    const int64_t s = static_cast<int64_t>(sorted_ids[r]);
    if (s >= 0 && s < num_segments) {
      seg = s;
      break;
    }
  }
  if (seg < 0) return;
  const int64_t s0 = offsets[seg], s1 = offsets[seg + 1];
  if (s0 >= begin) return;                      // not cut before this chunk
  if ((s1 - 1) / kRowsPerChunk != chunk) return;  // ends in a later chunk
  const int64_t first = s0 / kRowsPerChunk;
  acc_t acc = tail[first * d + col];
  for (int64_t c = first + 1; c <= chunk; ++c) acc += head[c * d + col];
  if (mean) acc /= static_cast<acc_t>(s1 - s0);
  out[seg * d + col] = static_cast<scalar_t>(acc);
}

template <typename index_t>
__global__ void count_kernel(const index_t* __restrict__ ids, int64_t n,
                             int64_t num_segments,
                             unsigned long long* __restrict__ counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t s = static_cast<int64_t>(ids[i]);
  // Integer atomics commute exactly, so counting stays deterministic.
  if (s >= 0 && s < num_segments) atomicAdd(counts + s, 1ULL);
}

at::Tensor segment_count_cuda(const at::Tensor& ids_in, int64_t num_segments) {
  check_ids(ids_in, num_segments, "segment_count");
  c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor counts = at::zeros({num_segments}, ids.options().dtype(at::kLong));
  const int64_t n = ids.size(0);
  if (n == 0 || num_segments == 0) return counts;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_count_cuda", [&] {
    count_kernel<index_t><<<blocks, threads, 0, stream>>>(
        ids.const_data_ptr<index_t>(), n, num_segments,
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

at::Tensor segment_reduce_cuda(const at::Tensor& x, const at::Tensor& ids_in,
                               int64_t num_segments, bool mean,
                               const char* name) {
  check_ids(ids_in, num_segments, name);
  check_rows(x, ids_in, name);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::zeros({num_segments, d}, x.options());
  if (n == 0 || d == 0 || num_segments == 0) return out;

  const at::Tensor ids = ids_in.contiguous();
  auto sorted = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_ids = std::get<0>(sorted);
  const at::Tensor perm = std::get<1>(sorted);
  const at::Tensor bounds =
      at::arange(num_segments + 1, ids.options().dtype(at::kLong)).to(ids.scalar_type());
  const at::Tensor offsets = at::searchsorted(sorted_ids, bounds).to(at::kLong);

  const int64_t chunks = (n + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t tiles = (d + kTile - 1) / kTile;
  TORCH_CHECK_VALUE(tiles <= 65535, name, ": D = ", d, " is too large (max ",
                    65535 * kTile, ")");
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(tiles));
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor head = at::empty({chunks, d}, x.options().dtype(acc_type));
  at::Tensor tail = at::empty({chunks, d}, x.options().dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_reduce_cuda_ids", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          segment_chunk_kernel<scalar_t, index_t, acc_t>
              <<<grid, kTile, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                  sorted_ids.const_data_ptr<index_t>(),
                  perm.const_data_ptr<int64_t>(),
                  offsets.const_data_ptr<int64_t>(), n, d, num_segments, mean,
                  out.data_ptr<scalar_t>(), head.data_ptr<acc_t>(),
                  tail.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (chunks > 1) {
            segment_combine_kernel<scalar_t, index_t, acc_t>
                <<<grid, kTile, 0, stream>>>(
                    sorted_ids.const_data_ptr<index_t>(),
                    offsets.const_data_ptr<int64_t>(), n, d, num_segments,
                    mean, head.const_data_ptr<acc_t>(),
                    tail.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
  });
  return out;
}

at::Tensor segment_sum_cuda(const at::Tensor& x, const at::Tensor& ids,
                            int64_t num_segments) {
  return segment_reduce_cuda(x, ids, num_segments, false, "segment_sum");
}

at::Tensor segment_mean_cuda(const at::Tensor& x, const at::Tensor& ids,
                             int64_t num_segments) {
  return segment_reduce_cuda(x, ids, num_segments, true, "segment_mean");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfair, CUDA, m) {
  m.impl("segment_sum", &segment_sum_cuda);
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_count", &segment_count_cuda);
}

}  // namespace fastfair
