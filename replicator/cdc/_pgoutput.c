/*
 * Compiled twin of the pure-Python pgoutput decoder in replicator/cdc/pgoutput.py.
 *
 * It decodes CopyBoth frames (parse_copy_message) and pgoutput protocol-1 messages
 * (decode_message, with tuple_data and cstring as the pieces) into the very same Python objects
 * as the pure decoder: the dataclasses, the UNCHANGED marker and the ProtocolError class are
 * handed over once by configure() from pgoutput.py, so there is one definition of each.
 *
 * Every read is bounds-checked before it happens; a truncated or hostile message raises
 * ProtocolError with the message the pure decoder gives for the same input (the tests in
 * tests/test_pgoutput_compiled.py feed both the same frames and compare). Keep the order of the
 * checks here in step with the Python code: the first failing check decides the message.
 *
 * Optional: setup.py builds it when a C compiler is there; pgoutput.py falls back to the pure
 * decoder when it cannot be imported.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

/* Handed over by configure(). */
static PyObject *ProtocolError;
static PyObject *Unchanged;
enum { XLogDataT, KeepaliveT, BeginT, CommitT, RelationT, RelationColumnT, TypeMsgT, RowChangeT,
       TruncateT, LogicalMessageT, OriginT, NCLASSES };
static PyObject *op_I, *op_U, *op_D, *public_str;

static uint16_t rd16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t rd32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static uint64_t rd64(const unsigned char *p) { return ((uint64_t)rd32(p) << 32) | rd32(p + 4); }

static int configured(void) {
    if (ProtocolError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_pgoutput.configure() has not been called");
        return 0;
    }
    return 1;
}

static PyObject *truncated(Py_ssize_t pos, unsigned long long need, Py_ssize_t size) {
    PyErr_Format(ProtocolError, "truncated message: %llu bytes needed at offset %zd, %zd in all",
                 need, pos, size);
    return NULL;
}

/* "%R" of chr(kind), as the Python messages use {chr(kind)!r}. */
static PyObject *bad_kind(const char *fmt_head, unsigned char kind, const char *tail) {
    PyObject *ch = PyUnicode_FromOrdinal(kind);
    if (ch == NULL) return NULL;
    PyErr_Format(ProtocolError, "%s%R%s", fmt_head, ch, tail);
    Py_DECREF(ch);
    return NULL;
}

/*
 * How instances are built. The classes are slotted dataclasses without __post_init__: their
 * __init__ only stores its arguments in the slots, in field order. Calling it costs most of the
 * time of a row, so configure() records the slot offsets (from the member descriptors named by
 * __slots__, which a slotted dataclass lists in field order) and make() allocates the object
 * and fills the slots itself: the object is the one __init__ would have built. A class that
 * does not fit (a field that is no plain object slot, a __post_init__) is called instead.
 */
#define MAX_FIELDS 8
typedef struct {
    PyObject *cls;
    Py_ssize_t nfields; /* 0: call cls */
    Py_ssize_t offsets[MAX_FIELDS];
} Maker;

static Maker makers[NCLASSES];

static int maker_init(Maker *m, PyObject *cls) {
    Py_XSETREF(m->cls, Py_NewRef(cls));
    m->nfields = 0;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "configure(): expected a class");
        return -1;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    if (PyObject_HasAttrString(cls, "__post_init__") || tp->tp_alloc == NULL ||
        tp->tp_init == NULL)
        return 0;
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *seq = PySequence_Fast(slots, "__slots__");
    Py_DECREF(slots);
    if (seq == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t offsets[MAX_FIELDS];
    int ok = n > 0 && n <= MAX_FIELDS;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *d = PyObject_GetAttr(cls, PySequence_Fast_GET_ITEM(seq, i));
        if (d == NULL) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        if (Py_IS_TYPE(d, &PyMemberDescr_Type) &&
            ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX &&
            !(((PyMemberDescrObject *)d)->d_member->flags & READONLY))
            offsets[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        else
            ok = 0;
        Py_DECREF(d);
    }
    Py_DECREF(seq);
    if (ok) {
        memcpy(m->offsets, offsets, sizeof(Py_ssize_t) * (size_t)n);
        m->nfields = n;
    }
    return 0;
}

