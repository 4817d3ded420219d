// CPU kernels for segment_sum / segment_mean / segment_count.
//
// Deterministic by construction: no atomics, every output element has one
// writer that adds its rows in a fixed order, and which strategy runs (and
// so the order of the additions) is a function of (N, D, G) only, never of
// the thread count. Results are bitwise identical run to run and across
// OMP_NUM_THREADS. Three strategies (see choose_strategy):
//   columns    one serial pass over the rows in order, read-modify-writing
//              output rows. Only for narrow rows (D < 32) where nothing else
//              pays for its setup.
//   row chunks tasks own row chunks (how many: from N and G) with private
//              [G, D] partial sums (kept within L2), combined in chunk order.
//              Parallel for many rows and G up to ~N / 12.
//   sorted     a stable counting sort of the ids (O(N + G), serial), then
//              tasks own (segment range, column tile) pairs and sum each
//              segment's rows in ascending row order into its own output
//              row. Parallel for large G, and for wide rows at any G (columns
//              are tiled when segments are few).
// Columns and sorted add every element's rows in the same order (ascending
// rows from zero), so they give the same bits; row chunks differ.
// The strategies add the rows in different orders, so the same input can
// give slightly different bits under different shapes; never under
// different thread counts.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../checks.h"
#include "cpu_isa.h"

// The inner loops, once per instruction set (segment_rows.h says why).
namespace fastfair {
namespace isa_baseline {
#include "segment_rows.h"
}  // namespace isa_baseline
#ifdef FASTFAIR_CPU_MULTI_ISA
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx2")
#include "segment_rows.h"
#pragma GCC pop_options
}  // namespace isa_avx2
namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#include "segment_rows.h"
#pragma GCC pop_options
}  // namespace isa_avx512
// Calls isa_<best>::CALL, the best instruction set this CPU has (capped by
// FASTFAIR_CPU_ISA).
#define FASTFAIR_ISA_CALL(...)                                          \
  do {                                                                 \
    switch (::fastfair::cpu_isa()) {                                   \
      case ::fastfair::CpuIsa::kAvx512: isa_avx512::__VA_ARGS__; break; \
      case ::fastfair::CpuIsa::kAvx2: isa_avx2::__VA_ARGS__; break;     \
      default: isa_baseline::__VA_ARGS__; break;                        \
    }                                                                  \
  } while (0)
#else
#define FASTFAIR_ISA_CALL(...) isa_baseline::__VA_ARGS__
#endif
}  // namespace fastfair

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

