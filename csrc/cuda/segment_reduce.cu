// CUDA kernels for segment_sum / segment_mean / segment_count, and the
// device-side id checks and row sort of id_check.cuh.
//
// segment_sum / segment_mean: a tree of chunked reductions over the rows in
// segment order.
//   0. make_keys_kernel maps each id to its segment (num_segments for an
//      out-of-range id, flagged in the device's error buffer), a stable
//      radix sort of those keys gives the visiting order (perm), and
//      searchsorted gives every segment's [start, end) in it; no value is
//      read back to the host, and out-of-range rows sort past every segment.
//   1. level 0: block (chunk c of R0 sorted rows, column tile) walks its rows
//      keeping one running sum per column (each thread owns 16 bytes of
//      columns: one 128-bit load per row where the rows are 16-byte aligned,
//      scalar loads otherwise); a segment wholly inside the chunk is written
//      straight to the output, a segment cut by a chunk boundary leaves its
//      partial in slot 2c (it began before c) or 2c + 1 (it goes on after c;
//      a chunk wholly inside one segment writes its sum to 2c and zero to
//      2c + 1).
//   2. level k >= 1: the slots of level k - 1 are rows of the same problem,
//      in segment order, where segment s occupies a contiguous slot range
//      computed from its level-0 range (level_range). Chunks of R1 slots are
//      reduced the same way, until one chunk is left. A segment spanning
//      thousands of chunks is combined by a tree of blocks, never by one.
// No atomics on floating values; the shape of the tree depends only on
// (N, D, dtype), so results are bitwise reproducible run to run and on any
// GPU, and the cost does not depend on how many segments there are.
//
// segment_count: for up to kHistMaxSegments segments, blocks count a fixed
// row range each in a shared-memory histogram (shared integer atomics, exact)
// and a second kernel adds the blocks' counts in block order; beyond that,
// the counts are the differences of the sorted offsets. No per-row global
// atomics either way.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h: the
// latter pulls in cuSPARSE/cuBLAS headers that a bare nvcc install lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "id_check.cuh"

namespace fastfair {

// ---------------------------------------------------------------------------
// Id errors (id_check.cuh).

namespace {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
constexpr int kCheckThreads = 256;
// Grid-stride loops over ids use at most this many blocks.
constexpr int64_t kMaxCheckBlocks = 1024;

int64_t check_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min(kMaxCheckBlocks, (n + kCheckThreads - 1) / kCheckThreads));
}

__device__ __forceinline__ bool error_pending(const int64_t* flag) {
  return *reinterpret_cast<const volatile int64_t*>(flag + id_error::kPending) != 0;
}

__device__ __forceinline__ void record_bad_row(int64_t* flag, int64_t row) {
  // Integer atomicMin: the lowest bad row wins, whatever the thread order.
  atomicMin(reinterpret_cast<unsigned long long*>(flag + id_error::kRow),
            static_cast<unsigned long long>(row));
}

template <typename index_t>
__global__ void check_ids_kernel(const index_t* __restrict__ ids, int64_t n,
                                 int64_t num_segments, int64_t* flag) {
  // An earlier call's error is kept until it is taken: the first one wins.
  if (error_pending(flag)) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = static_cast<int64_t>(ids[i]);
    if (s < 0 || s >= num_segments) record_bad_row(flag, i);
  }
}

// One thread: completes a recorded error with its value, the call's
// num_segments and op, and marks it pending.
template <typename index_t>
__global__ void finalize_id_error_kernel(const index_t* __restrict__ ids, int64_t num_segments,
                                         int64_t op, int64_t* flag) {
  if (flag[id_error::kPending] != 0) return;
  const int64_t row = flag[id_error::kRow];
  if (row == kNoRow) return;
  flag[id_error::kValue] = static_cast<int64_t>(ids[row]);
  flag[id_error::kSegments] = num_segments;
  flag[id_error::kOp] = op;
  flag[id_error::kPending] = 1;
}

