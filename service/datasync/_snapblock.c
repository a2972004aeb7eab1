/* The compiled block fill of datasync.snapshotfile: add one snapshot block's entries to a table's
 * dict without building lists of keys and values. It mirrors snapshotfile.fill_block_py check
 * for check and message for message (tests/test_snapshotfile.py compares them); read that first.
 *
 * The keys are decoded once for the whole block and cut by their lengths in characters; for the
 * ASCII keys of most tables that decode is a copy, and each key a small allocation and memcpy. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint32_t u32_at(const unsigned char *p) { /* little-endian, on any host */
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The sum of a block's n lengths; ``raw`` must hold them (4 * n bytes). */
static uint64_t sum_u32(const unsigned char *raw, Py_ssize_t n) {
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) total += u32_at(raw + 4 * i);
    return total;
}

/* ``raw`` holds exactly n lengths; else ValueError. */
static int check_count(Py_ssize_t n, PyObject *raw, const char *what) {
    Py_ssize_t size = PyBytes_GET_SIZE(raw);
    if (size % 4 == 0 && size / 4 == n) return 0;
    PyErr_Format(PyExc_ValueError, "%zd entries but %zd bytes of %s lengths", n, size, what);
    return -1;
}

/* The block's keys as one str, checked against the key lengths (UTF-8, characters adding up, a
 * NUL after every key but the last); NULL with ValueError if they do not match. */
static PyObject *block_keys(Py_ssize_t n, PyObject *text, PyObject *key_lengths) {
    if (check_count(n, key_lengths, "key") < 0) return NULL;
    PyObject *keys = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), NULL);
    if (keys == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        PyErr_Format(PyExc_ValueError, "keys are not UTF-8: %S", value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return NULL;
    }
    const unsigned char *lengths = (const unsigned char *)PyBytes_AS_STRING(key_lengths);
    uint64_t chars = sum_u32(lengths, n) + (uint64_t)(n - 1);
    Py_ssize_t have = PyUnicode_GET_LENGTH(keys);
    if (chars != (uint64_t)have) {
        PyErr_Format(PyExc_ValueError, "key lengths and NULs add up to %llu characters, the keys are %zd",
                     (unsigned long long)chars, have);
        Py_DECREF(keys);
        return NULL;
    }
    int kind = PyUnicode_KIND(keys);
    const void *data = PyUnicode_DATA(keys);
    Py_ssize_t at = 0; /* stays below ``have``: the lengths add up */
    for (Py_ssize_t i = 0; i < n - 1; i++) {
        at += u32_at(lengths + 4 * i);
        if (PyUnicode_READ(kind, data, at) != 0) {
            PyErr_Format(PyExc_ValueError, "no NUL after key %zd: a key length is wrong", i);
            Py_DECREF(keys);
            return NULL;
        }
        at++;
    }
    return keys;
}

/* fill(data, n, text, key_lengths, value_lengths, body, intern): see snapshotfile.fill_block_py. */
static PyObject *py_fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 || !PyDict_Check(args[0]) || !PyBytes_Check(args[2]) || !PyBytes_Check(args[3]) ||
        !PyBytes_Check(args[4]) || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "fill(data: dict, n: int, text: bytes, key_lengths: bytes, value_lengths: bytes, "
                        "body: bytes, intern: bool)");
        return NULL;
    }
    PyObject *data = args[0], *text = args[2], *key_lengths = args[3], *value_lengths = args[4], *body = args[5];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    int intern = PyObject_IsTrue(args[6]);
    if (intern < 0) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "a block holds at least one entry, not %zd", n);
    if (check_count(n, value_lengths, "value") < 0) return NULL;
    const unsigned char *vlen = (const unsigned char *)PyBytes_AS_STRING(value_lengths);
    uint64_t total = sum_u32(vlen, n);
    if (total != (uint64_t)PyBytes_GET_SIZE(body))
        return PyErr_Format(PyExc_ValueError, "value lengths add up to %llu bytes, the values are %zd",
                            (unsigned long long)total, PyBytes_GET_SIZE(body));
    PyObject *keys = block_keys(n, text, key_lengths);
    if (keys == NULL) return NULL;
    /* Every length is checked: below, keys and values are cut within their buffers. */
    const unsigned char *klen = (const unsigned char *)PyBytes_AS_STRING(key_lengths);
    const char *values = PyBytes_AS_STRING(body);
    Py_ssize_t at = 0, offset = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t key_length = u32_at(klen + 4 * i), value_length = u32_at(vlen + 4 * i);
        PyObject *key = PyUnicode_Substring(keys, at, at + key_length);
        if (key == NULL) goto error;
        if (intern) PyUnicode_InternInPlace(&key);
        PyObject *value = PyBytes_FromStringAndSize(values + offset, value_length);
        if (value == NULL) {
            Py_DECREF(key);
            goto error;
        }
        int rc = PyDict_SetItem(data, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) goto error;
        at += key_length + 1;
        offset += value_length;
    }
    Py_DECREF(keys);
    return PyLong_FromSsize_t(n);
error:
    Py_DECREF(keys);
    return NULL;
}

static PyMethodDef methods[] = {
    {"fill", (PyCFunction)(void (*)(void))py_fill, METH_FASTCALL,
     "fill(data, n, text, key_lengths, value_lengths, body, intern): see snapshotfile.fill_block_py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "datasync._snapblock", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__snapblock(void) { return PyModule_Create(&module); }
