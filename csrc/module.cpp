// regops._C: the Python module. Importing it loads the library, whose static registrations put the C++ CPU and
// CUDA kernels on the regops:: operators declared in Python (TORCH_LIBRARY_IMPL blocks in csrc/<family>/).
//
// The ops not yet declared that way keep C++ CPU kernels with their reference's signature in namespace regops_cpu
// (schemas below).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(regops_cpu, m) {
  m.def(
      "hessian_probes(int seed, int offset, int first_probe, int num_probes, int numel, str distribution, "
      "ScalarType dtype, Device? device=None) -> Tensor");
  m.def("hessian_probe_dot(Tensor[] vs, Tensor[] hvs, bool with_diag=True) -> (Tensor, Tensor, Tensor)");
}

// A Python module with no functions: importing regops._C loads the library and runs the registrations.
static struct PyModuleDef regops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&regops_c_module); }