// Row chunks hold at least this many elements, counting a row as at least
// 64 wide: 4096 rows for D <= 64 (measured there: each task's work then
// dwarfs the thread pool's wake-up), fewer for wider rows, so that 2560
// rows of 2048 (DM's real embeddings) still split into 20 chunks. Inputs
// smaller than one chunk skip the parallel row split altogether (the serial
// column pass or the sorted strategy, which splits segments and columns).
constexpr int64_t kMinChunkElems = int64_t(4096) * 64;
// ...and at least this many rows per segment: the partial buffers cost
// nchunks * G * D to zero and combine, at most 1/6 of the N * D main pass.
// Measured (N = 2^17, D = 64, 2 threads): two chunks still beat the sorted
// strategy at G = N / 13 and tie at N / 8; with many chunks, ratios 4 to 16
// are within ~20% of each other, larger being cheaper (fewer partials).
constexpr int64_t kChunkRowsPerSegment = 6;
// At most this many row chunks: more only adds partial buffers to zero and
// combine (N = 20000, D = 512, G = 100 would otherwise take 33 chunks, 6.6 MB
// of partials, freshly page-faulted on every call); 16 still balance any
// core count up to 16. A constant, so that results do not depend on the
// thread count.
constexpr int64_t kMaxRowChunks = 16;
// Cap on the partial-sum buffers (elements) of the row-chunk strategy.
constexpr int64_t kMaxPartial = int64_t(1) << 24;
// Cap on one row chunk's partial [G, D] buffer in bytes: it is updated at
// random rows, so it must stay in a core's L2 (1 MB here) or every row add
// becomes a cache miss (N = 20000, D = 512, G = 100: 200 KB per chunk).
constexpr int64_t kMaxChunkPartialBytes = int64_t(512) << 10;
// ...except with many rows: from this many on, the sorted strategy's serial
// counting sort of N ids and its gather of rows in random order from memory
// cost more than the partials' L2 misses (which then hit the last-level
// cache), so partials of up to kMaxChunkPartialBytesManyRows are allowed.
// Measured back-to-back, 2 threads, AVX-512 loops, N = 2^17, D = 64: G = 3000
// (768 KB partials) row chunks 1.77-1.93 ms vs sorted 2.83-2.93; G = 10^4
// (2.5 MB) 1.70-1.87 vs 2.63-2.69. At N = 20000, D = 512 the sorted strategy
// stays ahead at G = 1000 (2 MB: 1.90 vs 2.14 ms), hence the row threshold.
constexpr int64_t kManyRows = 65536;
constexpr int64_t kMaxChunkPartialBytesManyRows = int64_t(4) << 20;
// The sorted strategy's counting sort is serial, O(N + G), independent of
// D; below this width a single-threaded column pass costs about the same or
// less (measured on 2 threads, N = 2^17, G = 10^4 .. 10^5: column pass
// faster at D = 16 except a tie at G = 10^5; at D = 32 a tie at G ~ N / 10
// and the sorted strategy up to 2x faster at G = 10^5).
constexpr int64_t kMinSortedCols = 32;
// Sorted strategy: work per task in elements, counting an output row like
// an input row ((rows + segments) * D). Large enough to amortise the two
// binary searches that find a task's segment range; small enough that a
// few hundred tasks balance any thread count. Results do not depend on it.
constexpr int64_t kSortedTaskElems = int64_t(1) << 15;
// Sorted strategy: when there are fewer segment ranges than this, the
// columns are cut into tiles too, so that few segments with wide rows
// (G = 1, D = 2048) still keep every core busy...
constexpr int64_t kMinSortedTasks = 16;
// ...but a tile keeps at least this many columns (1 KB of float32 per row),
// long enough for the hardware prefetcher to stream each row's piece. The
// column split of v2 (64-column blocks over every row, 256 B per row) ran at
// 2-3 GB/s at D = 512 and 2048, 3x slower than index_add_.
constexpr int64_t kMinTileCols = 256;
// Sorted strategy: the rows are gathered in sorted order, which the hardware
// prefetcher cannot predict; prefetching the row this many positions ahead
// hides most of the memory latency (measured 2 threads, N = 2^17, D = 64,
// inputs rotated so that x is not in cache: 1.5x faster at G = 3 * 10^4 and
// 10^5; distances 4 to 16 gave the same). A hint only: no effect on results.
constexpr int64_t kPrefetchRows = 8;
// Prefetch at most this many cache lines of the row ahead: the rest of a
// long row is streamed by the hardware prefetcher once its first lines are
// touched, and explicit prefetches of whole 8 KB rows 8 rows ahead would
// overrun L1.
constexpr int64_t kMaxPrefetchLines = 8;

// v4 sent few wide rows (N <= 4096, D >= 256, G >= 8) to the sorted pass,
// from a round-robin in which every implementation of a round read the same
// input, so the first one paid the memory reads. Timed with each call on an
// input the previous call did not read (benchmarks/NOTES.md, v6), the row
// chunks win there: 2500 x 512, G = 8 / 16 / 50 / 100: 0.71-0.77 of the best
// of index_add_ / scatter_reduce_ against the sorted pass's 0.73-1.01;
// 2560 x 2048, G = 8..50: 0.79-0.87 against 0.94-1.18. No such rule now.

int64_t min_chunk_rows(int64_t d) {
  return kMinChunkElems / std::max<int64_t>(d, 64);
}

int64_t num_row_chunks(int64_t n, int64_t d, int64_t num_segments) {
  return std::min({kMaxRowChunks, n / min_chunk_rows(d),
                   n / (kChunkRowsPerSegment * num_segments)});
}

enum class Strategy { kColumns, kRowChunks, kSorted };

