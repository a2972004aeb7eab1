/* The compiled Avro walk of datasync.avrowalk: check a body without building objects, decode it
 * in one pass, and fold aiokafka records into a state table. It mirrors the pure-Python walk in
 * avrowalk.py message for message (tests/test_avrowalk.py compares them); read that first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { OP_NULL, OP_BOOLEAN, OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BYTES, OP_STRING,
       OP_FIXED, OP_ENUM, OP_RECORD, OP_ARRAY, OP_MAP, OP_UNION };
#define MAX_DEPTH 200
#define MAX_EMPTY_ITEMS 1000000 /* avrowalk.MAX_EMPTY_ITEMS */
#define HEADER_SIZE 10
#define TRAILER_SIZE 18 /* table.py: "<qqH" offset, timestamp, partition */

typedef struct {
    const int32_t *ops;
    Py_ssize_t nops;
    PyObject *consts;          /* tuple of tuples of str; used when building */
    const unsigned char *buf;
    Py_ssize_t len;
    char msg[128];             /* why the body is invalid */
    Py_ssize_t trailing;       /* bytes after a valid body */
    uint64_t empty_left;       /* zero-size array items still allowed in this body */
    int pyerr;                 /* a Python exception is set (MemoryError...) */
} Walk;

static int invalid(Walk *w, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    PyOS_vsnprintf(w->msg, sizeof w->msg, fmt, args);
    va_end(args);
    return -1;
}

static int bad_op(Walk *w, Py_ssize_t at) {
    PyErr_Format(PyExc_ValueError, "corrupt Avro program at %zd", at);
    w->pyerr = 1;
    return -1;
}

static int varint(Walk *w, Py_ssize_t *pos, int64_t *out) {
    Py_ssize_t start = *pos, p = *pos;
    uint64_t value = 0;
    int shift = 0;
    for (;;) {
        if (p >= w->len) return invalid(w, "truncated at byte %zd", start);
        unsigned char b = w->buf[p++];
        if (shift == 63 && b > 1) return invalid(w, "varint overflows 64 bits at byte %zd", start);
        value |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) break;
        shift += 7;
    }
    *out = (int64_t)(value >> 1) ^ -(int64_t)(value & 1);
    *pos = p;
    return 0;
}

static int length(Walk *w, Py_ssize_t *pos, Py_ssize_t *out) {
    Py_ssize_t start = *pos;
    int64_t n;
    if (varint(w, pos, &n) < 0) return -1;
    if (n < 0) return invalid(w, "negative length %lld at byte %zd", (long long)n, start);
    if ((uint64_t)n > (uint64_t)(w->len - *pos)) return invalid(w, "truncated at byte %zd", start);
    *out = (Py_ssize_t)n;
    return 0;
}

/* A string of n bytes at p (after its length): valid UTF-8, as Python's strict decoder says;
 * its str if ``build``. */
static PyObject *text(Walk *w, Py_ssize_t start, Py_ssize_t p, Py_ssize_t n, int build) {
    const unsigned char *s = w->buf + p;
    if (!build) {
        Py_ssize_t i = 0;
        while (i < n && s[i] < 0x80) i++;
        if (i == n) return Py_None; /* borrowed: only tested against NULL */
    }
    PyObject *str = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    if (str == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) { w->pyerr = 1; return NULL; }
        PyErr_Clear();
        invalid(w, "invalid UTF-8 at byte %zd", start);
        return NULL;
    }
    if (!build) { Py_DECREF(str); return Py_None; }
    return str;
}

static int walk(Walk *w, Py_ssize_t at, Py_ssize_t *pos, int depth, PyObject **out);

static int nested(Walk *w, Py_ssize_t at, Py_ssize_t *pos, int depth, PyObject **out) {
    if (depth >= MAX_DEPTH) return invalid(w, "nesting deeper than %d at byte %zd", MAX_DEPTH, *pos);
    if (Py_EnterRecursiveCall(" while walking an Avro body")) { w->pyerr = 1; return -1; }
    int rc = walk(w, at, pos, depth + 1, out);
    Py_LeaveRecursiveCall();
    return rc;
}

