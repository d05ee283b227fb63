// Schema of the partial-convolution ops (namespace pconv) and the Python module.
//
// This file is always compiled: the CPU and CUDA kernels only add TORCH_LIBRARY_IMPL
// blocks, so a CPU-only build needs no #ifdef. The math is in shared/DESIGN.md, §1.
#include "pconv.h"
#include "cpu/workspace.h"

#include <Python.h>
#include <torch/library.h>

namespace pconv {

TORCH_LIBRARY(pconv, m) {
  m.def(schema::kForward);
  m.def(schema::kBackward);
  m.def(schema::kTrain);
  m.def(schema::kTrainBackward);
}

}  // namespace pconv

// The library is loaded as a Python extension module (`pconv_cuda._C`) so that a plain
// import finds it next to the package. The ops live in torch.ops.pconv; the module itself
// only exposes the CPU block cache (see cpu/workspace.h).
namespace {

PyObject* py_release_cpu_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(pconv::release_cached_blocks());
}

PyObject* py_cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(pconv::cached_block_bytes());
}

PyMethodDef module_methods[] = {
    {"release_cpu_cache", py_release_cpu_cache, METH_NOARGS,
     "Free the idle CPU blocks kept for x * m; returns the bytes freed."},
    {"cpu_cache_bytes", py_cpu_cache_bytes, METH_NOARGS,
     "Bytes of idle CPU blocks kept for x * m."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