// The strategy is a function of the shapes only: determinism across thread
// counts depends on that.
Strategy choose_strategy(int64_t n, int64_t d, int64_t num_segments,
                         int64_t acc_bytes) {
  if (n <= min_chunk_rows(d))
    return d >= kMinSortedCols ? Strategy::kSorted : Strategy::kColumns;
  // Few segments: row chunks stream x in order, the cheapest parallel pass.
  const int64_t nchunks = num_row_chunks(n, d, num_segments);
  if (nchunks >= 2 && nchunks * num_segments * d <= kMaxPartial &&
      num_segments * d * acc_bytes <=
          (n >= kManyRows ? kMaxChunkPartialBytesManyRows : kMaxChunkPartialBytes))
    return Strategy::kRowChunks;
  // Many segments (or wide rows): sort once, then one writer per segment.
  if (d >= kMinSortedCols) return Strategy::kSorted;
  return Strategy::kColumns;
}

template <typename index_t>
void count_kernel(const index_t* ids, int64_t n, int64_t* counts) {
  for (int64_t i = 0; i < n; ++i) counts[static_cast<int64_t>(ids[i])] += 1;
}

// Sorted strategy. pos_t holds row positions (int32 when N allows: half the
// memory traffic of the sort). Every output element is the sum of its
// segment's rows in ascending row order, whatever the task split, so the
// split may use the shapes freely.
template <typename pos_t, typename scalar_t, typename index_t>
void sorted_kernel(const scalar_t* xp, int64_t sr, int64_t sc, int64_t n,
                   int64_t d, const index_t* ids, int64_t num_segments,
                   bool mean, at::opmath_type<scalar_t>* op) {
  using acc_t = at::opmath_type<scalar_t>;
  // Stable counting sort. offsets[s] first holds the end of segment s; the
  // backward fill decrements it to the start, so afterwards the rows of s
  // are perm[offsets[s] .. offsets[s + 1]), in ascending order.
  std::vector<pos_t> offsets(num_segments + 1, 0);
  for (int64_t i = 0; i < n; ++i) offsets[static_cast<int64_t>(ids[i])] += 1;
  for (int64_t s = 1; s < num_segments; ++s) offsets[s] += offsets[s - 1];
  offsets[num_segments] = static_cast<pos_t>(n);
  std::unique_ptr<pos_t[]> perm(new pos_t[n]);
  for (int64_t i = n - 1; i >= 0; --i)
    perm[--offsets[static_cast<int64_t>(ids[i])]] = static_cast<pos_t>(i);

  // Segment ranges of about equal weight, where the weight before segment s
  // is offsets[s] + s (rows plus output rows), so a huge segment does not
  // leave the other threads idle; times column tiles when there are few.
  const int64_t total = n + num_segments;
  const int64_t nranges = std::clamp<int64_t>(total * d / kSortedTaskElems, 1, num_segments);
  const int64_t max_tiles = std::max<int64_t>(1, d / kMinTileCols);
  const int64_t ntiles = nranges >= kMinSortedTasks
                             ? 1
                             : std::min(max_tiles, (kMinSortedTasks + nranges - 1) / nranges);
  const int64_t tile = (d + ntiles - 1) / ntiles;
  auto first_segment_at = [&](int64_t w) {  // smallest s with weight >= w
    int64_t lo = 0, hi = num_segments;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(offsets[mid]) + mid < w) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, nranges * ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / ntiles;
      const int64_t j0 = (t % ntiles) * tile, j1 = std::min(d, j0 + tile);
      // Cache lines of this task's piece of one row (strided rows are not
      // prefetched).
      const int64_t lines =
          sc == 1 ? std::min<int64_t>(kMaxPrefetchLines,
                                      ((j1 - j0) * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64)
                  : 0;
      const int64_t s0 = first_segment_at(total * r / nranges);
      const int64_t s1 = r + 1 == nranges ? num_segments : first_segment_at(total * (r + 1) / nranges);
      FASTFAIR_ISA_CALL(sum_sorted_segments<scalar_t, acc_t, pos_t>(
          op, xp, sr, sc, n, d, perm.get(), offsets.data(), s0, s1, j0, j1, lines,
          kPrefetchRows, mean));
    }
  });
}