/* An instance of the class from its field values, in field order; steals the references. */
static PyObject *make(Maker *m, PyObject **args, size_t n) {
    PyObject *res = NULL;
    for (size_t i = 0; i < n; i++) {
        if (args[i] == NULL) goto done;
    }
    if (m->nfields == (Py_ssize_t)n) {
        PyTypeObject *tp = (PyTypeObject *)m->cls;
        res = tp->tp_alloc(tp, 0);
        if (res == NULL) goto done;
        for (size_t i = 0; i < n; i++) {
            *(PyObject **)((char *)res + m->offsets[i]) = args[i];
        }
        return res;
    }
    res = PyObject_Vectorcall(m->cls, args, n, NULL);
done:
    for (size_t i = 0; i < n; i++) Py_XDECREF(args[i]);
    return res;
}

/* NUL-terminated UTF-8 string at *pos; advances *pos past the NUL. */
static PyObject *read_cstring(const unsigned char *buf, Py_ssize_t size, Py_ssize_t *pos) {
    Py_ssize_t start = *pos;
    const unsigned char *end = NULL;
    if (start >= 0 && start < size) end = memchr(buf + start, 0, (size_t)(size - start));
    if (end == NULL) {
        PyErr_Format(ProtocolError, "unterminated string at offset %zd", start);
        return NULL;
    }
    Py_ssize_t len = (Py_ssize_t)(end - (buf + start));
    PyObject *s = PyUnicode_DecodeUTF8((const char *)buf + start, len, NULL);
    if (s == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            PyErr_Format(ProtocolError, "invalid UTF-8 in the string at offset %zd", start);
        }
        return NULL;
    }
    *pos = start + len + 1;
    return s;
}

