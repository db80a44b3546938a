// The Python module of each extension (zfkernels._C, zfkernels._C_cuda): no functions (importing
// it registers the ops), and `sources_digest`, the digest of the csrc/ sources it was compiled
// from.  setup.py defines ZF_SOURCES_DIGEST (zfkernels/_sources.py computes it);
// zfkernels/_compiled.py compares it with the sources beside the package, so that binaries
// built before an edit of csrc/ are named as stale instead of silently running old kernels
// (gpu_check.sh's SKIP_BUILD=auto rebuilds them).
#pragma once

#include <Python.h>

#ifndef ZF_SOURCES_DIGEST
#define ZF_SOURCES_DIGEST unknown  // built without setup.py
#endif
#define ZF_STRINGIFY_(x) #x
#define ZF_STRINGIFY(x) ZF_STRINGIFY_(x)

namespace zf_ops {

inline PyObject* create_module(PyModuleDef* def) {
  PyObject* m = PyModule_Create(def);
  if (m != nullptr && PyModule_AddStringConstant(m, "sources_digest", ZF_STRINGIFY(ZF_SOURCES_DIGEST)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

}  // namespace zf_ops