#define OP(i) ((i) < w->nops ? w->ops[i] : -1)
#define PUT(obj) do { PyObject *o_ = (obj); if (o_ == NULL) { w->pyerr = 1; return -1; } *out = o_; } while (0)

/* Walk the node at ``at`` from *pos; with ``out`` non-NULL, build its value there. */
static int walk(Walk *w, Py_ssize_t at, Py_ssize_t *pos, int depth, PyObject **out) {
    Py_ssize_t start = *pos;
    int64_t n;
    switch (OP(at)) {
    case OP_NULL:
        if (out) PUT(Py_NewRef(Py_None));
        return 0;
    case OP_BOOLEAN: {
        if (*pos >= w->len) return invalid(w, "truncated at byte %zd", start);
        unsigned char b = w->buf[*pos];
        if (b > 1) return invalid(w, "boolean byte %d at byte %zd", (int)b, start);
        *pos += 1;
        if (out) PUT(Py_NewRef(b ? Py_True : Py_False));
        return 0;
    }
    case OP_INT:
    case OP_LONG:
        if (varint(w, pos, &n) < 0) return -1;
        if (OP(at) == OP_INT && (n < INT32_MIN || n > INT32_MAX))
            return invalid(w, "int out of range at byte %zd", start);
        if (out) PUT(PyLong_FromLongLong(n));
        return 0;
    case OP_FLOAT:
    case OP_DOUBLE:
    case OP_FIXED: {
        Py_ssize_t size = OP(at) == OP_FLOAT ? 4 : OP(at) == OP_DOUBLE ? 8 : OP(at + 1);
        if (size < 0) return bad_op(w, at);
        if (size > w->len - *pos) return invalid(w, "truncated at byte %zd", start);
        const unsigned char *s = w->buf + *pos;
        *pos += size;
        if (!out) return 0;
        if (OP(at) == OP_FIXED) PUT(PyBytes_FromStringAndSize((const char *)s, size));
        else if (size == 4) PUT(PyFloat_FromDouble(PyFloat_Unpack4((const char *)s, 1)));
        else PUT(PyFloat_FromDouble(PyFloat_Unpack8((const char *)s, 1)));
        return 0;
    }
    case OP_BYTES:
    case OP_STRING: {
        Py_ssize_t len;
        if (length(w, pos, &len) < 0) return -1;
        Py_ssize_t p = *pos;
        *pos += len;
        if (OP(at) == OP_STRING) {
            PyObject *s = text(w, start, p, len, out != NULL);
            if (s == NULL) return -1;
            if (out) *out = s;
        } else if (out) {
            PUT(PyBytes_FromStringAndSize((const char *)w->buf + p, len));
        }
        return 0;
    }
    case OP_ENUM:
    case OP_UNION: {
        int32_t count = OP(at + 1);
        if (varint(w, pos, &n) < 0) return -1;
        if (n < 0 || n >= count)
            return invalid(w, "%s index %lld not in 0..%d at byte %zd", OP(at) == OP_ENUM ? "enum" : "union",
                           (long long)n, (int)count - 1, start);
        if (OP(at) == OP_UNION) return nested(w, OP(at + 2 + n), pos, depth, out);
        if (out) {
            PyObject *symbols = PyTuple_GetItem(w->consts, OP(at + 2));
            if (symbols == NULL || !PyTuple_Check(symbols) || n >= PyTuple_GET_SIZE(symbols)) return bad_op(w, at);
            PUT(Py_NewRef(PyTuple_GET_ITEM(symbols, n)));
        }
        return 0;
    }
    case OP_RECORD: {
        int32_t count = OP(at + 1);
        PyObject *names = NULL, *dict = NULL;
        if (out) {
            names = PyTuple_GetItem(w->consts, OP(at + 2));
            if (names == NULL || !PyTuple_Check(names) || PyTuple_GET_SIZE(names) != count) return bad_op(w, at);
            dict = PyDict_New();
            if (dict == NULL) { w->pyerr = 1; return -1; }
        }
        for (int32_t i = 0; i < count; i++) {
            PyObject *value = NULL;
            if (nested(w, OP(at + 3 + i), pos, depth, out ? &value : NULL) < 0) { Py_XDECREF(dict); return -1; }
            if (dict) {
                int rc = PyDict_SetItem(dict, PyTuple_GET_ITEM(names, i), value);
                Py_DECREF(value);
                if (rc < 0) { Py_DECREF(dict); w->pyerr = 1; return -1; }
            }
        }
        if (out) *out = dict;
        return 0;
    }
    case OP_ARRAY:
    case OP_MAP: {
        int is_map = OP(at) == OP_MAP;
        int32_t item_size = OP(at + 2);
        if (item_size < 0) return bad_op(w, at);
        PyObject *coll = NULL;
        if (out) {
            coll = is_map ? PyDict_New() : PyList_New(0);
            if (coll == NULL) { w->pyerr = 1; return -1; }
        }
        for (;;) {
            Py_ssize_t block = *pos, size = -1;
            if (varint(w, pos, &n) < 0) goto fail;
            if (n == 0) break;
            uint64_t count = n < 0 ? 0 - (uint64_t)n : (uint64_t)n; /* no overflow for INT64_MIN */
            if (n < 0 && length(w, pos, &size) < 0) goto fail;
            if (item_size == 0) { /* not bounded by the bytes left, so by MAX_EMPTY_ITEMS in the whole body */
                if (count > w->empty_left) {
                    invalid(w, "block count %llu exceeds %d zero-size items at byte %zd", (unsigned long long)count,
                            MAX_EMPTY_ITEMS, block);
                    goto fail;
                }
                w->empty_left -= count;
            } else if (count > (uint64_t)(w->len - *pos) / (uint64_t)item_size) {
                invalid(w, "block count %llu exceeds the bytes left at byte %zd", (unsigned long long)count, block);
                goto fail;
            }
            Py_ssize_t items = *pos;
            for (uint64_t i = 0; i < count; i++) {
                Py_ssize_t item = *pos;
                PyObject *key = NULL, *value = NULL;
                if (is_map) {
                    Py_ssize_t kstart = *pos, klen;
                    if (length(w, pos, &klen) < 0) goto fail;
                    Py_ssize_t p = *pos;
                    *pos += klen;
                    key = text(w, kstart, p, klen, out != NULL);
                    if (key == NULL) goto fail;
                    if (!out) key = NULL;
                }
                if (nested(w, OP(at + 1), pos, depth, out ? &value : NULL) < 0) { Py_XDECREF(key); goto fail; }
                if (coll) {
                    int rc = is_map ? PyDict_SetItem(coll, key, value) : PyList_Append(coll, value);
                    Py_XDECREF(key);
                    Py_DECREF(value);
                    if (rc < 0) { w->pyerr = 1; goto fail; }
                }
                if (!out && *pos == item) break; /* the rest would walk the same (no) bytes the same way */
            }
            if (size >= 0 && *pos - items != size) {
                invalid(w, "block size %zd does not match its items at byte %zd", size, block);
                goto fail;
            }
        }
        if (out) *out = coll;
        return 0;
    fail:
        Py_XDECREF(coll);
        return -1;
    }
    default:
        return bad_op(w, at);
    }
}

