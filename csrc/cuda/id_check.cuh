// Segment ids on the device: range detection without a host sync, and the
// stable sort of rows by segment that the CUDA kernels share.
//
// The contract (same as the CPU kernels'): ids outside [0, num_segments),
// negative included, are an error. A CUDA kernel cannot raise, so the kernels
// skip such rows (never write out of bounds) and record the first bad row of
// the first failing call in a per-device flag buffer. fastfair.ops reads it
// with the registered op fastfair::take_id_error(Device) -> int[]
// ([row, value, num_segments, op code], row -1 when nothing is pending) and
// raises the ValueError that the CPU kernel raises at once: right after the
// call with validate_ids(True), or at raise_pending_errors() /
// the exit of validate_ids(False).
//
// For another kernel's ids (e.g. the weight-gradient kernels), either
//   - call check_ids_on_device(ids, num_segments, IdOp::k...) before the
//     kernels (two tiny launches, no sync), and make the kernels skip rows
//     whose id is out of range; or
//   - use sort_segment_ids(), which does the check, maps bad rows past the
//     last segment (so no segment range contains them) and returns the
//     stable permutation and segment offsets (the sort a grouped GEMM over
//     segments needs anyway).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace fastfair {

// Op codes stored with an error; fastfair/ops.py maps them back to names.
enum class IdOp : int64_t {
  kSegmentSum = 1,
  kSegmentMean = 2,
  kSegmentCount = 3,
  kLinearWeightGrad = 4,
  kConv2dWeightGrad = 5,
};

// Layout of the per-device int64 flag buffer.
namespace id_error {
constexpr int kPending = 0;   // 1 once an error is recorded and complete
constexpr int kRow = 1;       // first bad row; INT64_MAX while none
constexpr int kValue = 2;     // ids[row]
constexpr int kSegments = 3;  // num_segments of the failing call
constexpr int kOp = 4;        // IdOp of the failing call
constexpr int kSize = 5;
}  // namespace id_error

// The device's flag buffer (allocated on first use, kept for the process).
int64_t* id_error_buffer(c10::Device device);

// Flags the first out-of-range row of ids (1-D int32/int64 on a CUDA device)
// in the device's buffer, on the current stream, unless an error is already
// pending there. No host sync.
void check_ids_on_device(const at::Tensor& ids, int64_t num_segments, IdOp op);

// Rows sorted by segment, stably, with out-of-range rows checked (as by
// check_ids_on_device) and placed after every valid row:
//   keys     [N] the segment of each sorted row (num_segments for bad rows),
//            int32 when num_segments < 2^31 else int64
//   perm     [N] int64, the original row of each sorted row
//   offsets  [S + 1] int64: segment s is sorted rows offsets[s] ..
//            offsets[s + 1]; offsets[S] is the number of valid rows
struct SortedIds {
  at::Tensor keys, perm, offsets;
};
SortedIds sort_segment_ids(const at::Tensor& ids, int64_t num_segments, IdOp op);

// Reads and clears the device's pending error (one small device-to-host
// copy: a sync on the current stream). Returns {row, value, num_segments,
// op}, row -1 when none.
std::vector<int64_t> take_id_error_cuda(c10::Device device);

}  // namespace fastfair
