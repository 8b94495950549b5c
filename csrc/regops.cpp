// regops._C: schemas of the CUDA kernels (namespace regops_C) and their CUDA implementations.
// The kernels themselves are plain CUDA in csrc/*.cu (declared in kernels.h); this file only checks tensors
// and launches them on the current stream. Fake (meta) impls are registered from Python (regops/_backend.py).
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

regops::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return regops::DType::Float32;
    case at::kHalf:
      return regops::DType::Float16;
    case at::kBFloat16:
      return regops::DType::BFloat16;
    case at::kDouble:
      return regops::DType::Float64;
    default:
      TORCH_CHECK(false, "regops_C::", op, ": unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "regops_C::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor dropout(const at::Tensor& x, int64_t threshold, double scale, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.is_cuda(), "regops_C::dropout: x must be a CUDA tensor");
  TORCH_CHECK(threshold >= -1 && threshold < (int64_t{1} << 31), "regops_C::dropout: threshold out of range");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  check_launch(regops::dropout_launch(input.const_data_ptr(), y.mutable_data_ptr(), input.numel(),
                                      dtype_of(input, "dropout"), static_cast<int32_t>(threshold),
                                      static_cast<float>(scale), static_cast<uint64_t>(seed),
                                      static_cast<uint64_t>(offset), c10::cuda::getCurrentCUDAStream()),
               "dropout");
  return y;
}

}  // namespace

TORCH_LIBRARY(regops_C, m) {
  m.def("dropout(Tensor x, int threshold, float scale, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(regops_C, CUDA, m) { m.impl("dropout", &dropout); }

// A Python module with no functions: importing regops._C loads the library and runs the registrations above.
static struct PyModuleDef regops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&regops_c_module); }