void finalize_id_error(const at::Tensor& ids, int64_t num_segments, IdOp op, int64_t* flag,
                       cudaStream_t stream) {
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastfair_finalize_id_error", [&] {
    finalize_id_error_kernel<index_t><<<1, 1, 0, stream>>>(
        ids.const_data_ptr<index_t>(), num_segments, static_cast<int64_t>(op), flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor fresh_error_buffer_cpu() {
  at::Tensor t = at::zeros({id_error::kSize}, at::TensorOptions().dtype(at::kLong));
  t.data_ptr<int64_t>()[id_error::kRow] = kNoRow;
  return t;
}

template <typename index_t, typename key_t>
__global__ void make_keys_kernel(const index_t* __restrict__ ids, int64_t n, int64_t num_segments,
                                 key_t* __restrict__ keys, int64_t* flag) {
  const bool record = !error_pending(flag);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = static_cast<int64_t>(ids[i]);
    const bool bad = s < 0 || s >= num_segments;
    keys[i] = static_cast<key_t>(bad ? num_segments : s);
    if (bad && record) record_bad_row(flag, i);
  }
}

}  // namespace

namespace {
// The device's flag tensor, allocated on first use. Never freed: a static
// tensor destroyed after the CUDA context at exit would fail to free.
at::Tensor& id_error_tensor(c10::Device device) {
  TORCH_CHECK(device.is_cuda() && device.has_index(), "fastfair id errors: not a CUDA device: ", device);
  static std::mutex mutex;
  static std::vector<at::Tensor*> buffers;
  std::lock_guard<std::mutex> lock(mutex);
  const auto index = static_cast<size_t>(device.index());
  if (buffers.size() <= index) buffers.resize(index + 1, nullptr);
  if (buffers[index] == nullptr) {
    c10::cuda::CUDAGuard guard(device);
    buffers[index] = new at::Tensor(fresh_error_buffer_cpu().to(device));
  }
  return *buffers[index];
}

c10::Device with_index(c10::Device device) {
  return device.has_index() ? device
                            : c10::Device(c10::DeviceType::CUDA, c10::cuda::current_device());
}
}  // namespace

int64_t* id_error_buffer(c10::Device device) {
  return id_error_tensor(with_index(device)).data_ptr<int64_t>();
}

