// regops._C: the Python module. Importing it loads the library, whose static registrations put the C++ CPU and
// CUDA kernels on the regops:: operators declared in Python (TORCH_LIBRARY_IMPL blocks in csrc/<family>/).
#include <Python.h>
#include <torch/library.h>

// A Python module with no functions: importing regops._C loads the library and runs the registrations.
static struct PyModuleDef regops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&regops_c_module); }