/* Walk program (a datasync.avrowalk.Program) over raw[HEADER_SIZE:]. Returns 0 if it is one
 * valid body, -1 with w->msg set if not, -1 with w->pyerr and an exception set on errors. */
static int run(Walk *w, PyObject *program, PyObject *raw, PyObject **out) {
    if (!PyTuple_Check(program) || PyTuple_GET_SIZE(program) < 3 || !PyBytes_Check(PyTuple_GET_ITEM(program, 0))) {
        PyErr_SetString(PyExc_TypeError, "expected a datasync.avrowalk.Program");
        w->pyerr = 1;
        return -1;
    }
    PyObject *code = PyTuple_GET_ITEM(program, 0);
    w->ops = (const int32_t *)PyBytes_AS_STRING(code);
    w->nops = PyBytes_GET_SIZE(code) / (Py_ssize_t)sizeof(int32_t);
    w->consts = PyTuple_GET_ITEM(program, 2);
    w->buf = (const unsigned char *)PyBytes_AS_STRING(raw);
    w->len = PyBytes_GET_SIZE(raw);
    w->msg[0] = 0;
    w->pyerr = 0;
    w->empty_left = MAX_EMPTY_ITEMS;
    if (out && !PyTuple_Check(w->consts)) {
        PyErr_SetString(PyExc_TypeError, "Program.consts must be a tuple");
        w->pyerr = 1;
        return -1;
    }
    Py_ssize_t pos = HEADER_SIZE;
    if (w->len < HEADER_SIZE) return invalid(w, "truncated at byte %zd", w->len);
    if (walk(w, 0, &pos, 0, out) < 0) return -1;
    if (pos != w->len) {
        if (out) Py_CLEAR(*out);
        w->trailing = w->len - pos;
        return -2;
    }
    return 0;
}