void check_ids_on_device(const at::Tensor& ids_in, int64_t num_segments, IdOp op) {
  TORCH_CHECK(ids_in.is_cuda(), "check_ids_on_device: ids must be on a CUDA device");
  c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel();
  if (n == 0) return;
  int64_t* flag = id_error_buffer(ids.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastfair_check_ids", [&] {
    check_ids_kernel<index_t><<<check_blocks(n), kCheckThreads, 0, stream>>>(
        ids.const_data_ptr<index_t>(), n, num_segments, flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_id_error(ids, num_segments, op, flag, stream);
}

SortedIds sort_segment_ids(const at::Tensor& ids_in, int64_t num_segments, IdOp op) {
  TORCH_CHECK(ids_in.is_cuda(), "sort_segment_ids: ids must be on a CUDA device");
  c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel();
  // num_segments itself is the key of bad rows, so it must fit.
  const auto key_type =
      num_segments < std::numeric_limits<int32_t>::max() ? at::kInt : at::kLong;
  at::Tensor keys = at::empty({n}, ids.options().dtype(key_type));
  int64_t* flag = id_error_buffer(ids.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastfair_make_keys", [&] {
      if (key_type == at::kInt) {
        make_keys_kernel<index_t, int32_t><<<check_blocks(n), kCheckThreads, 0, stream>>>(
            ids.const_data_ptr<index_t>(), n, num_segments, keys.data_ptr<int32_t>(), flag);
      } else {
        make_keys_kernel<index_t, int64_t><<<check_blocks(n), kCheckThreads, 0, stream>>>(
            ids.const_data_ptr<index_t>(), n, num_segments, keys.data_ptr<int64_t>(), flag);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finalize_id_error(ids, num_segments, op, flag, stream);
  }
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  SortedIds out;
  out.keys = std::get<0>(sorted);
  out.perm = std::get<1>(sorted);
  const at::Tensor bounds = at::arange(num_segments + 1, ids.options().dtype(key_type));
  out.offsets = at::searchsorted(out.keys, bounds);  // int64
  return out;
}

std::vector<int64_t> take_id_error_cuda(c10::Device device_in) {
  const c10::Device device = with_index(device_in);
  c10::cuda::CUDAGuard guard(device);
  at::Tensor& buf = id_error_tensor(device);
  // The copy waits for the current stream's kernels that may record.
  const at::Tensor host = buf.to(at::kCPU);
  const int64_t* h = host.const_data_ptr<int64_t>();
  if (h[id_error::kPending] == 0) return {-1, 0, 0, 0};
  std::vector<int64_t> out = {h[id_error::kRow], h[id_error::kValue], h[id_error::kSegments],
                              h[id_error::kOp]};
  buf.copy_(fresh_error_buffer_cpu());
  return out;
}

// ---------------------------------------------------------------------------
// segment_sum / segment_mean / segment_count.

namespace {

// Sorted rows per level-0 chunk: at most kMaxChunkRows, fewer for small
// inputs so that the grid has about kTargetBlocks blocks (N = 2560, D = 128:
// 160 chunks of 16 rows rather than 10 of 256), at least kMinChunkRows so
// that each block has rows enough to pipeline. A function of (N, D, dtype)
// only: the combine tree, and so the bits, are the same on every GPU.
constexpr int64_t kMaxChunkRows = 256;
constexpr int64_t kMinChunkRows = 16;
constexpr int64_t kTargetBlocks = 512;
// Slots per chunk at the combine levels (each slot is a partial row).
constexpr int64_t kCombineRows = 64;
// Rows loaded ahead per thread (independent loads in flight).
constexpr int kUnroll = 4;
constexpr int kMaxThreads = 128;
// segment_count's shared-memory histogram (int32 counts, 32 KB).
constexpr int64_t kHistMaxSegments = 8192;
constexpr int kHistThreads = 256;
constexpr int64_t kHistMinRowsPerBlock = 4096;
constexpr int64_t kHistMaxBlocks = 512;

// VEC elements of T, aligned so that one access is one 16-byte (or 32-byte:
// two 16-byte) instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Slot range of segment s at combine level k, from its sorted-row range
// [a, b) at level 0 (see the header comment): a segment cut at level j
// across chunks ca < cb occupies slots [2 ca + 1, 2 cb + 1) at level j + 1.
__device__ __forceinline__ void level_range(int64_t& a, int64_t& b, int level, int64_t r0,
                                            int64_t r1) {
  for (int j = 0; j < level; ++j) {
    const int64_t r = j == 0 ? r0 : r1;
    const int64_t ca = a / r, cb = (b - 1) / r;
    a = 2 * ca + 1;
    b = 2 * cb + 1;
  }
}

// One level of the tree. FIRST: rows are x[perm[r]] with keys in sorted_keys
// (num_segments for bad rows, which sort last and are skipped); otherwise
// rows are the previous level's partial slots part_in[r] (row stride pd)
// with keys keys_in[r] (-1 for an unused slot, never inside a segment's
// range). Each thread owns VEC columns starting at col0.
template <typename scalar_t, typename acc_t, typename key_t, int VEC, bool FIRST>
__global__ void __launch_bounds__(kMaxThreads) segment_level_kernel(
    const scalar_t* __restrict__ x, int64_t stride_row, int64_t stride_col, bool x_vec,
    const int64_t* __restrict__ perm, const key_t* __restrict__ sorted_keys,
    const acc_t* __restrict__ part_in, const int64_t* __restrict__ keys_in,
    const int64_t* __restrict__ offsets, int64_t rows, int64_t d, int64_t pd,
    int64_t num_segments, int level, int64_t r0, int64_t r1, bool mean, bool out_vec,
    scalar_t* __restrict__ out, acc_t* __restrict__ part_out, int64_t* __restrict__ keys_out) {
  const int64_t chunk = blockIdx.x;
  const int64_t rpc = level == 0 ? r0 : r1;
  const int64_t begin = chunk * rpc;
  const int64_t end = min(rows, begin + rpc);
  const bool key_writer = threadIdx.x == 0 && blockIdx.y == 0;
  if (key_writer && keys_out != nullptr) {
    keys_out[2 * chunk] = -1;
    keys_out[2 * chunk + 1] = -1;
  }
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col0 >= d) return;
  const int ncols = d - col0 < VEC ? static_cast<int>(d - col0) : VEC;

  acc_t acc[VEC];
  auto flush = [&](int64_t seg) {
    int64_t a = offsets[seg], b = offsets[seg + 1];
    const int64_t count = b - a;
    level_range(a, b, level, r0, r1);
    const bool cut_before = a < begin, cut_after = b > end;
    if (!cut_before && !cut_after) {
      const acc_t scale = mean && count > 1 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
      scalar_t* o = out + seg * d + col0;
      if (out_vec && ncols == VEC) {
        Pack<scalar_t, VEC> p;
#pragma unroll
        for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(acc[j] * scale);
        *reinterpret_cast<Pack<scalar_t, VEC>*>(o) = p;
      } else {
        for (int j = 0; j < ncols; ++j) o[j] = static_cast<scalar_t>(acc[j] * scale);
      }
      return;
    }
    // Partial slots hold whole VEC groups (pd is a multiple of VEC).
    if (cut_before) {
      Pack<acc_t, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = acc[j];
      *reinterpret_cast<Pack<acc_t, VEC>*>(part_out + (2 * chunk) * pd + col0) = p;
      if (key_writer) keys_out[2 * chunk] = seg;
    }
    if (cut_after) {
      Pack<acc_t, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = cut_before ? acc_t(0) : acc[j];
      *reinterpret_cast<Pack<acc_t, VEC>*>(part_out + (2 * chunk + 1) * pd + col0) = p;
      if (key_writer) keys_out[2 * chunk + 1] = seg;
    }
  };

  int64_t cur = -1;
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  for (int64_t r = begin; r < end; r += kUnroll) {
    int64_t seg[kUnroll];
    acc_t v[kUnroll][VEC];
    // Keys (and rows) of kUnroll rows first, then all their loads, so that
    // the loads are in flight together.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + u;
      int64_t k = -1;
      if (rr < end) {
        k = FIRST ? static_cast<int64_t>(sorted_keys[rr]) : keys_in[rr];
        if (FIRST && k >= num_segments) k = -1;
      }
      seg[u] = k;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (seg[u] < 0) continue;
      if constexpr (FIRST) {
        const scalar_t* src = x + perm[r + u] * stride_row + col0 * stride_col;
        if (x_vec && ncols == VEC) {
          const Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[u][j] = static_cast<acc_t>(p.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            v[u][j] = j < ncols ? static_cast<acc_t>(src[j * stride_col]) : acc_t(0);
        }
      } else {
        const Pack<acc_t, VEC> p =
            *reinterpret_cast<const Pack<acc_t, VEC>*>(part_in + (r + u) * pd + col0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[u][j] = p.v[j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (seg[u] < 0) continue;
      if (seg[u] != cur) {
        if (cur >= 0) flush(cur);
        cur = seg[u];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += v[u][j];
    }
  }
  if (cur >= 0) flush(cur);
}

template <typename index_t>
__global__ void histogram_kernel(const index_t* __restrict__ ids, int64_t n, int64_t num_segments,
                                 int64_t rows_per_block, int32_t* __restrict__ partial,
                                 int64_t* flag) {
  extern __shared__ int32_t hist[];
  for (int64_t s = threadIdx.x; s < num_segments; s += blockDim.x) hist[s] = 0;
  __syncthreads();
  const bool record = !error_pending(flag);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = min(n, begin + rows_per_block);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t s = static_cast<int64_t>(ids[i]);
    if (s >= 0 && s < num_segments) {
      atomicAdd(hist + s, 1);  // shared memory, integer: exact in any order
    } else if (record) {
      record_bad_row(flag, i);
    }
  }
  __syncthreads();
  int32_t* mine = partial + static_cast<int64_t>(blockIdx.x) * num_segments;
  for (int64_t s = threadIdx.x; s < num_segments; s += blockDim.x) mine[s] = hist[s];
}

__global__ void histogram_combine_kernel(const int32_t* __restrict__ partial, int64_t blocks,
                                         int64_t num_segments, int64_t* __restrict__ counts) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_segments) return;
  int64_t c = 0;
  for (int64_t b = 0; b < blocks; ++b) c += partial[b * num_segments + s];
  counts[s] = c;
}

__global__ void offsets_diff_kernel(const int64_t* __restrict__ offsets, int64_t num_segments,
                                    int64_t* __restrict__ counts) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < num_segments) counts[s] = offsets[s + 1] - offsets[s];
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

at::Tensor segment_count_cuda(const at::Tensor& ids_in, int64_t num_segments) {
  check_ids(ids_in, num_segments, "segment_count");
  check_output_size(num_segments, {}, sizeof(int64_t), "segment_count");
  c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.size(0);
  at::Tensor counts = at::zeros({num_segments}, ids.options().dtype(at::kLong));
  if (n == 0) return counts;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (num_segments <= kHistMaxSegments) {
    // Fixed row ranges per block (a function of N only).
    const int64_t rows_per_block =
        std::max(kHistMinRowsPerBlock, (n + kHistMaxBlocks - 1) / kHistMaxBlocks);
    const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
    at::Tensor partial = at::empty({blocks, num_segments}, ids.options().dtype(at::kInt));
    int64_t* flag = id_error_buffer(ids.device());
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_count_cuda", [&] {
      histogram_kernel<index_t><<<static_cast<unsigned>(blocks), kHistThreads,
                                  num_segments * sizeof(int32_t), stream>>>(
          ids.const_data_ptr<index_t>(), n, num_segments, rows_per_block,
          partial.data_ptr<int32_t>(), flag);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finalize_id_error(ids, num_segments, IdOp::kSegmentCount, flag, stream);
    histogram_combine_kernel<<<blocks_for(num_segments, 256), 256, 0, stream>>>(
        partial.const_data_ptr<int32_t>(), blocks, num_segments, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return counts;
  }
  const SortedIds sorted = sort_segment_ids(ids, num_segments, IdOp::kSegmentCount);
  offsets_diff_kernel<<<blocks_for(num_segments, 256), 256, 0, stream>>>(
      sorted.offsets.const_data_ptr<int64_t>(), num_segments, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, typename key_t>
void launch_segment_tree(const at::Tensor& x, const SortedIds& sorted, int64_t num_segments,
                         bool mean, at::Tensor& out, const char* name) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t groups = (d + VEC - 1) / VEC;  // VEC-column groups per row
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (groups + 31) / 32 * 32));
  const int64_t tiles = (groups + threads - 1) / threads;
  TORCH_CHECK_VALUE(tiles <= 65535, name, ": D = ", d, " is too large (max ",
                    int64_t(65535) * kMaxThreads * VEC, ")");
  const int64_t r0 = std::clamp<int64_t>((n * tiles + kTargetBlocks - 1) / kTargetBlocks,
                                         kMinChunkRows, kMaxChunkRows);
  const int64_t r1 = kCombineRows;
  const int64_t pd = groups * VEC;  // partial row stride: whole, aligned VEC groups
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const bool x_vec = x.stride(1) == 1 && aligned16(xp) &&
                     (x.stride(0) * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
  const bool out_vec = d % VEC == 0;  // out is contiguous and freshly allocated (aligned)

  // Levels: rows at level k and their chunk counts.
  std::vector<int64_t> level_rows = {n};
  while (true) {
    const int64_t rows = level_rows.back();
    const int64_t rpc = level_rows.size() == 1 ? r0 : r1;
    const int64_t chunks = (rows + rpc - 1) / rpc;
    if (chunks <= 1) break;
    level_rows.push_back(2 * chunks);
  }
  const auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const auto key_opts = x.options().dtype(at::kLong);
  at::Tensor part[2], keys[2];
  if (level_rows.size() > 1) {
    part[0] = at::empty({level_rows[1], pd}, acc_opts);
    keys[0] = at::empty({level_rows[1]}, key_opts);
  }
  if (level_rows.size() > 2) {
    part[1] = at::empty({level_rows[2], pd}, acc_opts);
    keys[1] = at::empty({level_rows[2]}, key_opts);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* offsets = sorted.offsets.const_data_ptr<int64_t>();
  for (size_t k = 0; k < level_rows.size(); ++k) {
    const int64_t rows = level_rows[k];
    const int64_t rpc = k == 0 ? r0 : r1;
    const dim3 grid(static_cast<unsigned>((rows + rpc - 1) / rpc), static_cast<unsigned>(tiles));
    const bool last = k + 1 == level_rows.size();
    // Level k reads buffer (k - 1) % 2 and writes buffer k % 2: sized for
    // levels 1 and 2, enough for the later levels, which only shrink.
    acc_t* pout = last ? nullptr : part[k % 2].data_ptr<acc_t>();
    int64_t* kout = last ? nullptr : keys[k % 2].data_ptr<int64_t>();
    if (k == 0) {
      segment_level_kernel<scalar_t, acc_t, key_t, VEC, true><<<grid, threads, 0, stream>>>(
          xp, x.stride(0), x.stride(1), x_vec, sorted.perm.const_data_ptr<int64_t>(),
          sorted.keys.const_data_ptr<key_t>(), nullptr, nullptr, offsets, rows, d, pd,
          num_segments, 0, r0, r1, mean, out_vec, out.data_ptr<scalar_t>(), pout, kout);
    } else {
      const int in = static_cast<int>((k - 1) % 2);
      segment_level_kernel<scalar_t, acc_t, key_t, VEC, false><<<grid, threads, 0, stream>>>(
          nullptr, 0, 0, false, nullptr, nullptr, part[in].const_data_ptr<acc_t>(),
          keys[in].const_data_ptr<int64_t>(), offsets, rows, d, pd, num_segments,
          static_cast<int>(k), r0, r1, mean, out_vec, out.data_ptr<scalar_t>(), pout, kout);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor segment_reduce_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t num_segments,
                               bool mean, const char* name) {
  check_ids(ids, num_segments, name);
  check_rows(x, ids, name);
  check_output_size(num_segments, {x.size(1)}, x.element_size(), name);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  const IdOp op = mean ? IdOp::kSegmentMean : IdOp::kSegmentSum;
  at::Tensor out = at::zeros({num_segments, d}, x.options());
  if (n == 0) return out;
  if (d == 0) {
    check_ids_on_device(ids, num_segments, op);
    return out;
  }
  const SortedIds sorted = sort_segment_ids(ids, num_segments, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cuda", [&] {
    if (sorted.keys.scalar_type() == at::kInt)
      launch_segment_tree<scalar_t, int32_t>(x, sorted, num_segments, mean, out, name);
    else
      launch_segment_tree<scalar_t, int64_t>(x, sorted, num_segments, mean, out, name);
  });
  return out;
}

at::Tensor segment_sum_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t num_segments) {
  return segment_reduce_cuda(x, ids, num_segments, false, "segment_sum");
}

at::Tensor segment_mean_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t num_segments) {
  return segment_reduce_cuda(x, ids, num_segments, true, "segment_mean");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfair, CUDA, m) {
  m.impl("segment_sum", &segment_sum_cuda);
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_count", &segment_count_cuda);
}

}  // namespace fastfair