// Fills all of out_acc ([G, D], the accumulation type of x).
template <typename scalar_t, typename index_t>
void segment_sum_kernel(const at::Tensor& x, const index_t* ids,
                        int64_t num_segments, bool mean, at::Tensor& out_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t sr = x.stride(0), sc = x.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out_acc.data_ptr<acc_t>();
  const Strategy strategy =
      choose_strategy(n, d, num_segments, static_cast<int64_t>(sizeof(acc_t)));

  if (strategy == Strategy::kSorted) {
    if (n < std::numeric_limits<int32_t>::max())
      sorted_kernel<int32_t>(xp, sr, sc, n, d, ids, num_segments, mean, op);
    else
      sorted_kernel<int64_t>(xp, sr, sc, n, d, ids, num_segments, mean, op);
    return;
  }

  if (strategy == Strategy::kRowChunks) {
    // Each row chunk sums into its own buffer (zeroed by its task, so in
    // parallel), then the buffers are added in chunk order; this writes
    // every output element.
    const int64_t nchunks = num_row_chunks(n, d, num_segments);
    const int64_t chunk_rows = (n + nchunks - 1) / nchunks;
    const int64_t stride = num_segments * d;
    // A chunk's partial larger than L2 lives in the last-level cache, which
    // x streams through too (N = 2^17, D = 64: 33.5 MB against 32 MB of L3):
    // read x non-temporally there so that it does not evict the partials.
    const int64_t nta_lines =
        sc == 1 && stride * static_cast<int64_t>(sizeof(acc_t)) > kMaxChunkPartialBytes
            ? std::min<int64_t>(kMaxPrefetchLines, (d * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64)
            : 0;
    std::unique_ptr<acc_t[]> partial(new acc_t[nchunks * stride]);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* p = partial.get() + c * stride;
        std::fill(p, p + stride, acc_t(0));
        const int64_t r1 = std::min(n, (c + 1) * chunk_rows);
        FASTFAIR_ISA_CALL(scatter_rows<scalar_t, acc_t, index_t>(p, xp, sr, sc, ids, c * chunk_rows, r1, d,
                                                                 nta_lines, kPrefetchRows));
      }
    });
    // The mean's scaling happens in the same pass (one parallel region
    // less: each costs a thread wake-up, a visible part of a 60 us call).
    std::vector<int64_t> counts;
    if (mean) {
      counts.assign(num_segments, 0);
      count_kernel(ids, n, counts.data());
    }
    at::parallel_for(0, num_segments * d, 4096, [&](int64_t e0, int64_t e1) {
      FASTFAIR_ISA_CALL(combine_chunks<acc_t>(op, partial.get(), nchunks, stride, e0, e1,
                                              mean ? counts.data() : nullptr, d));
    });
    return;
  }
  // Narrow rows (D < kMinSortedCols): one serial pass over the rows in
  // order; the other strategies' setup would cost more than it saves.
  out_acc.zero_();
  FASTFAIR_ISA_CALL(scatter_rows<scalar_t, acc_t, index_t>(op, xp, sr, sc, ids, 0, n, d));
  if (mean) {
    std::vector<int64_t> counts(num_segments, 0);
    count_kernel(ids, n, counts.data());
    at::parallel_for(0, num_segments, 256, [&](int64_t s0, int64_t s1) {
      FASTFAIR_ISA_CALL(scale_by_counts<acc_t>(op, counts.data(), s0, s1, d));
    });
  }
}

at::Tensor segment_count_cpu(const at::Tensor& ids_in, int64_t num_segments) {
  check_ids(ids_in, num_segments, "segment_count");
  check_output_size(num_segments, {}, sizeof(int64_t), "segment_count");
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
  const auto acc_type = at::toOpMathType(x.scalar_type());
  check_output_size(num_segments, {x.size(1)}, c10::elementSize(acc_type), name);
  const at::Tensor ids = ids_in.contiguous();
  // Every strategy writes (or zeroes) all of out_acc itself.
  at::Tensor out_acc =
      at::empty({num_segments, x.size(1)}, x.options().dtype(acc_type));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "segment_reduce_cpu_ids", [&] {
    const index_t* idp = ids.const_data_ptr<index_t>();
    check_range_cpu(idp, ids.size(0), num_segments, name);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cpu", [&] {
          segment_sum_kernel<scalar_t, index_t>(x, idp, num_segments, mean,
                                                out_acc);
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
