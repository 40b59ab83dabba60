/* Optional accelerator for the receiver's fast path (pathwatch/receiver/decode.py).
 *
 * scan(data) walks an ExportMetricsServiceRequest in the protobuf wire format once and returns
 * what Decoder._decode_known otherwise reads through two reduced views (FlatRequest and
 * MergedRequest, otlpview.proto):
 *
 *   (resources, names, times, values, lo, hi, with_points, spans)
 *
 *   resources    list of bytes: each ResourceMetrics' Resource, in wire order
 *   names        set of bytes: every metric name
 *   times        how many gauge and sum data points carry a time_unix_nano
 *   values       how many as_double and as_int values those data points carry
 *   lo, hi       the smallest and largest of those time_unix_nano (0, 0 without any)
 *   with_points  bytes, one per ResourceMetrics: 1 when it has a gauge or sum time_unix_nano
 *   spans        bytes, 8 per ResourceMetrics: where its message starts and ends in `data`
 *                (two unsigned 32-bit integers, native byte order), for the few decoded in full
 *
 * It returns None for anything but the plain shape collectors send: every ResourceMetrics with
 * exactly one Resource, no histogram, exponential histogram or summary, each known field with
 * its own wire type (unpacked fixed64 for the timestamps and values), no groups, no malformed
 * or truncated field. The caller then reads the request through the views, which decide as
 * before; so wherever scan answers, it answers exactly what the views would (tested against
 * them in tests/unit/test_wirescan.py), and a request it does not understand costs one pass.
 *
 * No allocation but Python objects, no recursion, every read bounds-checked against the end of
 * the enclosing message. The GIL is held throughout (the walk builds Python objects).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define WT_VARINT 0
#define WT_I64 1
#define WT_LEN 2
#define WT_I32 5

#define NAME_MEMO 64 /* distinct metric names remembered by pointer, per request */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} span;

typedef struct {
    PyObject *names;
    const uint8_t *base; /* the start of `data`, for spans */
    char *flags;         /* with_points, one per ResourceMetrics */
    uint32_t *spans;     /* spans, two per ResourceMetrics */
    Py_ssize_t flags_len;
    Py_ssize_t flags_cap;
    struct {
        const uint8_t *p;
        Py_ssize_t n;
    } memo[NAME_MEMO];
    int memo_len;
    long long times;
    long long values;
    uint64_t lo;
    uint64_t hi;
} walk;

/* A varint of at most 10 bytes whose 10th byte is 0 or 1 (what parsers accept). */
static int read_varint(span *s, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (s->p >= s->end)
            return 0;
        uint8_t b = *s->p++;
        if (i == 9 && b > 1)
            return 0;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

static int read_tag(span *s, uint32_t *field, int *wire)
{
    uint64_t tag;
    if (!read_varint(s, &tag) || tag > UINT32_MAX || (tag >> 3) == 0)
        return 0;
    *field = (uint32_t)(tag >> 3);
    *wire = (int)(tag & 7);
    return 1;
}

static int read_len(span *s, span *inner)
{
    uint64_t n;
    if (!read_varint(s, &n) || n > (uint64_t)(s->end - s->p))
        return 0;
    inner->p = s->p;
    inner->end = s->p + n;
    s->p += n;
    return 1;
}

static int read_fixed64(span *s, uint64_t *out)
{
    if (s->end - s->p < 8)
        return 0;
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | s->p[i];
    s->p += 8;
    *out = v;
    return 1;
}

/* Skip one field of a known wire type; groups (3, 4) and wire types 6, 7 are refused. */
static int skip(span *s, int wire)
{
    uint64_t ignored;
    span inner;
    switch (wire) {
    case WT_VARINT:
        return read_varint(s, &ignored);
    case WT_I64:
        if (s->end - s->p < 8)
            return 0;
        s->p += 8;
        return 1;
    case WT_LEN:
        return read_len(s, &inner);
    case WT_I32:
        if (s->end - s->p < 4)
            return 0;
        s->p += 4;
        return 1;
    default:
        return 0;
    }
}

/* A NumberDataPoint: time_unix_nano (3), as_double (4), as_int (6); the rest skipped. */
static int walk_point(walk *w, span s, long long *rm_times)
{
    uint32_t field;
    int wire;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire))
            return 0;
        if (field == 3 || field == 4 || field == 6) {
            uint64_t v;
            if (wire != WT_I64 || !read_fixed64(&s, &v))
                return 0;
            if (field == 3) {
                if (w->times == 0 || v < w->lo)
                    w->lo = v;
                if (w->times == 0 || v > w->hi)
                    w->hi = v;
                w->times++;
                (*rm_times)++;
            } else {
                w->values++;
            }
        } else if (!skip(&s, wire)) {
            return 0;
        }
    }
    return 1;
}

