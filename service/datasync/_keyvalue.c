/* The compiled KeyValue of datasync.api, and the iterator that builds one per key of a resync
 * without a Python call per key (the generator and Python class it replaces cost ~0.45 us a key).
 * It mirrors api._PyKeyValue and api._py_keyvalues (tests/test_keyvalue.py compares them); read
 * those first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#define TRAILER_SIZE 18 /* table.py: "<qqH" offset, timestamp, partition */

static PyObject *s_decode;

typedef struct {
    PyObject_HEAD
    PyObject *topic;  /* str */
    PyObject *key;    /* str */
    PyObject *packed; /* bytes: the value, then the trailer */
    PyObject *codec;
    PyObject *value;  /* codec.decode(raw value), NULL until first read */
} KeyValue;

static PyTypeObject KeyValueType;

/* A new KeyValue. Keys and topics are str, so that only the codec and the value can be part of
 * a reference cycle (tp_clear breaks those). */
static PyObject *keyvalue(PyObject *topic, PyObject *key, PyObject *packed, PyObject *codec) {
    if (!PyUnicode_Check(topic) || !PyUnicode_Check(key) || !PyBytes_Check(packed)) {
        PyErr_SetString(PyExc_TypeError, "KeyValue(topic: str, key: str, packed: bytes, codec)");
        return NULL;
    }
    if (PyBytes_GET_SIZE(packed) < TRAILER_SIZE) {
        PyErr_Format(PyExc_ValueError, "a packed state of %zd bytes has no %d-byte trailer",
                     PyBytes_GET_SIZE(packed), TRAILER_SIZE);
        return NULL;
    }
    KeyValue *self = PyObject_GC_New(KeyValue, &KeyValueType);
    if (self == NULL) return NULL;
    self->topic = Py_NewRef(topic);
    self->key = Py_NewRef(key);
    self->packed = Py_NewRef(packed);
    self->codec = Py_NewRef(codec);
    self->value = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *kv_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"topic", "key", "packed", "codec", NULL};
    PyObject *topic, *key, *packed, *codec;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:KeyValue", names, &topic, &key, &packed, &codec))
        return NULL;
    return keyvalue(topic, key, packed, codec);
}

static int kv_traverse(KeyValue *self, visitproc visit, void *arg) {
    Py_VISIT(self->topic);
    Py_VISIT(self->key);
    Py_VISIT(self->codec);
    Py_VISIT(self->value);
    return 0;
}

static int kv_clear(KeyValue *self) {
    Py_CLEAR(self->codec);
    Py_CLEAR(self->value);
    return 0;
}

static void kv_dealloc(KeyValue *self) {
    PyObject_GC_UnTrack(self);
    Py_DECREF(self->topic);
    Py_DECREF(self->key);
    Py_DECREF(self->packed);
    kv_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *raw_value(KeyValue *self, void *closure) {
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->packed), PyBytes_GET_SIZE(self->packed) - TRAILER_SIZE);
}

static PyObject *value(KeyValue *self, void *closure) {
    if (self->value == NULL) {
        if (self->codec == NULL) { /* only after tp_clear */
            PyErr_SetString(PyExc_AttributeError, "value");
            return NULL;
        }
        PyObject *raw = raw_value(self, NULL);
        if (raw == NULL) return NULL;
        PyObject *decoded = PyObject_CallMethodOneArg(self->codec, s_decode, raw);
        Py_DECREF(raw);
        if (decoded == NULL) return NULL;
        Py_XSETREF(self->value, decoded); /* the codec may have read kv.value itself: this one wins */
    }
    return Py_NewRef(self->value);
}

/* The little-endian integer of n bytes at ``at`` in the trailer. */
static uint64_t trailer(KeyValue *self, int at, int n) {
    const unsigned char *p =
        (const unsigned char *)PyBytes_AS_STRING(self->packed) + PyBytes_GET_SIZE(self->packed) - TRAILER_SIZE + at;
    uint64_t v = 0;
    while (n--) v = v << 8 | p[n];
    return v;
}

static long long offset_of(KeyValue *self) { return (long long)(int64_t)trailer(self, 0, 8); }

static PyObject *revision(KeyValue *self, void *closure) { return PyLong_FromLongLong(offset_of(self)); }

