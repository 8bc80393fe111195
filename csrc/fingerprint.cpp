// gmt_kernels._C.layout_fingerprint: what GMTAdamW's step-layout key reads of many objects and
// tensors (identities, storage addresses, strides), packed into one bytes object in one call. In Python
// each value costs ~100 ns (a method call per tensor and value); a 300-parameter step reads ~5000
// of them, half of the host time of a steady step. The bytes are only compared for equality.
#include "fingerprint.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace {

void put(std::string& out, std::uint64_t value) { out.append(reinterpret_cast<const char*>(&value), sizeof value); }

// The tensor of a list item, or nullptr (Python error set) if it is neither a tensor nor None.
const at::Tensor* tensor_of(PyObject* item, const char* list) {
  if (!THPVariable_Check(item)) {
    PyErr_Format(PyExc_TypeError, "layout_fingerprint: %s must hold tensors or None, not %s", list,
                 Py_TYPE(item)->tp_name);
    return nullptr;
  }
  return &THPVariable_Unpack(item);
}

}  // namespace

namespace gmt {

PyObject* layout_fingerprint(PyObject*, PyObject* args) {
  PyObject *objects, *addressed, *strided;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &objects, &PyList_Type, &addressed, &PyList_Type, &strided)) {
    return nullptr;
  }
  std::string out;
  out.reserve(8 * (PyList_GET_SIZE(objects) + PyList_GET_SIZE(addressed) + 3 * PyList_GET_SIZE(strided)));
  try {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); ++i) {  // id(x)
      put(out, reinterpret_cast<std::uintptr_t>(PyList_GET_ITEM(objects, i)));
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(addressed); ++i) {  // t.data_ptr()
      PyObject* item = PyList_GET_ITEM(addressed, i);
      if (item == Py_None) {
        put(out, 0);
        continue;
      }
      const at::Tensor* t = tensor_of(item, "addressed");
      if (t == nullptr) return nullptr;
      put(out, reinterpret_cast<std::uintptr_t>(t->data_ptr()));
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(strided); ++i) {  // t.dim(), t.stride()
      PyObject* item = PyList_GET_ITEM(strided, i);
      if (item == Py_None) {
        put(out, UINT64_MAX);  // (a 0-d tensor puts 0)
        continue;
      }
      const at::Tensor* t = tensor_of(item, "strided");
      if (t == nullptr) return nullptr;
      put(out, static_cast<std::uint64_t>(t->dim()));
      for (std::int64_t stride : t->strides()) put(out, static_cast<std::uint64_t>(stride));
    }
  } catch (const std::exception& e) {  // e.g. a sparse tensor has no data_ptr
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

}  // namespace gmt
