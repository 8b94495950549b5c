// regops._C: the Python module. Importing it loads the library, whose static registrations put the C++ CPU and
// CUDA kernels on the regops:: operators declared in Python (TORCH_LIBRARY_IMPL blocks in csrc/<family>/).
//
// The ops not yet declared that way keep C++ CPU kernels with their reference's signature in namespace regops_cpu
// (schemas below).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(regops_cpu, m) {
  m.def("mix_apply(Tensor x, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor");
}

// A Python module with no functions: importing regops._C loads the library and runs the registrations.
static struct PyModuleDef regops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&regops_c_module); }