/* A Gauge or a Sum: data_points (1); the rest skipped. */
static int walk_number_points(walk *w, span s, long long *rm_times)
{
    uint32_t field;
    int wire;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire))
            return 0;
        if (field == 1) {
            span point;
            if (wire != WT_LEN || !read_len(&s, &point) || !walk_point(w, point, rm_times))
                return 0;
        } else if (!skip(&s, wire)) {
            return 0;
        }
    }
    return 1;
}

static int add_name(walk *w, const uint8_t *p, Py_ssize_t n)
{
    for (int i = 0; i < w->memo_len; i++) {
        if (w->memo[i].n == n && memcmp(w->memo[i].p, p, (size_t)n) == 0)
            return 1;
    }
    PyObject *name = PyBytes_FromStringAndSize((const char *)p, n);
    if (name == NULL)
        return -1;
    int rc = PySet_Add(w->names, name);
    Py_DECREF(name);
    if (rc < 0)
        return -1;
    if (w->memo_len < NAME_MEMO) {
        w->memo[w->memo_len].p = p;
        w->memo[w->memo_len].n = n;
        w->memo_len++;
    }
    return 1;
}

/* A Metric: name (1), gauge (5), sum (7); histograms and summaries (9, 10, 11) refused. */
static int walk_metric(walk *w, span s, long long *rm_times)
{
    uint32_t field;
    int wire;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire))
            return 0;
        if (field == 1 || field == 5 || field == 7) {
            span inner;
            if (wire != WT_LEN || !read_len(&s, &inner))
                return 0;
            if (field == 1) {
                int rc = add_name(w, inner.p, inner.end - inner.p);
                if (rc <= 0)
                    return rc;
            } else if (!walk_number_points(w, inner, rm_times)) {
                return 0;
            }
        } else if (field == 9 || field == 10 || field == 11) {
            return 0;
        } else if (!skip(&s, wire)) {
            return 0;
        }
    }
    return 1;
}

/* A ScopeMetrics: metrics (2); the rest skipped. */
static int walk_scope(walk *w, span s, long long *rm_times)
{
    uint32_t field;
    int wire;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire))
            return 0;
        if (field == 2) {
            span metric;
            if (wire != WT_LEN || !read_len(&s, &metric))
                return 0;
            int rc = walk_metric(w, metric, rm_times);
            if (rc <= 0)
                return rc;
        } else if (!skip(&s, wire)) {
            return 0;
        }
    }
    return 1;
}

/* A ResourceMetrics: resource (1, exactly once), scope_metrics (2); the rest skipped. Appends
 * the Resource's bytes to `resources` and whether it has points to `with_points`. */
