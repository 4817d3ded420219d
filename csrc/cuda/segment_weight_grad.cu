// CUDA kernels for the segmented weight gradients of one-pass per-group DC
// (docs/architecture.md, op 3):
//   segment_linear_weight_grad(B [N, O], A [N, K], ids, S)  -> [S, O, K]
//   segment_conv2d_weight_grad(B [N, O, H', W'], A [N, I, H, W], ids, S, ...)
//                                                       -> [S, O, I*kh*kw]
// out[s][o][k] = sum over rows i of segment s and output positions p of
//                B[i, o, p] * col(A_i)[k, p]
// i.e. a GEMM per segment whose reduction axis runs over (row, position). For
// Linear there is one position (col(A_i)[k, 0] = A[i, k]); for Conv2d col is
// the im2col of sample i, computed on the fly as the tiles are loaded: the
// unfolded input is never stored.
//
// Plan (no value is read back to the host):
//   0. a stable sort of the ids gives the rows in segment order (perm) and
//      searchsorted gives every segment's [start, end);
//   1. one block per (64 x 64 output tile, segment, split z): the segment's
//      reduction range is cut into Z equal parts on the device (Z depends
//      only on the shapes) so that small segment counts still fill the GPU;
//      each block stages 16 reduction steps of B and col(A) in shared memory
//      and accumulates a 4 x 4 register tile per thread in float32 (float64
//      for double);
//   2. when Z > 1 the partials are added in z order by a second kernel.
// No atomics and a fixed reduction order: bitwise reproducible.
//
// Written to be simple and obviously correct; registered as
// fastfair::*_weight_grad_simt. The ops themselves run a vendor grouped GEMM
// on tensor cores (fastfair/wgrad.py); this kernel stays for the measured
// comparison (fastfair/bench/wgrad.py) and for float64, which the grouped
// GEMM refuses.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h: the
// latter pulls in cuSPARSE/cuBLAS headers that a bare nvcc install lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"

namespace fastfair {

// Defined in csrc/cpu/segment_weight_grad.cpp (the same checks on every device).
void check_linear_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& ids, int64_t num_segments);
void check_conv2d_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& ids, int64_t num_segments,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation);

namespace {

constexpr int kTile = 64;      // output tile: kTile (O) x kTile (K)
constexpr int kRed = 16;       // reduction steps staged per round
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMicro = kTile / 16;
// Splits of the reduction axis aim at this many blocks in all...
constexpr int64_t kTargetBlocks = 2048;
// ...with at least this many reduction steps per split on average...
constexpr int64_t kMinStepsPerSplit = 512;
constexpr int64_t kMaxSplits = 64;
// ...and at most this many bytes of partial sums.
constexpr int64_t kMaxPartialBytes = int64_t(1) << 28;

// Linear: B [N, O], A [N, K], one position per row.
template <typename scalar_t, typename acc_t>
struct LinearLoader {
  const scalar_t* b;
  const scalar_t* a;
  int64_t o_dim, k_dim;
  __device__ acc_t load_b(int64_t row, int64_t o, int64_t /*p*/) const {
    return static_cast<acc_t>(b[row * o_dim + o]);
  }
  __device__ acc_t load_a(int64_t row, int64_t k, int64_t /*p*/) const {
    return static_cast<acc_t>(a[row * k_dim + k]);
  }
};

// Conv2d: B [N, O, OH, OW] (positions p = y * OW + x), A [N, C, H, W];
// column k = (c, u, v) of the im2col at position p reads
// A[row, c, y*sh - ph + u*dh, x*sw - pw + v*dw], zero outside the image.
template <typename scalar_t, typename acc_t>
struct ConvLoader {
  const scalar_t* b;
  const scalar_t* a;
  int64_t o_dim, c_dim, h, w, oh, ow;
  int kh, kw, sh, sw, ph, pw, dh, dw;
  __device__ acc_t load_b(int64_t row, int64_t o, int64_t p) const {
    return static_cast<acc_t>(b[(row * o_dim + o) * (oh * ow) + p]);
  }
  __device__ acc_t load_a(int64_t row, int64_t k, int64_t p) const {
    const int64_t c = k / (kh * kw);
    const int r = static_cast<int>(k - c * (kh * kw));
    const int u = r / kw, v = r - u * kw;
    const int64_t y = p / ow, x = p - y * ow;
    const int64_t iy = y * sh - ph + static_cast<int64_t>(u) * dh;
    const int64_t ix = x * sw - pw + static_cast<int64_t>(v) * dw;
    if (iy < 0 || iy >= h || ix < 0 || ix >= w) return acc_t(0);
    return static_cast<acc_t>(a[((row * c_dim + c) * h + iy) * w + ix]);
  }
};

template <typename scalar_t, typename acc_t, typename Loader>
__global__ void __launch_bounds__(kThreads)
segment_wgrad_kernel(Loader ld, const int64_t* __restrict__ perm,
                     const int64_t* __restrict__ offsets, int64_t o_dim,
                     int64_t k_dim, int64_t positions, int64_t num_segments,
                     int64_t splits, int64_t tiles_o, int64_t tiles_k,
                     acc_t* __restrict__ partial, scalar_t* __restrict__ out) {
  // +1 column of padding: the staging writes walk the reduction index.
  __shared__ acc_t sb[kRed][kTile + 1];
  __shared__ acc_t sa[kRed][kTile + 1];

  int64_t bid = blockIdx.x;
  const int64_t tk = bid % tiles_k;
  bid /= tiles_k;
  const int64_t to = bid % tiles_o;
  bid /= tiles_o;
  const int64_t seg = bid % num_segments;
  const int64_t z = bid / num_segments;
  const int64_t o0 = to * kTile, k0 = tk * kTile;

  const int64_t first = offsets[seg];
  const int64_t steps = (offsets[seg + 1] - first) * positions;
  const int64_t q_begin = steps * z / splits;
  const int64_t q_end = steps * (z + 1) / splits;

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);

