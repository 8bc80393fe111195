// The Python module gmt_kernels._C: importing it runs the TORCH_LIBRARY registrations of ops.cpp,
// after which the kernels are reachable as torch.ops.gmt_kernels.*. It defines nothing itself.
#include <Python.h>

static struct PyModuleDef gmt_kernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of gmt_kernels, registered as torch.ops.gmt_kernels.*",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gmt_kernels_c_module); }
