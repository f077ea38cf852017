/* The OTLP encoder's per-reading loop in C: collector/export/otlp_encode.py's
 * OtlpMetricsEncoder._readings_py, which stays the reference and the fallback (STACKLENS_PURE_PYTHON=1, no
 * build). Same points, byte for byte, in the same lists of by_signal; the encoder's Python methods still
 * make every cache entry (_series, _flags are called back on a miss).
 *
 * Fast paths only for the shapes the agent produces: exact str signals, None/float/int values, exact int
 * times in 0..2**64-1, exact tuples of exact bytes as cached heads, exact lists of bytes as flag parts. Any
 * other object takes the Python expression's own steps, in its order (rich comparison, __getitem__, the
 * struct packers themselves, bytes.join, .append), so results and exceptions (struct.error, TypeError, ...)
 * are those of the Python loop. The dicts must be exact dicts, else NotImplemented is returned before
 * anything is done and the caller runs the Python loop. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define T_DOUBLE 0x21 /* as_double: field 4, fixed64 */

static PyObject *s_empty;     /* "": the Python loop's initial last_signal */
static PyObject *s_clock;     /* "clock_event_reasons" */
static PyObject *s_active;    /* "clock_event_reason_active" */
static PyObject *s_append, *s_join;
static PyObject *i_zero, *i_one, *i_tdouble;
static PyObject *b_novalue;   /* _NO_VALUE: flags (field 8, varint) = NO_RECORDED_VALUE */

static void put_u64(char *p, unsigned long long v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (char)(v & 0xFF);
}

/* An exact int in 0..2**63-1, which struct's "Q" packs without complaint: 1 and *out; else 0, no error set
 * (2**63.. and errors such as a negative time are left to struct itself, on the slow path). */
static int time_fast(PyObject *t, unsigned long long *out)
{
    if (!PyLong_CheckExact(t))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(t, &overflow); /* no error for an int; quicker than AsUnsigned */
    if (overflow || v < 0)
        return 0;
    *out = (unsigned long long)v;
    return 1;
}

/* `value is None or value != value`: 1 missing, 0 a value, -1 error. *fast: *x is the double "d" packs. */
static int is_missing(PyObject *v, double *x, int *fast)
{
    *fast = 0;
    if (v == Py_None)
        return 1;
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d))
            return 1;
        *x = d;
        *fast = 1;
        return 0;
    }
    if (PyLong_CheckExact(v)) {
        double d = PyLong_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred())
            PyErr_Clear(); /* too large for a double: struct.pack raises it, on the slow path */
        else {
            *x = d;
            *fast = 1;
        }
        return 0;
    }
    PyObject *ne = PyObject_RichCompare(v, v, Py_NE);
    if (ne == NULL)
        return -1;
    int r = PyObject_IsTrue(ne);
    Py_DECREF(ne);
    return r;
}

/* `a != b` (b the previous signal) */
static int differs(PyObject *a, PyObject *b)
{
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b))
        return a != b && PyUnicode_Compare(a, b) != 0;
    PyObject *r = PyObject_RichCompare(a, b, Py_NE);
    if (r == NULL)
        return -1;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* `a == s` for an exact str s */