  // q_begin / q_end are the same for the whole block, so every thread runs
  // the same number of rounds and the barriers are safe.
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kRed) {
    for (int e = threadIdx.x; e < kRed * kTile; e += kThreads) {
      // Consecutive threads walk the contiguous axis of B: the column (o)
      // for Linear, the reduction step (output position) for Conv2d.
      int r, c;
      if (positions == 1) {
        r = e / kTile;
        c = e % kTile;
      } else {
        r = e % kRed;
        c = e / kRed;
      }
      const int64_t q = q0 + r;
      acc_t vb = acc_t(0), va = acc_t(0);
      if (q < q_end) {
        const int64_t j = q / positions, p = q - j * positions;
        const int64_t row = perm[first + j];
        if (o0 + c < o_dim) vb = ld.load_b(row, o0 + c, p);
        if (k0 + c < k_dim) va = ld.load_a(row, k0 + c, p);
      }
      sb[r][c] = vb;
      sa[r][c] = va;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRed; ++r) {
      acc_t bv[kMicro], av[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) bv[i] = sb[r][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) av[j] = sa[r][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += bv[i] * av[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = o0 + ty + 16 * i;
    if (o >= o_dim) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = k0 + tx + 16 * j;
      if (k >= k_dim) continue;
      const int64_t idx = (seg * o_dim + o) * k_dim + k;
      if (partial != nullptr) {
        partial[z * num_segments * o_dim * k_dim + idx] = acc[i][j];
      } else {
        out[idx] = static_cast<scalar_t>(acc[i][j]);
      }
    }
  }
}

// out[e] = sum over z (in order) of partial[z][e].
template <typename scalar_t, typename acc_t>
__global__ void combine_splits_kernel(const acc_t* __restrict__ partial, int64_t numel,
                                      int64_t splits, scalar_t* __restrict__ out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = acc_t(0);
    for (int64_t z = 0; z < splits; ++z) v += partial[z * numel + e];
    out[e] = static_cast<scalar_t>(v);
  }
}

// Rows in segment order and each segment's bounds, on the device.
void segment_order(const at::Tensor& ids_in, int64_t num_segments, at::Tensor& perm,
                   at::Tensor& offsets) {
  const at::Tensor ids = ids_in.contiguous();
  auto sorted = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  perm = std::get<1>(sorted).contiguous();
  const at::Tensor bounds =
      at::arange(num_segments + 1, ids.options().dtype(at::kLong)).to(ids.scalar_type());
  // Out-of-range ids sort before segment 0 or after the last one and fall
  // outside every [offsets[s], offsets[s + 1]): they are skipped (the Python
  // layer rejects them before launch when validation is on).
  offsets = at::searchsorted(std::get<0>(sorted), bounds).to(at::kLong).contiguous();
}