/* TupleData at *pos: a list of bytes | None | UNCHANGED; advances *pos past it. */
static PyObject *read_tuple(const unsigned char *buf, Py_ssize_t size, Py_ssize_t *pos_io) {
    Py_ssize_t pos = *pos_io;
    if (pos + 2 > size) return truncated(pos, 2, size);
    Py_ssize_t n = rd16(buf + pos);
    pos += 2;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v;
        if (pos >= size) {
            truncated(pos, 1, size);
            goto fail;
        }
        unsigned char kind = buf[pos];
        pos += 1;
        if (kind == 't' || kind == 'b') {
            if (pos + 4 > size) {
                truncated(pos, 4, size);
                goto fail;
            }
            uint32_t ln = rd32(buf + pos);
            pos += 4;
            if ((unsigned long long)pos + ln > (unsigned long long)size) {
                truncated(pos, ln, size);
                goto fail;
            }
            v = PyBytes_FromStringAndSize((const char *)buf + pos, (Py_ssize_t)ln);
            if (v == NULL) goto fail;
            pos += (Py_ssize_t)ln;
        } else if (kind == 'n') {
            v = Py_NewRef(Py_None);
        } else if (kind == 'u') {
            v = Py_NewRef(Unchanged);
        } else {
            PyObject *at = PyUnicode_FromFormat(" at offset %zd", pos - 1);
            if (at != NULL) {
                PyObject *ch = PyUnicode_FromOrdinal(kind);
                if (ch != NULL) {
                    PyErr_Format(ProtocolError, "unknown tuple data kind %R%U", ch, at);
                    Py_DECREF(ch);
                }
                Py_DECREF(at);
            }
            goto fail;
        }
        PyList_SET_ITEM(out, i, v);
    }
    *pos_io = pos;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *decode(const unsigned char *buf, Py_ssize_t size) {
    if (size == 0) {
        PyErr_SetString(ProtocolError, "empty pgoutput message");
        return NULL;
    }
    unsigned char kind = buf[0];
    Py_ssize_t pos;
    switch (kind) {
    case 'I': {
        if (size < 5) return truncated(1, 4, size);
        uint32_t rel = rd32(buf + 1);
        pos = 6; /* 5 is 'N' */
        PyObject *new = read_tuple(buf, size, &pos);
        if (new == NULL) return NULL;
        PyObject *args[] = {Py_NewRef(op_I), PyLong_FromUnsignedLong(rel), new, Py_NewRef(Py_None),
                            Py_NewRef(Py_False)};
        return make(&makers[RowChangeT], args, 5);
    }
    case 'U': {
        if (size < 6) return truncated(1, 5, size);
        uint32_t rel = rd32(buf + 1);
        pos = 5;
        PyObject *old = NULL;
        int old_is_key = 0;
        unsigned char marker = buf[pos];
        if (marker == 'K' || marker == 'O') {
            old_is_key = marker == 'K';
            pos += 1;
            old = read_tuple(buf, size, &pos);
            if (old == NULL) return NULL;
            if (pos >= size) {
                Py_DECREF(old);
                return truncated(pos, 1, size);
            }
            marker = buf[pos];
        }
        if (marker != 'N') {
            Py_XDECREF(old);
            PyErr_Format(ProtocolError, "update message without new tuple (offset %zd)", pos);
            return NULL;
        }
        pos += 1;
        PyObject *new = read_tuple(buf, size, &pos);
        if (new == NULL) {
            Py_XDECREF(old);
            return NULL;
        }
        PyObject *args[] = {Py_NewRef(op_U), PyLong_FromUnsignedLong(rel), new,
                            old ? old : Py_NewRef(Py_None), PyBool_FromLong(old_is_key)};
        return make(&makers[RowChangeT], args, 5);
    }
    case 'D': {
        if (size < 6) return truncated(1, 5, size);
        uint32_t rel = rd32(buf + 1);
        int old_is_key = buf[5] == 'K';
        pos = 6;
        PyObject *old = read_tuple(buf, size, &pos);
        if (old == NULL) return NULL;
        PyObject *args[] = {Py_NewRef(op_D), PyLong_FromUnsignedLong(rel), Py_NewRef(Py_None), old,
                            PyBool_FromLong(old_is_key)};
        return make(&makers[RowChangeT], args, 5);
    }
    case 'B': {
        if (size < 21) return truncated(1, 20, size);
        PyObject *args[] = {PyLong_FromUnsignedLongLong(rd64(buf + 1)),
                            PyLong_FromLongLong((int64_t)rd64(buf + 9)),
                            PyLong_FromUnsignedLong(rd32(buf + 17))};
        return make(&makers[BeginT], args, 3);
    }
    case 'C': {
        if (size < 26) return truncated(1, 25, size);
        PyObject *args[] = {PyLong_FromLong(buf[1]), PyLong_FromUnsignedLongLong(rd64(buf + 2)),
                            PyLong_FromUnsignedLongLong(rd64(buf + 10)),
                            PyLong_FromLongLong((int64_t)rd64(buf + 18))};
        return make(&makers[CommitT], args, 4);
    }
    case 'R': {
        if (size < 5) return truncated(1, 4, size);
        uint32_t oid = rd32(buf + 1);
        pos = 5;
        PyObject *ns = NULL, *name = NULL, *ident = NULL, *cols = NULL;
        ns = read_cstring(buf, size, &pos);
        if (ns == NULL) goto rfail;
        name = read_cstring(buf, size, &pos);
        if (name == NULL) goto rfail;
        if (pos + 3 > size) {
            truncated(pos, 3, size);
            goto rfail;
        }
        ident = PyUnicode_FromOrdinal(buf[pos]);
        if (ident == NULL) goto rfail;
        Py_ssize_t ncols = rd16(buf + pos + 1);
        pos += 3;
        cols = PyList_New(0);
        if (cols == NULL) goto rfail;
        for (Py_ssize_t i = 0; i < ncols; i++) {
            if (pos >= size) {
                truncated(pos, 1, size);
                goto rfail;
            }
            unsigned char flags = buf[pos];
            pos += 1;
            PyObject *cname = read_cstring(buf, size, &pos);
            if (cname == NULL) goto rfail;
            if (pos + 8 > size) {
                Py_DECREF(cname);
                truncated(pos, 8, size);
                goto rfail;
            }
            PyObject *cargs[] = {cname, PyLong_FromUnsignedLong(rd32(buf + pos)),
                                 PyLong_FromLong((int32_t)rd32(buf + pos + 4)),
                                 PyBool_FromLong(flags & 1)};
            pos += 8;
            PyObject *col = make(&makers[RelationColumnT], cargs, 4);
            if (col == NULL) goto rfail;
            int rc = PyList_Append(cols, col);
            Py_DECREF(col);
            if (rc < 0) goto rfail;
        }
        if (PyUnicode_GET_LENGTH(ns) == 0) Py_SETREF(ns, Py_NewRef(public_str));
        PyObject *args[] = {PyLong_FromUnsignedLong(oid), ns, name, ident, cols};
        return make(&makers[RelationT], args, 5);
    rfail:
        Py_XDECREF(ns);
        Py_XDECREF(name);
        Py_XDECREF(ident);
        Py_XDECREF(cols);
        return NULL;
    }
    case 'T': {
        if (size < 6) return truncated(1, 5, size);
        uint32_t n = rd32(buf + 1);
        unsigned char opts = buf[5];
        if (6 + 4 * (unsigned long long)n > (unsigned long long)size)
            return truncated(6, 4 * (unsigned long long)n, size);
        PyObject *oids = PyList_New((Py_ssize_t)n);
        if (oids == NULL) return NULL;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *o = PyLong_FromUnsignedLong(rd32(buf + 6 + 4 * (Py_ssize_t)i));
            if (o == NULL) {
                Py_DECREF(oids);
                return NULL;
            }
            PyList_SET_ITEM(oids, i, o);
        }
        PyObject *args[] = {oids, PyBool_FromLong(opts & 1), PyBool_FromLong(opts & 2)};
        return make(&makers[TruncateT], args, 3);
    }
    case 'Y': {
        if (size < 5) return truncated(1, 4, size);
        uint32_t oid = rd32(buf + 1);
        pos = 5;
        PyObject *ns = read_cstring(buf, size, &pos);
        if (ns == NULL) return NULL;
        PyObject *name = read_cstring(buf, size, &pos);
        if (name == NULL) {
            Py_DECREF(ns);
            return NULL;
        }
        PyObject *args[] = {PyLong_FromUnsignedLong(oid), ns, name};
        return make(&makers[TypeMsgT], args, 3);
    }
    case 'M': {
        if (size < 10) return truncated(1, 9, size);
        unsigned char flags = buf[1];
        uint64_t lsn = rd64(buf + 2);
        pos = 10;
        PyObject *prefix = read_cstring(buf, size, &pos);
        if (prefix == NULL) return NULL;
        if (pos + 4 > size) {
            Py_DECREF(prefix);
            return truncated(pos, 4, size);
        }
        uint32_t ln = rd32(buf + pos);
        pos += 4;
        if ((unsigned long long)pos + ln > (unsigned long long)size) {
            Py_DECREF(prefix);
            return truncated(pos, ln, size);
        }
        PyObject *args[] = {PyBool_FromLong(flags & 1), PyLong_FromUnsignedLongLong(lsn), prefix,
                            PyBytes_FromStringAndSize((const char *)buf + pos, (Py_ssize_t)ln)};
        return make(&makers[LogicalMessageT], args, 4);
    }
    case 'O': {
        if (size < 9) return truncated(1, 8, size);
        uint64_t lsn = rd64(buf + 1);
        pos = 9;
        PyObject *name = read_cstring(buf, size, &pos);
        if (name == NULL) return NULL;
        PyObject *args[] = {PyLong_FromUnsignedLongLong(lsn), name};
        return make(&makers[OriginT], args, 2);
    }
    default:
        return bad_kind("unknown pgoutput message type ", kind, "");
    }
}

