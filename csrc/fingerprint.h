// See fingerprint.cpp.
#pragma once

#include <Python.h>

namespace gmt {

// layout_fingerprint(objects: list, addressed: list, strided: list) -> bytes: the id of each of
// `objects`, the data_ptr of each of `addressed` (tensor or None: 0), the dim and strides of each
// of `strided` (tensor or None). RuntimeError for a tensor without storage (sparse).
PyObject* layout_fingerprint(PyObject*, PyObject* args);

}  // namespace gmt
