// Which vector instruction set the CPU kernels' inner loops use.
//
// The extension is compiled for the baseline x86-64 so that one build runs
// on every x86-64 machine; the loops that carry the time are compiled once
// more per wider instruction set (segment_rows.h) and picked at run time
// from what the CPU and the OS support, as ATen does for its own kernels.
// FASTFAIR_CPU_ISA=baseline|avx2|avx512 caps the choice (for measuring what
// the vector width buys, and for the test that every set gives the same
// bits). Only GCC on x86-64 builds the extra versions; elsewhere the
// baseline (the compiler's default target) is all there is.
#pragma once

#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTFAIR_CPU_MULTI_ISA 1
#endif

namespace fastfair {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Decided once per process; raises a ValueError naming the valid values if
// FASTFAIR_CPU_ISA holds anything else.
CpuIsa cpu_isa();

// "baseline", "avx2" or "avx512".
std::string cpu_isa_name();

}  // namespace fastfair