static PyObject *decode_message(PyObject *self, PyObject *data) {
    if (!configured()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *res = decode((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return res;
}

static PyObject *parse_copy_message(PyObject *self, PyObject *data) {
    if (!configured()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t size = view.len;
    PyObject *res = NULL;
    if (size == 0) {
        PyErr_SetString(ProtocolError, "empty replication message");
    } else if (buf[0] == 'w') {
        if (size < 25) {
            truncated(1, 24, size);
        } else {
            PyObject *mv = PyMemoryView_FromObject(data);
            PyObject *payload = NULL;
            if (mv != NULL) {
                payload = PySequence_GetSlice(mv, 25, PY_SSIZE_T_MAX);
                Py_DECREF(mv);
            }
            if (payload != NULL) {
                PyObject *args[] = {PyLong_FromUnsignedLongLong(rd64(buf + 1)),
                                    PyLong_FromUnsignedLongLong(rd64(buf + 9)),
                                    PyLong_FromUnsignedLongLong(rd64(buf + 17)), payload};
                res = make(&makers[XLogDataT], args, 4);
            }
        }
    } else if (buf[0] == 'k') {
        if (size < 18) {
            truncated(1, 17, size);
        } else {
            PyObject *args[] = {PyLong_FromUnsignedLongLong(rd64(buf + 1)),
                                PyLong_FromUnsignedLongLong(rd64(buf + 9)),
                                PyBool_FromLong(buf[17] != 0)};
            res = make(&makers[KeepaliveT], args, 3);
        }
    } else {
        bad_kind("unexpected replication message type ", buf[0], "");
    }
    PyBuffer_Release(&view);
    return res;
}

static int get_pos(PyObject *const *args, Py_ssize_t nargs, const char *fn, Py_buffer *view,
                   Py_ssize_t *pos) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", fn, nargs);
        return -1;
    }
    *pos = PyLong_AsSsize_t(args[1]);
    if (*pos == -1 && PyErr_Occurred()) return -1;
    if (*pos < 0) {
        PyErr_Format(PyExc_ValueError, "%s(): negative offset", fn);
        return -1;
    }
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE);
}

/* tuple_data(buf, pos) -> (values, pos after): the twin of pgoutput._py_tuple. */
static PyObject *tuple_data(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!configured()) return NULL;
    Py_buffer view;
    Py_ssize_t pos;
    if (get_pos(args, nargs, "tuple_data", &view, &pos) < 0) return NULL;
    PyObject *vals = read_tuple(view.buf, view.len, &pos);
    PyBuffer_Release(&view);
    if (vals == NULL) return NULL;
    PyObject *p = PyLong_FromSsize_t(pos);
    if (p == NULL) {
        Py_DECREF(vals);
        return NULL;
    }
    PyObject *res = PyTuple_Pack(2, vals, p);
    Py_DECREF(vals);
    Py_DECREF(p);
    return res;
}