/* The message the pure-Python walk's ValueError carries. */
static PyObject *message(Walk *w, PyObject *program, int rc) {
    PyObject *name = PyTuple_GET_ITEM(program, 1);
    if (rc == -2) return PyUnicode_FromFormat("%zd trailing bytes after %S body", w->trailing, name);
    return PyUnicode_FromFormat("invalid Avro body for %S: %s", name, w->msg);
}

static PyObject *fail_with(Walk *w, PyObject *program, int rc) {
    if (w->pyerr) return NULL;
    PyObject *msg = message(w, program, rc);
    if (msg != NULL) {
        PyErr_SetObject(PyExc_ValueError, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

static PyObject *py_check(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "check(program, raw: bytes)");
        return NULL;
    }
    Walk w;
    int rc = run(&w, args[0], args[1], NULL);
    if (rc < 0) return fail_with(&w, args[0], rc);
    Py_RETURN_NONE;
}

static PyObject *py_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "decode(program, raw: bytes)");
        return NULL;
    }
    Walk w;
    PyObject *value = NULL;
    int rc = run(&w, args[0], args[1], &value);
    if (rc < 0) {
        Py_XDECREF(value);
        return fail_with(&w, args[0], rc);
    }
    return value;
}

static PyObject *s_key, *s_value, *s_offset, *s_partition, *s_timestamp;

static PyObject *rejection(Py_ssize_t i, const char *reason, PyObject *detail) {
    if (detail == NULL) return NULL;
    PyObject *out = Py_BuildValue("(nsN)", i, reason, detail);
    return out;
}

/* The detail of the exception being handled: str(exc). NULL (exception kept) unless it is an
 * Exception (a BaseException like CancelledError propagates). */
static PyObject *caught(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : PyUnicode_FromString("");
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return text;
}

