#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastfair {
namespace {

CpuIsa detect() {
#ifdef FASTFAIR_CPU_MULTI_ISA
  // libgcc's CPU model checks the OS's XSAVE state too, so a CPU with
  // AVX-512 under an OS that does not save zmm registers says no here.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa decide() {
  const CpuIsa found = detect();
  const char* cap = std::getenv("FASTFAIR_CPU_ISA");
  if (cap == nullptr || cap[0] == '\0') return found;
  CpuIsa want;
  if (std::strcmp(cap, "baseline") == 0) want = CpuIsa::kBaseline;
  else if (std::strcmp(cap, "avx2") == 0) want = CpuIsa::kAvx2;
  else if (std::strcmp(cap, "avx512") == 0) want = CpuIsa::kAvx512;
  else
    TORCH_CHECK_VALUE(false, "FASTFAIR_CPU_ISA=", cap,
                      " is not one of baseline, avx2, avx512 (it caps the vector "
                      "instruction set of fastfair's CPU kernels; unset it to use the best one)");
  return static_cast<int>(want) < static_cast<int>(found) ? want : found;
}

}  // namespace

CpuIsa cpu_isa() {
  // A throwing initialiser is retried on the next call, so a bad value keeps
  // raising rather than falling back silently.
  static const CpuIsa isa = decide();
  return isa;
}

std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace fastfair