/* cstring(buf, pos) -> (str, pos after): the twin of pgoutput._py_cstring. */
static PyObject *cstring(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!configured()) return NULL;
    Py_buffer view;
    Py_ssize_t pos;
    if (get_pos(args, nargs, "cstring", &view, &pos) < 0) return NULL;
    PyObject *s = read_cstring(view.buf, view.len, &pos);
    PyBuffer_Release(&view);
    if (s == NULL) return NULL;
    PyObject *p = PyLong_FromSsize_t(pos);
    if (p == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    PyObject *res = PyTuple_Pack(2, s, p);
    Py_DECREF(s);
    Py_DECREF(p);
    return res;
}

/* Text adapters taken in C: the kinds of replicator.staging.values.FAST_KINDS (keep the
 * numbers in step). Each is the "fast branch" of its Python adapter in that module, and no more:
 * fast_text() returns the very str that branch returns, or NULL *without* an error when the text
 * is not of the shape the branch takes — row() then calls the Python adapter itself, so for any
 * other text (and any error, such as invalid UTF-8) the outcome is the adapter's by
 * construction. tests/test_pgoutput_compiled.py compares both over generated texts. */
enum {
    K_CALL = 0,
    K_SQLITE_NUMERIC = 1,
    K_SQLITE_TIMESTAMP = 2,
    K_SQLITE_TIMESTAMPTZ = 3,
    K_SQLITE_DATE = 4,
    K_SQLITE_TIME = 5,
    K_UUID = 6,
    K_PG_TEXT = 7,
    K_PG_TEMPORAL = 8,
    K_PG_TIME = 9,
};

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* buf[0:n] + `zeros` zeros + tail, decoded as UTF-8; NULL without an error when it is not
 * valid UTF-8 (the Python adapter then raises its own error). */