static void put_le(unsigned char *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static int attr_ll(PyObject *record, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(record, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* fold(records, start, data, programs, fallback, limit, intern): see avrowalk.fold_py. */
static PyObject *py_fold(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 || !PyList_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "fold(records: list, start, data: dict, programs, fallback, limit, intern)");
        return NULL;
    }
    PyObject *records = args[0], *data = args[2], *programs = args[3], *fallback = args[4];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    long long limit = PyLong_AsLongLong(args[5]);
    int intern = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (programs != Py_None && !PyDict_Check(programs)) {
        PyErr_SetString(PyExc_TypeError, "programs must be a dict or None");
        return NULL;
    }
    unsigned char last_fp[8];
    PyObject *last_program = NULL; /* borrowed from programs */
    Walk w;
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(records); i++) {
        PyObject *record = PyList_GET_ITEM(records, i);
        PyObject *raw_key = PyObject_GetAttr(record, s_key);
        if (raw_key == NULL) return NULL;
        if (raw_key == Py_None) {
            Py_DECREF(raw_key);
            return rejection(i, "null key", PyUnicode_FromString("a compacted topic needs keys"));
        }
        if (!PyBytes_Check(raw_key)) {
            Py_DECREF(raw_key);
            PyErr_SetString(PyExc_TypeError, "record keys must be bytes");
            return NULL;
        }
        PyObject *key = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw_key), PyBytes_GET_SIZE(raw_key), NULL);
        Py_DECREF(raw_key);
        if (key == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
            return rejection(i, "key not UTF-8", caught());
        }
        if (intern) PyUnicode_InternInPlace(&key);
        PyObject *raw = PyObject_GetAttr(record, s_value);
        if (raw == NULL) { Py_DECREF(key); return NULL; }
        if (raw == Py_None) {
            Py_DECREF(raw);
            int rc = PyDict_DelItem(data, key);
            Py_DECREF(key);
            if (rc < 0) {
                if (!PyErr_ExceptionMatches(PyExc_KeyError)) return NULL;
                PyErr_Clear();
            }
            continue;
        }
        if (!PyBytes_Check(raw)) {
            Py_DECREF(key);
            Py_DECREF(raw);
            PyErr_SetString(PyExc_TypeError, "record values must be bytes");
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(raw);
        const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(raw);
        if (limit >= 0 && len > limit) {
            Py_DECREF(key);
            Py_DECREF(raw);
            return rejection(i, "oversized value",
                             PyUnicode_FromFormat("%zd bytes > max_value_bytes %lld", len, limit));
        }
        PyObject *program = NULL;
        if (programs != Py_None && len >= HEADER_SIZE && buf[0] == 0xC3 && buf[1] == 0x01) {
            if (last_program != NULL && memcmp(last_fp, buf + 2, 8) == 0) {
                program = last_program;
            } else {
                PyObject *fp = PyBytes_FromStringAndSize((const char *)buf + 2, 8);
                if (fp == NULL) { Py_DECREF(key); Py_DECREF(raw); return NULL; }
                program = PyDict_GetItemWithError(programs, fp);
                Py_DECREF(fp);
                if (program == NULL && PyErr_Occurred()) { Py_DECREF(key); Py_DECREF(raw); return NULL; }
                if (program != NULL) {
                    memcpy(last_fp, buf + 2, 8);
                    last_program = program;
                }
            }
        }
        if (program != NULL) {
            int rc = run(&w, program, raw, NULL);
            if (rc < 0) {
                Py_DECREF(key);
                Py_DECREF(raw);
                if (w.pyerr) return NULL;
                return rejection(i, "undecodable value", message(&w, program, rc));
            }
        } else {
            PyObject *r = PyObject_CallOneArg(fallback, raw);
            if (r == NULL) {
                Py_DECREF(key);
                Py_DECREF(raw);
                PyObject *detail = caught();
                return detail == NULL ? NULL : rejection(i, "undecodable value", detail);
            }
            Py_DECREF(r);
        }
        long long offset, partition, timestamp;
        if (attr_ll(record, s_offset, &offset) < 0 || attr_ll(record, s_partition, &partition) < 0 ||
            attr_ll(record, s_timestamp, &timestamp) < 0) {
            Py_DECREF(key);
            Py_DECREF(raw);
            return NULL;
        }
        PyObject *packed = PyBytes_FromStringAndSize(NULL, len + TRAILER_SIZE);
        if (packed == NULL) { Py_DECREF(key); Py_DECREF(raw); return NULL; }
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(packed);
        memcpy(p, buf, len);
        put_le(p + len, (uint64_t)offset, 8);
        put_le(p + len + 8, (uint64_t)timestamp, 8);
        put_le(p + len + 16, (uint64_t)partition, 2);
        Py_DECREF(raw);
        int rc = PyDict_SetItem(data, key, packed);
        Py_DECREF(key);
        Py_DECREF(packed);
        if (rc < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check", (PyCFunction)(void (*)(void))py_check, METH_FASTCALL, "check(program, raw): see avrowalk.check_py"},
    {"decode", (PyCFunction)(void (*)(void))py_decode, METH_FASTCALL, "decode(program, raw): see avrowalk.decode_py"},
    {"fold", (PyCFunction)(void (*)(void))py_fold, METH_FASTCALL, "fold(...): see avrowalk.fold_py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "datasync._avrowalk", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__avrowalk(void) {
    s_key = PyUnicode_InternFromString("key");
    s_value = PyUnicode_InternFromString("value");
    s_offset = PyUnicode_InternFromString("offset");
    s_partition = PyUnicode_InternFromString("partition");
    s_timestamp = PyUnicode_InternFromString("timestamp");
    if (!s_key || !s_value || !s_offset || !s_partition || !s_timestamp) return NULL;
    return PyModule_Create(&module);
}
