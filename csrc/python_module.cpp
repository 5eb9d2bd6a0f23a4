// seqfuse._C is imported only for its op registrations (TORCH_LIBRARY in ops.cpp and
// the kernels): the Python module itself defines nothing.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
