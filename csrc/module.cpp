// The Python module gmt_kernels._C: importing it runs the TORCH_LIBRARY registrations of ops.cpp,
// after which the kernels are reachable as torch.ops.gmt_kernels.*. It also carries the CPU
// capability switch (cpu_capability.h), wrapped by gmt_kernels/backends/cpu.py, and the packing of
// GMTAdamW's step-layout key (fingerprint.h). On import it reads GMT_KERNELS_CPU_CAPABILITY (as
// torch reads ATEN_CPU_CAPABILITY); a level this CPU or build cannot run fails the import with a
// ValueError saying what is possible.
#include <Python.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_capability.h"
#include "fingerprint.h"

namespace {

using gmt::cpu::Level;

PyObject* level_list(const std::vector<Level>& levels) {
  PyObject* out = PyList_New(0);
  for (Level level : levels) {
    PyObject* name = PyUnicode_FromString(gmt::cpu::level_name(level));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

PyObject* supported_capabilities(PyObject*, PyObject*) { return level_list(gmt::cpu::supported_levels()); }
PyObject* compiled_capabilities(PyObject*, PyObject*) { return level_list(gmt::cpu::compiled_levels()); }
PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(gmt::cpu::level_name(gmt::cpu::current_level())); }

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "set_cpu_capability expects a level name (str), one of %s; got %s",
                 gmt::cpu::supported_level_names().c_str(), Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  try {
    gmt::cpu::set_level(PyUnicode_AsUTF8(arg));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* kernel_capabilities(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (int k = 0; k < static_cast<int>(gmt::cpu::Kernel::kCount); ++k) {
    const auto kernel = static_cast<gmt::cpu::Kernel>(k);
    PyObject* level = PyUnicode_FromString(gmt::cpu::level_name(gmt::cpu::kernel_level(kernel)));
    PyDict_SetItemString(out, gmt::cpu::kernel_name(kernel), level);
    Py_DECREF(level);
  }
  return out;
}

PyMethodDef methods[] = {
    {"supported_capabilities", supported_capabilities, METH_NOARGS,
     "CPU capability levels this CPU and build can run, best first (ending with 'default')."},
    {"compiled_capabilities", compiled_capabilities, METH_NOARGS, "CPU capability levels compiled into this build."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU capability level in use."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Switch the CPU capability level (ValueError if not possible)."},
    {"kernel_capabilities", kernel_capabilities, METH_NOARGS,
     "For each kernel, the level of the variant it runs at the current setting."},
    {"layout_fingerprint", gmt::layout_fingerprint, METH_VARARGS,
     "layout_fingerprint(objects, addressed, strided) -> bytes: ids, data_ptrs and strides, packed (GMTAdamW's "
     "step-layout key)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef gmt_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                    "C++ CPU kernels of gmt_kernels, registered as torch.ops.gmt_kernels.*", -1,
                                    methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  const char* requested = std::getenv("GMT_KERNELS_CPU_CAPABILITY");
  if (requested != nullptr && requested[0] != '\0') {
    try {
      gmt::cpu::set_level(requested);
    } catch (const std::invalid_argument& e) {
      PyErr_Format(PyExc_ValueError, "GMT_KERNELS_CPU_CAPABILITY=%s: %s Unset it to use the best level.", requested,
                   e.what());
      return nullptr;
    }
  }
  return PyModule_Create(&gmt_kernels_c_module);
}
