/*
 * Compiled twin of replicator.staging.values.py_params: a mirror row's driver parameters
 * from its values, the inner loop of every flush into staging.
 *
 * params(cols, convs, values) -> tuple: for each column name of ``cols``, ``values[name]``
 * passed through its converter ``convs[i]`` — unless the converter is None, or the value is None
 * or already a str (every staging converter returns a str unchanged: the stored form; the text
 * path of logical capture hands most values over in that form, so the converter's Python call
 * is saved). A missing column raises KeyError, as the pure twin does.
 *
 * Optional: setup.py builds it when a C compiler is there; the pure twin runs otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *params(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2]) || PyTuple_GET_SIZE(args[0]) != PyTuple_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "params(cols: tuple, convs: tuple of the same length, values: dict)");
        return NULL;
    }
    PyObject *cols = args[0], *convs = args[1], *values = args[2];
    Py_ssize_t n = PyTuple_GET_SIZE(cols);
    PyObject *out = PyTuple_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(cols, i);
        PyObject *v = PyDict_GetItemWithError(values, name); /* borrowed */
        if (v == NULL) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, name);
            goto fail;
        }
        PyObject *f = PyTuple_GET_ITEM(convs, i);
        PyObject *r;
        if (f == Py_None || v == Py_None || PyUnicode_CheckExact(v)) {
            r = Py_NewRef(v);
        } else {
            Py_INCREF(v); /* held across the call, which may run any Python code */
            r = PyObject_CallOneArg(f, v);
            Py_DECREF(v);
            if (r == NULL) goto fail;
        }
        PyTuple_SET_ITEM(out, i, r);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"params", (PyCFunction)(void (*)(void))params, METH_FASTCALL,
     "params(cols, convs, values) -> tuple: a mirror row's driver parameters."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rows", "Compiled twin of replicator.staging.values.py_params.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