static PyObject *timestamp(KeyValue *self, void *closure) {
    return PyLong_FromLongLong((long long)(int64_t)trailer(self, 8, 8));
}

static PyObject *partition(KeyValue *self, void *closure) { return PyLong_FromLong((long)trailer(self, 16, 2)); }

static PyObject *kv_repr(KeyValue *self) {
    return PyUnicode_FromFormat("KeyValue(%R, %R, revision=%lld)", self->topic, self->key, offset_of(self));
}

/* A copy (shallow or deep) shares the codec (configuration, not data) and decodes its own value. */
static PyObject *kv_copy(KeyValue *self, PyObject *unused) {
    if (self->codec == NULL) { /* cleared by the garbage collector */
        PyErr_SetString(PyExc_RuntimeError, "KeyValue cleared");
        return NULL;
    }
    return keyvalue(self->topic, self->key, self->packed, self->codec);
}

static PyObject *kv_deepcopy(KeyValue *self, PyObject *memo) { return kv_copy(self, NULL); }

/* Not pickled: it holds its topic's codec, and a registry codec holds credentials. */
static PyObject *kv_reduce(KeyValue *self, PyObject *unused) {
    PyErr_SetString(PyExc_TypeError, "a KeyValue is not pickled (it holds its topic's codec): keep kv.key and kv.value");
    return NULL;
}

