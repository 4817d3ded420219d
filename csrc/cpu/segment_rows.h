// The inner loops of the CPU segment reductions (segment_reduce.cpp), which
// includes this file once per instruction set, each time inside its own
// namespace and `#pragma GCC target` region (no include guard, no includes:
// everything used here is included before). The extension is built for the
// baseline x86-64 (SSE2) so that it runs on any machine; these loops are
// where the time goes, and at the shapes the driver uses they are as fast as
// torch's own scatter_reduce_ only with its vector width (measured on the
// 2-core AVX-512 VM: SSE2 build 1.3-2x slower at 2500 x 512 and 2560 x 2048,
// the -march=native build faster at nearly every point; benchmarks/NOTES.md
// "CPU segment ops").
//
// Every loop adds whole rows element by element: lane j of a vector add does
// what the scalar add of column j did, in the same row order, so the results
// are bitwise the same for every instruction set (tests/test_cpu_isa.py).
// Nothing here is a multiply-add; the regions also switch contraction off so
// that an edit cannot make one silently.

// dst[j] += src[j * sc] for j in [j0, j1). The sc == 1 branch lets the
// compiler vectorise.
template <typename scalar_t, typename acc_t>
inline void add_row(acc_t* __restrict__ dst, const scalar_t* __restrict__ src,
                    int64_t j0, int64_t j1, int64_t sc) {
  if (sc == 1) {
    for (int64_t j = j0; j < j1; ++j) dst[j] += static_cast<acc_t>(src[j]);
  } else {
    for (int64_t j = j0; j < j1; ++j) dst[j] += static_cast<acc_t>(src[j * sc]);
  }
}

// Row chunks and the column pass: out[ids[i]] += x[i] for rows i in [i0, i1),
// in row order. out is [G, d], zeroed by the caller. `nta_lines` > 0: the
// first nta_lines cache lines of the row `ahead` rows on are prefetched
// non-temporally, so that streaming x does not evict the rows of `out` it
// adds into (a hint only: no effect on results).
template <typename scalar_t, typename acc_t, typename index_t>
void scatter_rows(acc_t* out, const scalar_t* xp, int64_t sr, int64_t sc,
                  const index_t* ids, int64_t i0, int64_t i1, int64_t d,
                  int64_t nta_lines = 0, int64_t ahead = 0) {
  if (nta_lines > 0) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i + ahead < i1) {
        const char* next = reinterpret_cast<const char*>(xp + (i + ahead) * sr);
        for (int64_t l = 0; l < nta_lines; ++l) __builtin_prefetch(next + 64 * l, 0, 0);
      }
      add_row(out + static_cast<int64_t>(ids[i]) * d, xp + i * sr, 0, d, sc);
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i)
    add_row(out + static_cast<int64_t>(ids[i]) * d, xp + i * sr, 0, d, sc);
}

// Row chunks: op[e] = sum over chunks c (in chunk order) of partial[c][e],
// for e in [e0, e1) (elements of the [G, d] output); then, for a mean
// (counts given), times 1 / counts[segment] where a segment has rows > 1.
template <typename acc_t>
void combine_chunks(acc_t* __restrict__ op, const acc_t* __restrict__ partial,
                    int64_t nchunks, int64_t stride, int64_t e0, int64_t e1,
                    const int64_t* counts, int64_t d) {
  for (int64_t e = e0; e < e1; ++e) op[e] = partial[e];
  for (int64_t c = 1; c < nchunks; ++c) {
    const acc_t* p = partial + c * stride;
    for (int64_t e = e0; e < e1; ++e) op[e] += p[e];
  }
  if (counts == nullptr) return;
  for (int64_t e = e0; e < e1;) {
    const int64_t s = e / d, end = std::min(e1, (s + 1) * d);
    if (counts[s] > 1) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(counts[s]);
      for (int64_t k = e; k < end; ++k) op[k] *= inv;
    }
    e = end;
  }
}

// Sorted strategy, one task: for segments s in [s0, s1), columns [j0, j1):
// op[s] = the sum (mean) of rows perm[offsets[s] .. offsets[s + 1]), added in
// that (ascending) order. `lines` cache lines of the row kPrefetchRows ahead
// are prefetched (0: none).
template <typename scalar_t, typename acc_t, typename pos_t>
void sum_sorted_segments(acc_t* op, const scalar_t* xp, int64_t sr, int64_t sc,
                         int64_t n, int64_t d, const pos_t* perm,
                         const pos_t* offsets, int64_t s0, int64_t s1,
                         int64_t j0, int64_t j1, int64_t lines,
                         int64_t prefetch_rows, bool mean) {
  for (int64_t s = s0; s < s1; ++s) {
    acc_t* dst = op + s * d;
    for (int64_t j = j0; j < j1; ++j) dst[j] = acc_t(0);
    const int64_t k0 = offsets[s], k1 = offsets[s + 1];
    for (int64_t k = k0; k < k1; ++k) {
      if (lines > 0 && k + prefetch_rows < n) {
        const char* ahead = reinterpret_cast<const char*>(
            xp + static_cast<int64_t>(perm[k + prefetch_rows]) * sr + j0);
        for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(ahead + 64 * l);
      }
      add_row(dst, xp + static_cast<int64_t>(perm[k]) * sr, j0, j1, sc);
    }
    if (mean && k1 - k0 > 1) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(k1 - k0);
      for (int64_t j = j0; j < j1; ++j) dst[j] *= inv;
    }
  }
}

// The mean of the row-chunk and column strategies: op[s] *= 1 / counts[s]
// for segments in [s0, s1) with more than one row.
template <typename acc_t>
void scale_by_counts(acc_t* op, const int64_t* counts, int64_t s0, int64_t s1,
                     int64_t d) {
  for (int64_t s = s0; s < s1; ++s) {
    if (counts[s] > 1) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(counts[s]);
      for (int64_t j = 0; j < d; ++j) op[s * d + j] *= inv;
    }
  }
}