static int walk_resource_metrics(walk *w, span s, PyObject *resources)
{
    uint32_t field;
    int wire;
    const uint8_t *start = s.p;
    span resource = {NULL, NULL};
    int seen = 0;
    long long rm_times = 0;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire))
            return 0;
        if (field == 1 || field == 2) {
            span inner;
            if (wire != WT_LEN || !read_len(&s, &inner))
                return 0;
            if (field == 1) {
                if (seen++)
                    return 0;
                resource = inner;
            } else {
                int rc = walk_scope(w, inner, &rm_times);
                if (rc <= 0)
                    return rc;
            }
        } else if (!skip(&s, wire)) {
            return 0;
        }
    }
    if (!seen)
        return 0;
    PyObject *raw = PyBytes_FromStringAndSize((const char *)resource.p, resource.end - resource.p);
    if (raw == NULL)
        return -1;
    int rc = PyList_Append(resources, raw);
    Py_DECREF(raw);
    if (rc < 0)
        return -1;
    if (w->flags_len == w->flags_cap) {
        Py_ssize_t cap = w->flags_cap ? w->flags_cap * 2 : 256;
        char *grown = PyMem_Realloc(w->flags, (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->flags = grown;
        uint32_t *grown_spans = PyMem_Realloc(w->spans, (size_t)cap * 2 * sizeof(uint32_t));
        if (grown_spans == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->spans = grown_spans;
        w->flags_cap = cap;
    }
    w->spans[2 * w->flags_len] = (uint32_t)(start - w->base);
    w->spans[2 * w->flags_len + 1] = (uint32_t)(s.end - w->base);
    w->flags[w->flags_len++] = rm_times > 0 ? 1 : 0;
    return 1;
}

static PyObject *scan(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    walk w;
    memset(&w, 0, sizeof(w));
    PyObject *resources = PyList_New(0);
    w.names = PySet_New(NULL);
    PyObject *result = NULL;
    if (resources == NULL || w.names == NULL)
        goto done;
    if ((uint64_t)view.len > UINT32_MAX) { /* spans are 32-bit: leave it to the views */
        result = Py_NewRef(Py_None);
        goto done;
    }
    w.base = (const uint8_t *)view.buf;

    span s = {(const uint8_t *)view.buf, (const uint8_t *)view.buf + view.len};
    int ok = 1;
    uint32_t field;
    int wire;
    while (ok > 0 && s.p < s.end) {
        if (!read_tag(&s, &field, &wire)) {
            ok = 0;
        } else if (field == 1) {
            span rm;
            if (wire != WT_LEN || !read_len(&s, &rm))
                ok = 0;
            else
                ok = walk_resource_metrics(&w, rm, resources);
        } else if (!skip(&s, wire)) {
            ok = 0;
        }
    }
    if (ok < 0)
        goto done; /* a Python error (memory) is set */
    if (ok == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    {
        PyObject *flags = PyBytes_FromStringAndSize(w.flags ? w.flags : "", w.flags_len);
        if (flags == NULL)
            goto done;
        PyObject *spans = PyBytes_FromStringAndSize(
            w.spans ? (const char *)w.spans : "", w.flags_len * 2 * (Py_ssize_t)sizeof(uint32_t));
        if (spans == NULL) {
            Py_DECREF(flags);
            goto done;
        }
        result = Py_BuildValue("(OOLLKKNN)", resources, w.names, w.times, w.values,
                               (unsigned long long)w.lo, (unsigned long long)w.hi, flags, spans);
    }

done:
    Py_XDECREF(resources);
    PyMem_Free(w.flags);
    PyMem_Free(w.spans);
    Py_XDECREF(w.names);
    PyBuffer_Release(&view);
    return result;
}

/* classify(resources, entries, keys, minute, earliest_ms, previous, with_points)
 *   -> (tracked, new, extension) or None, or NotImplemented
 *
 * The per-resource loop of Decoder._known over what scan returned: each Resource's
 * fingerprint (hash of its bytes) looked up in DurableResources' `entries` (fingerprint ->
 * floor_ms * 2 + tracked) and `keys` (fingerprint -> the keys kept for extensions). A resource
 * is tracked when its entry covers `minute` from `earliest_ms` on, extends when its entry's
 * minute is `previous` and it has keys and points, and is new otherwise. Returns the tracked
 * count, the new positions (ascending) and the extension's (fingerprint, keys) pairs; None
 * when more than a quarter are new (the full path is cheaper); NotImplemented for an entry
 * value this loop does not handle (negative or past 64 bits), which the Python loop then does.
 */
static PyObject *classify(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    enum { NEW = 0, TRACKED = 1, EXTENDING = 2 };
    if (nargs != 7 || !PyList_Check(args[0]) || !PyDict_Check(args[1]) || !PyDict_Check(args[2]) ||
        !PyBytes_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "classify(list, dict, dict, int, int, int, bytes) expected");
        return NULL;
    }
    PyObject *raws = args[0], *entries = args[1], *keys = args[2];
    long long minute = PyLong_AsLongLong(args[3]);
    long long earliest = PyLong_AsLongLong(args[4]);
    long long previous = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws);
    if (PyBytes_GET_SIZE(args[6]) != n) {
        PyErr_SetString(PyExc_ValueError, "with_points must hold one flag per resource");
        return NULL;
    }
    const char *with_points = PyBytes_AS_STRING(args[6]);
    Py_ssize_t limit = n / 4, n_new = 0, tracked = 0;
    PyObject *result = NULL;
    PyObject *fresh = PyList_New(0);
    PyObject *extension = PyList_New(0);
    char *kind = PyMem_Calloc((size_t)n + 1, 1);
    PyObject **fingerprints = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    if (fresh == NULL || extension == NULL || kind == NULL || fingerprints == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t h = PyObject_Hash(PyList_GET_ITEM(raws, i));
        if (h == -1 || (fingerprints[i] = PyLong_FromSsize_t(h)) == NULL)
            goto done;
        PyObject *value = PyDict_GetItemWithError(entries, fingerprints[i]); /* borrowed */
        if (value == NULL && PyErr_Occurred())
            goto done;
        if (value != NULL) {
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (v == -1 && PyErr_Occurred())
                goto done;
            if (overflow || v < 0) {
                result = Py_NewRef(Py_NotImplemented);
                goto done;
            }
            if (v & 1) {
                long long floor_ms = v >> 1;
                if (floor_ms / 60000 == minute && floor_ms <= earliest)
                    kind[i] = TRACKED;
                else if (floor_ms / 60000 == previous)
                    kind[i] = EXTENDING;
            }
        }
        if (kind[i] == NEW && ++n_new > limit) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (kind[i] == TRACKED) {
            tracked++;
        } else if (kind[i] == EXTENDING) {
            /* Without kept keys or without points, an extending resource is new after all. */
            PyObject *kept = PyDict_GetItemWithError(keys, fingerprints[i]); /* borrowed */
            if (kept == NULL && PyErr_Occurred())
                goto done;
            if (kept == NULL || !with_points[i]) {
                kind[i] = NEW;
                n_new++;
                continue;
            }
            PyObject *pair = PyTuple_Pack(2, fingerprints[i], kept);
            int rc = pair == NULL ? -1 : PyList_Append(extension, pair);
            Py_XDECREF(pair);
            if (rc < 0)
                goto done;
            tracked++;
        }
    }
    if (n_new > limit) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (kind[i] != NEW)
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        int rc = index == NULL ? -1 : PyList_Append(fresh, index);
        Py_XDECREF(index);
        if (rc < 0)
            goto done;
    }
    result = Py_BuildValue("(nOO)", tracked, fresh, extension);

done:
    if (fingerprints != NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(fingerprints[i]);
    }
    PyMem_Free(fingerprints);
    PyMem_Free(kind);
    Py_XDECREF(fresh);
    Py_XDECREF(extension);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O,
     "scan(data) -> (resources, names, times, values, lo, hi, with_points, spans) or None: one pass "
     "over an ExportMetricsServiceRequest for the receiver's fast path (see the module source)."},
    {"classify", (PyCFunction)(void (*)(void))classify, METH_FASTCALL,
     "classify(resources, entries, keys, minute, earliest_ms, previous, with_points) -> "
     "(tracked, new, extension), None or NotImplemented: the fast path's per-resource loop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_wirescan",
    "Optional accelerator of pathwatch's receiver fast path (C, no dependencies).", -1, methods,
};

PyMODINIT_FUNC PyInit__wirescan(void)
{
    return PyModule_Create(&module_def);
}