static PyObject *text_of(const char *buf, Py_ssize_t n, int zeros, const char *tail) {
    char tmp[64];
    Py_ssize_t tl = tail ? (Py_ssize_t)strlen(tail) : 0;
    const char *src = buf;
    Py_ssize_t len = n;
    if (zeros || tl) {
        if (n + zeros + tl > (Py_ssize_t)sizeof(tmp)) return NULL;
        memcpy(tmp, buf, (size_t)n);
        memset(tmp + n, '0', (size_t)zeros);
        if (tl) memcpy(tmp + n + zeros, tail, (size_t)tl);
        src = tmp;
        len = n + zeros + tl;
    }
    PyObject *s = PyUnicode_DecodeUTF8(src, len, NULL);
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
    return s;
}

static PyObject *fast_text(long kind, PyObject *raw) {
    if (!PyBytes_CheckExact(raw)) return NULL;
    const char *b = PyBytes_AS_STRING(raw);
    const unsigned char *v = (const unsigned char *)b;
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    switch (kind) {
    case K_SQLITE_NUMERIC:
        /* str(Decimal) equals the text unless it is NaN/Infinity or has "0.000000" in it. */
        if (n < 1 || !is_digit(v[n - 1])) return NULL;
        for (Py_ssize_t i = 0; i + 8 <= n; i++)
            if (memcmp(b + i, "0.000000", 8) == 0) return NULL;
        return text_of(b, n, 0, NULL);
    case K_SQLITE_TIMESTAMP:
        if (n < 19 || v[4] != '-' || v[10] != ' ' || !is_digit(v[n - 1])) return NULL;
        if (n == 19) return text_of(b, n, 0, NULL);
        if (n >= 21 && n <= 26 && v[19] == '.') return text_of(b, n, (int)(26 - n), NULL);
        return NULL;
    case K_SQLITE_TIMESTAMPTZ:
        if (n < 22 || memcmp(b + n - 3, "+00", 3) != 0 || v[4] != '-' || v[10] != ' ')
            return NULL;
        if (n == 22) return text_of(b, 19, 0, "+00:00");
        if (n >= 24 && n <= 29 && v[19] == '.') return text_of(b, n - 3, (int)(29 - n), "+00:00");
        return NULL;
    case K_SQLITE_DATE:
        if (n != 10 || v[4] != '-' || !is_digit(v[9])) return NULL;
        return text_of(b, n, 0, NULL);
    case K_SQLITE_TIME:
        if (n < 8 || v[2] != ':' || memcmp(b, "24", 2) >= 0) return NULL;
        if (n == 8) return text_of(b, n, 0, NULL);
        if (n >= 10 && n <= 15 && v[8] == '.') return text_of(b, n, (int)(15 - n), NULL);
        return NULL;
    case K_UUID:
        return n == 36 ? text_of(b, n, 0, NULL) : NULL;
    case K_PG_TEXT:
        return text_of(b, n, 0, NULL);
    case K_PG_TEMPORAL:
        if (n < 10 || v[4] != '-' || !is_digit(v[n - 1]) || (n != 10 && v[10] != ' ')) return NULL;
        return text_of(b, n, 0, NULL);
    case K_PG_TIME:
        if (n < 8 || v[2] != ':' || memcmp(b, "24", 2) >= 0) return NULL;
        return text_of(b, n, 0, NULL);
    default:
        return NULL;
    }
}

/* row(plan, raw) -> dict: the twin of pgoutput._py_row. ``plan`` is a tuple of (column name,
 * function of the raw value, fast kind) triples, ``raw`` a row's values as tuple_data gives
 * them: None stays None, UNCHANGED is left out, anything else goes through its column's
 * function — or, for a kind other than 0, through the same function's fast branch written
 * above. Columns past the shorter of the two are left out, as zip() does. */