static int equals(PyObject *a, PyObject *s)
{
    if (a == s)
        return 1;
    if (PyUnicode_CheckExact(a))
        return PyUnicode_Compare(a, s) == 0;
    PyObject *r = PyObject_RichCompare(a, s, Py_EQ);
    if (r == NULL)
        return -1;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* heads[i] when heads is an exact tuple holding exact bytes there (borrowed), else NULL */
static PyObject *head_fast(PyObject *heads, Py_ssize_t i)
{
    if (PyTuple_CheckExact(heads) && PyTuple_GET_SIZE(heads) > i) {
        PyObject *h = PyTuple_GET_ITEM(heads, i);
        if (PyBytes_CheckExact(h))
            return h;
    }
    return NULL;
}

/* missing: heads[1] + pack_time(time_ns) + _NO_VALUE; else heads[0] + pack_value(time_ns, _T_DOUBLE, value) */
static PyObject *make_point(PyObject *heads, PyObject *value, PyObject *time_ns, int missing, double x, int xfast,
                            int tfast, unsigned long long t, PyObject *pack_value, PyObject *pack_time)
{
    PyObject *h = head_fast(heads, missing ? 1 : 0);
    if (h != NULL && tfast && (missing || xfast)) {
        Py_ssize_t n = PyBytes_GET_SIZE(h);
        PyObject *out = PyBytes_FromStringAndSize(NULL, n + (missing ? 8 + 2 : 8 + 1 + 8));
        if (out == NULL)
            return NULL;
        char *p = PyBytes_AS_STRING(out);
        memcpy(p, PyBytes_AS_STRING(h), (size_t)n);
        p += n;
        put_u64(p, t);
        p += 8;
        if (missing) {
            memcpy(p, PyBytes_AS_STRING(b_novalue), 2);
        } else {
            *p++ = T_DOUBLE;
            if (PyFloat_Pack8(x, p, 1) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        return out;
    }
    PyObject *hh = PyObject_GetItem(heads, missing ? i_one : i_zero);
    if (hh == NULL)
        return NULL;
    PyObject *tail = missing ? PyObject_CallOneArg(pack_time, time_ns)
                             : PyObject_CallFunctionObjArgs(pack_value, time_ns, i_tdouble, value, NULL);
    if (tail == NULL) {
        Py_DECREF(hh);
        return NULL;
    }
    PyObject *sum = PyNumber_Add(hh, tail);
    Py_DECREF(hh);
    Py_DECREF(tail);
    if (sum == NULL || !missing)
        return sum;
    PyObject *r = PyNumber_Add(sum, b_novalue);
    Py_DECREF(sum);
    return r;
}

/* pack_time(time_ns).join(parts) */
static PyObject *join_time(PyObject *parts, PyObject *time_ns, int tfast, unsigned long long t, PyObject *pack_time)
{
    if (tfast && PyList_CheckExact(parts)) {
        Py_ssize_t n = PyList_GET_SIZE(parts), total = 0, i;
        for (i = 0; i < n; i++) {
            PyObject *b = PyList_GET_ITEM(parts, i);
            if (!PyBytes_CheckExact(b))
                break;
            total += PyBytes_GET_SIZE(b);
        }
        if (i == n) {
            if (n > 1)
                total += 8 * (n - 1);
            PyObject *out = PyBytes_FromStringAndSize(NULL, total);
            if (out == NULL)
                return NULL;
            char *p = PyBytes_AS_STRING(out);
            for (i = 0; i < n; i++) {
                PyObject *b = PyList_GET_ITEM(parts, i);
                memcpy(p, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
                p += PyBytes_GET_SIZE(b);
                if (i + 1 < n) {
                    put_u64(p, t);
                    p += 8;
                }
            }
            return out;
        }
    }
    PyObject *sep = PyObject_CallOneArg(pack_time, time_ns);
    if (sep == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodOneArg(sep, s_join, parts);
    Py_DECREF(sep);
    return r;
}

/* lst.append(item), where *meth is lst.append looked up beforehand when lst is not an exact list */
static int append(PyObject *lst, PyObject *meth, PyObject *item)
{
    if (meth == NULL)
        return PyList_Append(lst, item);
    PyObject *r = PyObject_CallOneArg(meth, item);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The bound .append of lst, or NULL with no error when lst is an exact list; NULL with an error on failure. */
static PyObject *append_of(PyObject *lst)
{
    if (PyList_CheckExact(lst))
        return NULL;
    return PyObject_GetAttr(lst, s_append);
}

/* The decoded clock-event flags of a bitmask reading:
 * mask = int(value); parts = flag_parts.get((key, mask)) or flags(key, attrs, mask);
 * by_signal.setdefault("clock_event_reason_active", []).append(pack_time(time_ns).join(parts)) */
static int flag_points(PyObject *by_signal, PyObject *flag_parts, PyObject *flags_fn, PyObject *pack_time,
                       PyObject *key, PyObject *attrs, PyObject *value, PyObject *time_ns, int tfast,
                       unsigned long long t)
{
    PyObject *mask = PyNumber_Long(value);
    if (mask == NULL)
        return -1;
    PyObject *fkey = PyTuple_Pack(2, key, mask);
    if (fkey == NULL) {
        Py_DECREF(mask);
        return -1;
    }
    PyObject *parts = PyDict_GetItemWithError(flag_parts, fkey);
    Py_DECREF(fkey);
    if (parts != NULL && parts != Py_None)
        Py_INCREF(parts);
    else if (PyErr_Occurred()) {
        Py_DECREF(mask);
        return -1;
    } else
        parts = PyObject_CallFunctionObjArgs(flags_fn, key, attrs, mask, NULL);
    Py_DECREF(mask);
    if (parts == NULL)
        return -1;
    PyObject *lst = PyDict_GetItemWithError(by_signal, s_active); /* setdefault: even a None stays */
    if (lst != NULL)
        Py_INCREF(lst);
    else if (!PyErr_Occurred() && (lst = PyList_New(0)) != NULL && PyDict_SetItem(by_signal, s_active, lst) < 0)
        Py_CLEAR(lst);
    if (lst == NULL) {
        Py_DECREF(parts);
        return -1;
    }
    int rc = -1;
    PyObject *meth = append_of(lst);
    if (meth != NULL || !PyErr_Occurred()) {
        PyObject *joined = join_time(parts, time_ns, tfast, t, pack_time);
        if (joined != NULL) {
            rc = append(lst, meth, joined);
            Py_DECREF(joined);
        }
    }
    Py_XDECREF(meth);
    Py_DECREF(lst);
    Py_DECREF(parts);
    return rc;
}

/* `signal, value, time_ns, labels = item` into out[0..3] (new references) */
static int unpack4(PyObject *item, PyObject **out)
{
    if (PyTuple_Check(item) && Py_TYPE(item)->tp_iter == PyTuple_Type.tp_iter && PyTuple_GET_SIZE(item) == 4) {
        for (int i = 0; i < 4; i++) {
            out[i] = PyTuple_GET_ITEM(item, i);
            Py_INCREF(out[i]);
        }
        return 0;
    }
    PyObject *it = PyObject_GetIter(item);
    if (it == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) && Py_TYPE(item)->tp_iter == NULL && !PySequence_Check(item)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "cannot unpack non-iterable %.200s object", Py_TYPE(item)->tp_name);
        }
        return -1;
    }
    int n = 0;
    for (; n < 4; n++) {
        out[n] = PyIter_Next(it);
        if (out[n] == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 4, got %d)", n);
            goto fail;
        }
    }
    PyObject *extra = PyIter_Next(it);
    if (extra != NULL) {
        Py_DECREF(extra);
        PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 4)");
        goto fail;
    }
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(it);
    return 0;
fail:
    for (int i = 0; i < n; i++)
        Py_CLEAR(out[i]);
    Py_DECREF(it);
    return -1;
}

PyDoc_STRVAR(readings_doc,
"readings(heads, flag_parts, series, flags, pack_value, pack_time, by_signal, key, attrs, readings)\n--\n\n"
"Append the points of ``readings`` to ``by_signal`` as OtlpMetricsEncoder._readings_py does; None, or\n"
"NotImplemented (nothing done) when a dict argument is not an exact dict.");

static PyObject *readings(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "readings() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *heads_of = args[0], *flag_parts = args[1], *series_fn = args[2], *flags_fn = args[3];
    PyObject *pack_value = args[4], *pack_time = args[5], *by_signal = args[6], *key = args[7], *attrs = args[8];
    PyObject *seq = args[9];
    if (!PyDict_CheckExact(heads_of) || !PyDict_CheckExact(flag_parts) || !PyDict_CheckExact(by_signal))
        Py_RETURN_NOTIMPLEMENTED;

    PyObject *it = NULL, *last = s_empty, *points = NULL, *item = NULL, *series = NULL, *heads = NULL, *meth = NULL;
    PyObject *point = NULL, *r[4] = {NULL, NULL, NULL, NULL};
    Py_INCREF(last);
    int indexed = PyTuple_CheckExact(seq) || PyList_CheckExact(seq);
    if (!indexed && (it = PyObject_GetIter(seq)) == NULL)
        goto error;
    for (Py_ssize_t i = 0;; i++) {
        if (indexed) {
            if (PyTuple_CheckExact(seq)) {
                if (i >= PyTuple_GET_SIZE(seq))
                    break;
                item = PyTuple_GET_ITEM(seq, i);
            } else {
                if (i >= PyList_GET_SIZE(seq))
                    break;
                item = PyList_GET_ITEM(seq, i);
            }
            Py_INCREF(item);
        } else if ((item = PyIter_Next(it)) == NULL) {
            if (PyErr_Occurred())
                goto error;
            break;
        }
        if (unpack4(item, r) < 0)
            goto error;
        Py_CLEAR(item);
        PyObject *signal = r[0], *value = r[1], *time_ns = r[2], *labels = r[3];

        /* series = (key, signal, labels); heads = heads_of.get(series) or series_fn(series, attrs, time_ns) */
        if ((series = PyTuple_Pack(3, key, signal, labels)) == NULL)
            goto error;
        heads = PyDict_GetItemWithError(heads_of, series);
        if (heads != NULL && heads != Py_None)
            Py_INCREF(heads);
        else if (PyErr_Occurred())
            goto error;
        else if ((heads = PyObject_CallFunctionObjArgs(series_fn, series, attrs, time_ns, NULL)) == NULL)
            goto error;
        Py_CLEAR(series);

        /* the list of the signal's points: by_signal.get(signal), set to [] when missing (or None) */
        int d = differs(signal, last);
        if (d < 0)
            goto error;
        if (d) {
            PyObject *found = PyDict_GetItemWithError(by_signal, signal);
            if (found != NULL && found != Py_None)
                Py_INCREF(found);
            else if (PyErr_Occurred())
                goto error;
            else if ((found = PyList_New(0)) == NULL)
                goto error;
            else if (PyDict_SetItem(by_signal, signal, found) < 0) {
                Py_DECREF(found);
                goto error;
            }
            Py_XSETREF(points, found);
            Py_INCREF(signal);
            Py_SETREF(last, signal);
        } else if (points == NULL && (points = PyList_New(0)) == NULL) {
            goto error; /* the Python loop's initial `points = []`, in no dict */
        }

        double x = 0.0;
        int xfast, tfast;
        unsigned long long t = 0;
        int missing = is_missing(value, &x, &xfast);
        if (missing < 0)
            goto error;
        if ((meth = append_of(points)) == NULL && PyErr_Occurred())
            goto error;
        tfast = time_fast(time_ns, &t);
        if ((point = make_point(heads, value, time_ns, missing, x, xfast, tfast, t, pack_value, pack_time)) == NULL)
            goto error;
        if (append(points, meth, point) < 0)
            goto error;
        Py_CLEAR(point);
        Py_CLEAR(meth);
        Py_CLEAR(heads);
        if (!missing) {
            int clock = equals(signal, s_clock);
            if (clock < 0)
                goto error;
            if (clock && flag_points(by_signal, flag_parts, flags_fn, pack_time, key, attrs, value, time_ns, tfast,
                                     t) < 0)
                goto error;
        }
        for (int k = 0; k < 4; k++)
            Py_CLEAR(r[k]);
    }
    Py_XDECREF(it);
    Py_DECREF(last);
    Py_XDECREF(points);
    Py_RETURN_NONE;
error:
    for (int k = 0; k < 4; k++)
        Py_XDECREF(r[k]);
    Py_XDECREF(item);
    Py_XDECREF(series);
    Py_XDECREF(heads);
    Py_XDECREF(meth);
    Py_XDECREF(point);
    Py_XDECREF(it);
    Py_DECREF(last);
    Py_XDECREF(points);
    return NULL;
}

static PyMethodDef methods[] = {
    {"readings", (PyCFunction)(void (*)(void))readings, METH_FASTCALL, readings_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_otlp_points", "The OTLP encoder's per-reading loop (see otlp_encode.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__otlp_points(void)
{
    if (s_empty == NULL) {
        static const char novalue[2] = {8 << 3 | 0, 1};
        s_empty = PyUnicode_InternFromString("");
        s_clock = PyUnicode_InternFromString("clock_event_reasons");
        s_active = PyUnicode_InternFromString("clock_event_reason_active");
        s_append = PyUnicode_InternFromString("append");
        s_join = PyUnicode_InternFromString("join");
        i_zero = PyLong_FromLong(0);
        i_one = PyLong_FromLong(1);
        i_tdouble = PyLong_FromLong(T_DOUBLE);
        b_novalue = PyBytes_FromStringAndSize(novalue, 2);
        if (!s_empty || !s_clock || !s_active || !s_append || !s_join || !i_zero || !i_one || !i_tdouble ||
            !b_novalue) {
            Py_CLEAR(s_empty);
            return NULL;
        }
    }
    return PyModule_Create(&module_def);
}
