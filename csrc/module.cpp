// regops._C: the Python module and the schemas of the C++ CPU kernels (namespace regops_cpu). Always built when
// a C++ compiler exists; the CUDA part (csrc/regops.cpp, *.cu) is added when nvcc and a CUDA torch exist.
//
// Every regops_cpu::<op> has the signature of the op's reference in regops/reference/ (same arguments, same
// results), so regops/_backend.py can run it for CPU tensors in place of the reference without an adapter.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(regops_cpu, m) {
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  m.def("dropout_bitmask(Tensor x, float p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("apply_bitmask(Tensor g, Tensor packed, float scale) -> Tensor");
  m.def("multi_sample_dropout_mean(Tensor x, float p, int num_samples, int seed, int offset) -> Tensor");
  m.def("scale_rows_add(Tensor x, Tensor scales, Tensor? residual) -> Tensor");
  m.def("bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, int seed, int offset) -> Tensor");
  m.def("bias_dropout_add_backward(Tensor grad, bool has_bias, float p, int seed, int offset) -> (Tensor, Tensor?)");
  m.def(
      "dropout_add_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float p, float eps, "
      "bool rms_norm, bool residual_in_fp32, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dropout_add_layer_norm_backward(Tensor dy, Tensor? ds, Tensor s, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool has_bias, float p, bool rms_norm, int seed, int offset, ScalarType x_dtype, ScalarType? res_dtype) "
      "-> (Tensor, Tensor?, Tensor?, Tensor?)");
  m.def(
      "hessian_probes(int seed, int offset, int first_probe, int num_probes, int numel, str distribution, "
      "ScalarType dtype, Device? device=None) -> Tensor");
  m.def("nested_dropout(Tensor x, float p, int dim, int seed, int offset) -> Tensor");
  m.def("mix_apply(Tensor x, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor");
  m.def("hessian_probe_dot(Tensor[] vs, Tensor[] hvs, bool with_diag=True) -> (Tensor, Tensor, Tensor)");
}

// A Python module with no functions: importing regops._C loads the library and runs the registrations.
static struct PyModuleDef regops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&regops_c_module); }