static PyObject *row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!configured()) return NULL;
    if (nargs != 2 || !PyTuple_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "row(plan: tuple, raw: list)");
        return NULL;
    }
    PyObject *plan = args[0], *raw = args[1];
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    /* The list's size is read again each round: a column's function could change it. */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plan) && i < PyList_GET_SIZE(raw); i++) {
        PyObject *item = PyTuple_GET_ITEM(plan, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(item, 2))) {
            PyErr_SetString(PyExc_TypeError,
                            "row(): plan items are (name, function, kind: int) triples");
            goto fail;
        }
        PyObject *name = PyTuple_GET_ITEM(item, 0);
        PyObject *v = PyList_GET_ITEM(raw, i);
        if (v == Unchanged) continue;
        if (v == Py_None) {
            if (PyDict_SetItem(out, name, Py_None) < 0) goto fail;
            continue;
        }
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
        if (kind == -1 && PyErr_Occurred()) goto fail;
        PyObject *r = kind != K_CALL ? fast_text(kind, v) : NULL;
        if (r == NULL) {
            if (PyErr_Occurred()) goto fail;
            Py_INCREF(v); /* held across the call, which may run any Python code */
            r = PyObject_CallOneArg(PyTuple_GET_ITEM(item, 1), v);
            Py_DECREF(v);
            if (r == NULL) goto fail;
        }
        int rc = PyDict_SetItem(out, name, r);
        Py_DECREF(r);
        if (rc < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 + NCLASSES) {
        PyErr_Format(PyExc_TypeError, "configure() takes %d arguments (%zd given)", 2 + NCLASSES,
                     nargs);
        return NULL;
    }
    if (!PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "configure(): the first argument is the error class");
        return NULL;
    }
    for (int i = 0; i < NCLASSES; i++) {
        if (maker_init(&makers[i], args[2 + i]) < 0) return NULL;
    }
    Py_XSETREF(Unchanged, Py_NewRef(args[1]));
    Py_XSETREF(ProtocolError, Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

/* configured_fast() -> number of classes built without calling them (for the tests). */
static PyObject *configured_fast(PyObject *self, PyObject *unused) {
    long n = 0;
    for (int i = 0; i < NCLASSES; i++) n += makers[i].nfields > 0;
    return PyLong_FromLong(n);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(ProtocolError, UNCHANGED, XLogData, Keepalive, Begin, Commit, Relation, "
     "RelationColumn, TypeMsg, RowChange, Truncate, LogicalMessage, Origin): the classes the "
     "decoder builds, from replicator.cdc.pgoutput."},
    {"configured_fast", configured_fast, METH_NOARGS,
     "How many of the classes are built by filling their slots (the others are called)."},
    {"decode_message", decode_message, METH_O, "Decode one pgoutput message."},
    {"parse_copy_message", parse_copy_message, METH_O,
     "Decode one CopyBoth frame: XLogData or Keepalive."},
    {"tuple_data", (PyCFunction)(void (*)(void))tuple_data, METH_FASTCALL,
     "tuple_data(buf, pos) -> (values, pos after)."},
    {"cstring", (PyCFunction)(void (*)(void))cstring, METH_FASTCALL,
     "cstring(buf, pos) -> (str, pos after)."},
    {"row", (PyCFunction)(void (*)(void))row, METH_FASTCALL,
     "row(plan, raw) -> {column name: value}: a row's values through its columns' functions "
     "(plan items: (name, function, fast kind))."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pgoutput",
    "Compiled twin of the pgoutput decoder in replicator.cdc.pgoutput.", -1, methods,
};

PyMODINIT_FUNC PyInit__pgoutput(void) {
    op_I = PyUnicode_InternFromString("I");
    op_U = PyUnicode_InternFromString("U");
    op_D = PyUnicode_InternFromString("D");
    public_str = PyUnicode_InternFromString("public");
    if (op_I == NULL || op_U == NULL || op_D == NULL || public_str == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    /* The shape of row()'s plan items: 3 since the fast kinds (a module built before takes
     * pairs, and pgoutput.py then uses its pure loop). */
    if (m != NULL && PyModule_AddIntConstant(m, "ROW_PLAN", 3) < 0) Py_CLEAR(m);
    return m;
}