static PyMethodDef kv_methods[] = {
    {"__copy__", (PyCFunction)kv_copy, METH_NOARGS, NULL},
    {"__deepcopy__", (PyCFunction)kv_deepcopy, METH_O, NULL},
    {"__reduce__", (PyCFunction)kv_reduce, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef kv_members[] = {
    {"topic", T_OBJECT_EX, offsetof(KeyValue, topic), READONLY, NULL},
    {"key", T_OBJECT_EX, offsetof(KeyValue, key), READONLY, NULL},
    {NULL},
};

static PyGetSetDef kv_getset[] = {
    {"value", (getter)value, NULL, "The decoded value, decoded on first access.", NULL},
    {"raw_value", (getter)raw_value, NULL, "The encoded value.", NULL},
    {"revision", (getter)revision, NULL, "The Kafka offset of the record that set this value.", NULL},
    {"partition", (getter)partition, NULL, "The Kafka partition of that record.", NULL},
    {"timestamp", (getter)timestamp, NULL, "Record timestamp in milliseconds since the epoch.", NULL},
    {NULL},
};

static PyTypeObject KeyValueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "datasync.api.KeyValue", /* where users import it from, as the Python class */
    .tp_basicsize = sizeof(KeyValue),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "KeyValue(topic, key, packed, codec)\n--\n\n"
              "One current key/value of a resync. The value is decoded on first access.",
    .tp_new = kv_new,
    .tp_dealloc = (destructor)kv_dealloc,
    .tp_traverse = (traverseproc)kv_traverse,
    .tp_clear = (inquiry)kv_clear,
    .tp_repr = (reprfunc)kv_repr,
    .tp_methods = kv_methods,
    .tp_members = kv_members,
    .tp_getset = kv_getset,
};

/* States looked up in one go: a resync's keys come in key order and its states are scattered over a
 * large dict, so each lookup misses the cache; one after the other, the misses overlap. */
#define AHEAD 16

/* The KeyValue of each key of a list, its state looked up in a mapping as it goes. */
typedef struct {
    PyObject_HEAD
    PyObject *topic;
    PyObject *codec;
    PyObject *keys;     /* list */
    PyObject *data;     /* mapping: key -> packed state */
    Py_ssize_t next;    /* the index in keys of the next lookup; PY_SSIZE_T_MAX once finished */
    PyObject *ahead[AHEAD]; /* KeyValues built and not yet returned: ahead[at:count] */
    int at, count;
    PyObject *error[3]; /* what the lookup after them raised (type, value, traceback) */
    int running;        /* in a lookup, which may run Python code that calls us */
} Iter;

static int iter_traverse(Iter *it, visitproc visit, void *arg) {
    Py_VISIT(it->topic);
    Py_VISIT(it->codec);
    Py_VISIT(it->keys);
    Py_VISIT(it->data);
    for (int i = it->at; i < it->count; i++) Py_VISIT(it->ahead[i]);
    for (int i = 0; i < 3; i++) Py_VISIT(it->error[i]);
    return 0;
}

static int iter_clear(Iter *it) {
    Py_CLEAR(it->topic);
    Py_CLEAR(it->codec);
    Py_CLEAR(it->keys);
    Py_CLEAR(it->data);
    for (; it->at < it->count; it->at++) Py_CLEAR(it->ahead[it->at]);
    for (int i = 0; i < 3; i++) Py_CLEAR(it->error[i]);
    return 0;
}

static void iter_dealloc(Iter *it) {
    PyObject_GC_UnTrack(it);
    iter_clear(it);
    PyObject_GC_Del(it);
}

/* Looks the next states up, up to AHEAD, then builds their KeyValues. A failure keeps its
 * exception for when its key is reached: the generator this replaces raised it there, and ended. */
static void fill(Iter *it) {
    PyObject *keys[AHEAD], *states[AHEAD];
    int n = 0;
    for (; n < AHEAD && it->next < PyList_GET_SIZE(it->keys); n++, it->next++) {
        keys[n] = Py_NewRef(PyList_GET_ITEM(it->keys, it->next));
        states[n] = PyObject_GetItem(it->data, keys[n]);
        if (states[n] == NULL) {
            Py_DECREF(keys[n]);
            PyErr_Fetch(&it->error[0], &it->error[1], &it->error[2]);
            break;
        }
    }
    it->at = it->count = 0;
    for (int i = 0; i < n; i++) {
        if (it->count == i) { /* nothing failed yet */
            PyObject *kv = keyvalue(it->topic, keys[i], states[i], it->codec);
            if (kv != NULL) {
                it->ahead[it->count++] = kv;
            } else {
                for (int j = 0; j < 3; j++) Py_CLEAR(it->error[j]); /* a later key's */
                PyErr_Fetch(&it->error[0], &it->error[1], &it->error[2]);
            }
        }
        Py_DECREF(keys[i]);
        Py_DECREF(states[i]);
    }
    if (it->count < AHEAD) it->next = PY_SSIZE_T_MAX; /* the keys ran out, or a failure ends it */
}

static PyObject *iter_next(Iter *it) {
    if (it->running) {
        PyErr_SetString(PyExc_ValueError, "keyvalues iterator already executing");
        return NULL;
    }
    if (it->at == it->count && it->error[0] == NULL && it->keys != NULL /* not after tp_clear */) {
        it->running = 1;
        fill(it);
        it->running = 0;
    }
    if (it->at < it->count) {
        PyObject *kv = it->ahead[it->at];
        it->ahead[it->at++] = NULL;
        return kv;
    }
    PyErr_Restore(it->error[0], it->error[1], it->error[2]); /* StopIteration if none */
    it->error[0] = it->error[1] = it->error[2] = NULL;
    return NULL;
}

static PyTypeObject IterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "datasync._keyvalue.keyvalue_iterator",
    .tp_basicsize = sizeof(Iter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)iter_dealloc,
    .tp_traverse = (traverseproc)iter_traverse,
    .tp_clear = (inquiry)iter_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)iter_next,
};

static PyObject *keyvalues(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyUnicode_Check(args[0]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "keyvalues(topic: str, codec, keys: list, data: mapping)");
        return NULL;
    }
    Iter *it = PyObject_GC_New(Iter, &IterType);
    if (it == NULL) return NULL;
    it->topic = Py_NewRef(args[0]);
    it->codec = Py_NewRef(args[1]);
    it->keys = Py_NewRef(args[2]);
    it->data = Py_NewRef(args[3]);
    it->next = 0;
    it->at = it->count = it->running = 0;
    it->error[0] = it->error[1] = it->error[2] = NULL;
    PyObject_GC_Track(it);
    return (PyObject *)it;
}

static PyMethodDef methods[] = {
    {"keyvalues", (PyCFunction)(void (*)(void))keyvalues, METH_FASTCALL,
     "keyvalues(topic, codec, keys, data): see api._py_keyvalues"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "datasync._keyvalue", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__keyvalue(void) {
    s_decode = PyUnicode_InternFromString("decode");
    if (s_decode == NULL || PyType_Ready(&KeyValueType) < 0 || PyType_Ready(&IterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddType(m, &KeyValueType) < 0) Py_CLEAR(m);
    return m;
}