template <typename scalar_t, typename Loader>
void launch(const Loader& ld, const at::Tensor& perm, const at::Tensor& offsets, int64_t n,
            int64_t o_dim, int64_t k_dim, int64_t positions, int64_t num_segments,
            at::Tensor& out, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_o = (o_dim + kTile - 1) / kTile;
  const int64_t tiles_k = (k_dim + kTile - 1) / kTile;
  const int64_t base = tiles_o * tiles_k * num_segments;
  const int64_t numel = num_segments * o_dim * k_dim;
  // The split count depends only on the shapes (determinism).
  int64_t splits = base >= kTargetBlocks ? 1 : (kTargetBlocks + base - 1) / base;
  splits = std::min(splits, std::max<int64_t>(1, n * positions / (num_segments * kMinStepsPerSplit)));
  splits = std::min(splits, kMaxSplits);
  splits = std::min(splits, std::max<int64_t>(
                                1, kMaxPartialBytes / std::max<int64_t>(1, numel * int64_t(sizeof(acc_t)))));
  const int64_t blocks = base * splits;
  TORCH_CHECK_VALUE(blocks <= int64_t(2147483647), op, ": too many output tiles (", blocks, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty({splits * numel}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  segment_wgrad_kernel<scalar_t, acc_t, Loader><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      ld, perm.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), o_dim, k_dim,
      positions, num_segments, splits, tiles_o, tiles_k,
      splits > 1 ? partial.data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t grid = std::min<int64_t>((numel + 255) / 256, 65535);
    combine_splits_kernel<scalar_t, acc_t><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), numel, splits, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor segment_linear_weight_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& input_in,
                                           const at::Tensor& ids, int64_t num_segments) {
  check_linear_weight_grad_args(grad_out_in, input_in, ids, num_segments);
  c10::cuda::CUDAGuard guard(input_in.device());
  const int64_t n = input_in.size(0), o = grad_out_in.size(1), k = input_in.size(1);
  at::Tensor out = at::zeros({num_segments, o, k}, input_in.options());
  if (n == 0 || o == 0 || k == 0) return out;
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  at::Tensor perm, offsets;
  segment_order(ids, num_segments, perm, offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "segment_linear_weight_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LinearLoader<scalar_t, acc_t> ld{grad_out.const_data_ptr<scalar_t>(),
                                     input.const_data_ptr<scalar_t>(), o, k};
    launch<scalar_t>(ld, perm, offsets, n, o, k, 1, num_segments, out,
                     "segment_linear_weight_grad");
  });
  return out;
}

at::Tensor segment_conv2d_weight_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& input_in,
                                           const at::Tensor& ids, int64_t num_segments,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv2d_weight_grad_args(grad_out_in, input_in, ids, num_segments, kernel_size, stride,
                                padding, dilation);
  c10::cuda::CUDAGuard guard(input_in.device());
  const int64_t n = input_in.size(0), o = grad_out_in.size(1), c = input_in.size(1);
  const int64_t k = c * kernel_size[0] * kernel_size[1];
  at::Tensor out = at::zeros({num_segments, o, c, kernel_size[0], kernel_size[1]}, input_in.options());
  if (n == 0 || o == 0 || c == 0) return out;
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  at::Tensor perm, offsets;
  segment_order(ids, num_segments, perm, offsets);
  const int64_t positions = grad_out.size(2) * grad_out.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "segment_conv2d_weight_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ConvLoader<scalar_t, acc_t> ld{grad_out.const_data_ptr<scalar_t>(),
                                   input.const_data_ptr<scalar_t>(),
                                   o, c, input.size(2), input.size(3),
                                   grad_out.size(2), grad_out.size(3),
                                   static_cast<int>(kernel_size[0]), static_cast<int>(kernel_size[1]),
                                   static_cast<int>(stride[0]), static_cast<int>(stride[1]),
                                   static_cast<int>(padding[0]), static_cast<int>(padding[1]),
                                   static_cast<int>(dilation[0]), static_cast<int>(dilation[1])};
    launch<scalar_t>(ld, perm, offsets, n, o, k, positions, num_segments, out,
                     "segment_conv2d_weight_grad");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfair, CUDA, m) {
  // The ops' own CUDA kernels are the grouped GEMM of fastfair/wgrad.py
  // (registered from Python); this one stays available by name.
  m.impl("segment_linear_weight_grad_simt", &segment_linear_weight_grad_cuda);
  m.impl("segment_conv2d_weight_grad_simt", &segment_conv2d_weight_grad_cuda);
}

}  // namespace fastfair
