// The one place where fastfair's operator schemas live. Kernels register
// themselves per backend from csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and
// fake (meta) kernels are registered from Python (fastfair/ops.py), following
// pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_isa.h"

namespace fastfair {
#ifdef FASTFAIR_WITH_CUDA
// csrc/cuda/segment_reduce.cu (declared in csrc/cuda/id_check.cuh).
std::vector<int64_t> take_id_error_cuda(c10::Device device);
#endif

// The pending out-of-range id error of a device, cleared as it is read:
// {row, value, num_segments, op code} or {-1, 0, 0, 0}. CPU kernels raise at
// once, so a CPU device never has one.
std::vector<int64_t> take_id_error(c10::Device device) {
#ifdef FASTFAIR_WITH_CUDA
  if (device.is_cuda()) return take_id_error_cuda(device);
#endif
  return {-1, 0, 0, 0};
}
}  // namespace fastfair

extern "C" {
// Importing fastfair._C only has to load this shared library so that the
// static TORCH_LIBRARY registrations run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastfair custom operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastfair, m) {
  // Segmented reductions over rows: segment s collects the rows i with
  // ids[i] == s. ids are int32/int64 in any order; empty segments give 0.
  m.def("segment_sum(Tensor x, Tensor ids, int num_segments) -> Tensor");
  m.def("segment_mean(Tensor x, Tensor ids, int num_segments) -> Tensor");
  m.def("segment_count(Tensor ids, int num_segments) -> Tensor");
  // Segmented weight gradients for one-pass per-group DC: out[s] is the sum
  // over rows i in segment s of the weight gradient of row i alone.
  m.def("segment_linear_weight_grad(Tensor grad_out, Tensor input, Tensor ids, int num_segments) -> Tensor");
  m.def("segment_conv2d_weight_grad(Tensor grad_out, Tensor input, Tensor ids, int num_segments, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // CUDA kernels cannot raise: they skip rows whose id is outside
  // [0, num_segments) and record the first one per device (csrc/cuda/
  // id_check.cuh); fastfair.ops takes it with this op and raises.
  m.def("take_id_error(Device device) -> int[]", &fastfair::take_id_error);
  // The hand-written CUDA kernel of the two ops above, kept by name for the
  // measured comparison against the grouped GEMM (fastfair/wgrad.py, which
  // is the CUDA kernel of the ops themselves) and for float64.
  m.def("segment_linear_weight_grad_simt(Tensor grad_out, Tensor input, Tensor ids, int num_segments) -> Tensor");
  m.def("segment_conv2d_weight_grad_simt(Tensor grad_out, Tensor input, Tensor ids, int num_segments, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
}

// The torch this library was compiled against (setup.py passes torch.__version__
// as FASTFAIR_TORCH_VERSION), so that fastfair/_extension.py can refuse to run
// under another torch instead of misbehaving.
#define FASTFAIR_STR2(x) #x
#define FASTFAIR_STR(x) FASTFAIR_STR2(x)
#ifdef FASTFAIR_TORCH_VERSION
#define FASTFAIR_TORCH_VERSION_STR FASTFAIR_STR(FASTFAIR_TORCH_VERSION)
#else
#define FASTFAIR_TORCH_VERSION_STR "unknown"
#endif
TORCH_LIBRARY_FRAGMENT(fastfair, m) {
  m.def("build_torch_version() -> str", []() -> std::string { return FASTFAIR_TORCH_VERSION_STR; });
  // The vector instruction set of the CPU kernels' inner loops (csrc/cpu/cpu_isa.h).
  m.def("cpu_isa() -> str", []() -> std::string { return fastfair::cpu_isa_name(); });
}
