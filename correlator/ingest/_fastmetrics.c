/* The compiled fast path of metric decoding (correlator/ingest/fast_metrics.py loads it with ctypes).
 *
 * Parses the protobuf wire format of an OTLP ExportMetricsServiceRequest directly from the body bytes and
 * applies exactly the rules of correlator/ingest/otlp_metrics.py (decode_metrics, add_points, _value,
 * _gpu_of, node_of, Origin.node_of, int32_or_none, str_or_none) for the agent's own metrics: gauges and
 * sums named stacklens.<signal> or stacklens_<signal> that become GPU samples, host samples, placements
 * or GPU identity rows; points of a name nobody knows are counted as ignored, as there.
 *
 * Also dcgm-exporter's series as an OpenTelemetry Collector forwards them (DCGM_FI_* names, in any case, read
 * in upper case as _resolve_cached does; one the catalog does not know is ignored, as there): GPU samples
 * scaled to the catalog's units, and what _dcgm_labels makes of their
 * labels: the GPU's identity row (modelName, pci_bus_id, device) once per GPU and resource, and a
 * placement without pid where a point names a pod or container (once for a GPU's points in a row that name the
 * same pod at the same time).
 *
 * Exactness by construction, as in _fastspans.c: whatever this file does not reproduce exactly it declines
 * (fm_decode reports FM_UNHANDLED) and the caller takes the reference path (upb + decode_metrics) with the
 * same bytes. Declined: every malformed or unusual wire shape (see _otlp_wire.h), exemplars, histograms,
 * exponential histograms and summaries, a metric with two data fields, and every name whose rows need
 * more than this file knows: serving-engine names, a "dcgm_" name beyond ASCII or over 256 bytes,
 * OpenTelemetry hw.* names (resolved by attributes); value
 * conversions that need Python (str() of a float, a list or a dict; int() of a string that is not plain
 * ASCII digits). The names and what becomes of their points are given by Python once
 * (fm_add_name, from the same catalog and rules), so the catalog is never written down twice.
 *
 * Plain C99, no Python headers. fm_decode keeps no state between calls and may run in several threads at
 * once, after fm_init and the fm_add_name calls.
 */
#include "_otlp_wire.h"

#define FM_OK 0
#define FM_UNHANDLED 1
#define FM_NOMEM 2
#define FM_ABI 3 /* fast_metrics.py's _ABI: the public head of fm_out, and the functions */

/* -- what becomes of a metric's points (fm_add_name) ------------------------------------------------- */
enum { A_UNKNOWN, A_GPU, A_HOST, A_PROCESS, A_INFO, A_SKIP, A_DECLINE, A_DCGM };
/* the attribute a GPU sample's sub is read from */
enum { L_NONE, L_LINK, L_REASON, L_XID };

typedef struct {
    char *name;
    size_t n;
    uint64_t hash;
    int action, label;
    char *signal; /* the canonical signal name stored */
    size_t signal_n;
    double factor; /* A_DCGM: to the catalog's unit (r.factor) */
} name_t;

#define NAME_CAP 4096 /* a power of two, over twice the names of the catalog */
static name_t NAMES[NAME_CAP];
static int n_names;

static const name_t *name_lookup(const uint8_t *p, size_t n) {
    uint64_t h = hash_words(p, n);
    for (uint64_t j = h & (NAME_CAP - 1);; j = (j + 1) & (NAME_CAP - 1)) {
        const name_t *e = &NAMES[j];
        if (!e->name) return NULL;
        if (e->hash == h && e->n == n && memcmp(e->name, p, n) == 0) return e;
    }
}

/* -- the attribute keys read ------------------------------------------------------------------------ */
enum {
    K_HOSTNAME_UC, K_HOSTNAME, K_NODE, K_HOST, K_GPU_UUID, K_UUID_UC, K_UUID, K_HW_ID, K_GPU_INDEX, K_GPU,
    K_LINK, K_REASON, K_XID, K_CGROUP_CONTAINER, K_CGROUP, K_PROCESS_PID, K_PID, K_CONTAINER_ID, K_POD_UID,
    K_POD_NAME, K_POD, K_NS_NAME, K_NS, K_CONTAINER_NAME, K_CONTAINER, K_MODEL, K_PCI, K_DEVICE, K_MODEL_NAME,
    K_DCGM_PCI, K_DCGM_DEVICE, K_COUNT
};
static const char *const KEYS[K_COUNT] = {
    "Hostname", "hostname", "k8s.node.name", "host.name", "gpu.uuid", "UUID", "uuid", "hw.id", "gpu.index", "gpu",
    "link", "reason", "xid", "container_id", "cgroup", "process.pid", "pid", "container.id", "k8s.pod.uid",
    "k8s.pod.name", "pod", "k8s.namespace.name", "namespace", "k8s.container.name", "container", "gpu.model",
    "gpu.pci_bus_id", "gpu.device", "modelName", "pci_bus_id", "device",
};
static keyset_t POINT_KEYS;
static int keys_ready;
static const int LABEL_KEY[] = {-1, K_LINK, K_REASON, K_XID};

/* the values of the keys read; v[k] holds one only where bit k of set is on (clearing 28 values per point
 * would cost more than reading them) */
typedef struct {
    uint32_t set;
    val_t v[K_COUNT];
} attrs_t;

typedef char keys_fit_the_set[K_COUNT <= 32 ? 1 : -1];
static const val_t ABSENT = {V_ABSENT, NULL, 0, 0, 0.0};

static inline const val_t *av(const attrs_t *a, int k) { return a->set >> k & 1 ? &a->v[k] : &ABSENT; }

static void attrs_clear(attrs_t *a) { a->set = 0; }

/* one KeyValue into attrs (a later one of the same key wins, as in attributes_of's dict) */
static int add_attr(rd kvmsg, int depth, void *attrs) {
    attrs_t *a = attrs;
    rd key;
    val_t v;
    if (!parse_kv(kvmsg, depth, &key, &v)) return 0;
    int k = keyset_index(&POINT_KEYS, key.p, (size_t)(key.end - key.p));
    if (k >= 0) {
        a->v[k] = v;
        a->set |= (uint32_t)1 << k;
    }
    return 1;
}

/* -- otlp_metrics' value rules ---------------------------------------------------------------------- */
static int truthy(const val_t *v) {
    switch (v->type) {
    case V_ABSENT:
    case V_NONE: return 0;
    case V_STR:
    case V_BYTES: return v->n > 0; /* bytes: their hex, empty when they are */
    case V_INT:
    case V_BOOL: return v->i != 0;
    case V_DBL: return v->d != 0.0; /* NaN is true */
    default: return v->i > 0;       /* a list or a dict: not empty */
    }
}

/* a.get(k1) or a.get(k2) or ...: the first truthy value, else the last one's (which may be absent) */
static const val_t *first_truthy(const attrs_t *a, const int *keys, int n) {
    for (int i = 0; i < n - 1; i++)
        if (truthy(av(a, keys[i]))) return av(a, keys[i]);
    return av(a, keys[n - 1]);
}

/* str(v) of a value that is not None: R_VAL, or R_BAD (a float, a list or a dict: Python's repr) */
static int str_not_none(arena_t *o, const val_t *v, sref *out) {
    if (v->type == V_DBL || v->type == V_ARR || v->type == V_KVL) return R_BAD;
    return str_of(o, v, out);
}

/* str(v) if v else None */
static int str_if_truthy(arena_t *o, const val_t *v, sref *out) {
    out->p = NULL, out->n = 0;
    if (!truthy(v)) return R_NONE;
    return str_not_none(o, v, out);
}

/* str_or_none(v): None and "" are None */
static int str_or_none(arena_t *o, const val_t *v, sref *out) {
    out->p = NULL, out->n = 0;
    if (v->type == V_ABSENT || v->type == V_NONE) return R_NONE;
    if ((v->type == V_STR || v->type == V_BYTES) && v->n == 0) return R_NONE;
    return str_not_none(o, v, out);
}

/* int(s) of a string, as int32_or_none reads it. Only plain ASCII without blanks or underscores is read
 * here (Python's int() also takes those, and non-ASCII digits): anything else is R_BAD. */
static int int_of_string(const uint8_t *p, size_t n, int64_t *out) {
    for (size_t i = 0; i < n; i++)
        if (p[i] < 0x21 || p[i] > 0x7E || p[i] == '_') return R_BAD;
    size_t i = 0;
    int neg = 0;
    if (i < n && (p[i] == '+' || p[i] == '-')) neg = p[i++] == '-';
    if (i == n) return R_NONE; /* "", "+", "-": ValueError */
    for (size_t j = i; j < n; j++)
        if (p[j] < '0' || p[j] > '9') return R_NONE; /* ValueError */
    while (i < n - 1 && p[i] == '0') i++;
    if (n - i > 10) return R_NONE; /* past 32 bits */
    int64_t v = 0;
    for (; i < n; i++) v = v * 10 + (p[i] - '0');
    if (neg) v = -v;
    if (v < -INT32_MAXV - 1 || v > INT32_MAXV) return R_NONE;
    *out = v;
    return R_VAL;
}

/* int32_or_none(v) */
static int int32_or_none(const val_t *v, int64_t *out) {
    switch (v->type) {
    case V_DBL:
        if (!isfinite(v->d) || floor(v->d) != v->d) return R_NONE; /* not is_integer() */
        if (v->d < -2147483648.0 || v->d > 2147483647.0) return R_NONE;
        *out = (int64_t)v->d;
        return R_VAL;
    case V_INT:
        if (v->i < -INT32_MAXV - 1 || v->i > INT32_MAXV) return R_NONE;
        *out = v->i;
        return R_VAL;
    case V_STR:
        return int_of_string(v->p, v->n, out);
    case V_BYTES: { /* the hex of the bytes */
        char buf[64];
        if (v->n > sizeof buf / 2) return R_BAD; /* leading zeros could still make an int32 */
        hex_into(buf, v->p, v->n);
        return int_of_string((const uint8_t *)buf, 2 * v->n, out);
    }
    default:
        return R_NONE; /* None, bool, list, dict */
    }
}

static const int KS_GPU_UUID[] = {K_GPU_UUID, K_UUID_UC, K_UUID, K_HW_ID};
static const int KS_POINT_NODE[] = {K_HOSTNAME_UC, K_HOSTNAME, K_NODE, K_HOST};
static const int KS_RES_NODE[] = {K_NODE, K_HOST, K_HOSTNAME_UC, K_HOSTNAME};
static const int KS_HOST_SUB[] = {K_CGROUP_CONTAINER, K_CGROUP};
static const int KS_PID[] = {K_PROCESS_PID, K_PID};
static const int KS_POD[] = {K_POD_NAME, K_POD};
static const int KS_NS[] = {K_NS_NAME, K_NS};
static const int KS_CONTAINER[] = {K_CONTAINER_NAME, K_CONTAINER};
#define NKEYS(ks) ((int)(sizeof(ks) / sizeof(ks)[0]))

/* _gpu_of(a): the uuid (None: p NULL) and the index (-1 in *has_idx: None) */
static int gpu_of(arena_t *o, const attrs_t *a, sref *uuid, int64_t *idx, int *has_idx) {
    int r = str_if_truthy(o, first_truthy(a, KS_GPU_UUID, NKEYS(KS_GPU_UUID)), uuid);
    if (r == R_BAD) return R_BAD;
    /* attrs.get("gpu.index", attrs.get("gpu")): the key present, whatever its value */
    const val_t *iv = av(a, K_GPU_INDEX)->type != V_ABSENT ? av(a, K_GPU_INDEX) : av(a, K_GPU);
    r = int32_or_none(iv, idx);
    if (r == R_BAD) return R_BAD;
    *has_idx = r == R_VAL;
    return R_VAL;
}

/* -- the output ------------------------------------------------------------------------------------- */
/* tables and their columns, in the order of batch.py's GPU_COLUMNS, HOST_COLUMNS, PLACEMENT_COLUMNS and
 * GPU_INFO_COLUMNS */
enum { T_GPU, T_HOST, T_PROCESS, T_INFO, NT };
#define NC 10
enum { C_NONE, C_I64, C_F64, C_STR };
static const int KINDS[NT][NC] = {
    /* time, node, gpu_uuid, gpu_index, signal, sub, value */
    {C_I64, C_STR, C_STR, C_I64, C_STR, C_STR, C_F64},
    /* time, node, signal, sub, value */
    {C_I64, C_STR, C_STR, C_STR, C_F64},
    /* time, node, gpu_uuid, pid, container_id, pod_uid, pod, namespace, container, used_memory_bytes */
    {C_I64, C_STR, C_STR, C_I64, C_STR, C_STR, C_STR, C_STR, C_STR, C_F64},
    /* time, node, gpu_uuid, gpu_index, model, pci_bus_id, device */
    {C_I64, C_STR, C_STR, C_I64, C_STR, C_STR, C_STR},
};
#define I64_NONE INT64_MIN /* no integer column holds it: times are >= 0, the others 32-bit */

typedef struct {
    int64_t status;  /* FM_OK, FM_UNHANDLED, FM_NOMEM */
    int64_t ignored; /* points decode_metrics counts as ignored */
    int64_t n[NT];
    int64_t cap[NT];
    void *col[NT][NC];    /* int64 (I64_NONE: None), double (NaN: None) or int32 (index into the column's
                             distinct strings, -1: None) per row */
    blob_t blob[NT][NC];  /* a string column's distinct entries */
    /* private */
    strtab_t tabs[NT][NC];
    arena_t res_arena;   /* strings made (decimal, hex) for the resource at hand */
    arena_t point_arena; /* ... and for the point at hand */
    /* Origin.gpu_info_seen: info_seen[i] == res_gen where the GPU of gpu_info's gpu_uuid entry i has had
     * its DCGM identity row in the resource at hand */
    uint32_t *info_seen;
    int64_t info_seen_cap;
    uint32_t res_gen;
    /* Origin.dcgm_placed: by placements' gpu_uuid entry, the last DCGM placement in the resource at hand */
    struct placed {
        uint32_t gen; /* res_gen when set */
        int32_t node, pod, ns, container; /* entries of their columns (-1: None) */
        int64_t t;
    } *placed;
    int64_t placed_cap;
    /* the attributes of recent points, by the bytes of a run of attribute fields (a GPU's points carry the
     * same labels on every series: they are parsed once); entries point into the body */
    struct attr_cache *attr_cache;
    /* the run of the point at the same place of the metric before, by place (a Collector's metrics list a
     * scrape's series one after the other, each with the same targets' points in the same order): checked
     * before hashing the run; entries of their own, so that runs whose hashes collide do not evict them */
    struct attr_cache *attr_at;
    uint32_t point_no; /* the place of the point at hand in its metric */
    /* where each string column found a string of the body lately, by its address: the cached labels' strings
     * are the same bytes of the body point after point, and the body outlives the decode */
    struct memo {
        const uint8_t *p;
        size_t n;
        int64_t idx;
    } *memo;
    sref body;
} fm_out;

#define ATTR_AT 64
#define MEMO 16 /* per string column, a power of two */
#define ATTR_CACHE 32 /* a power of two */
#define ATTR_CACHE_MIN 128 /* bytes of a run worth the cache (dcgm-exporter's ten labels: ~300) */
struct attr_cache {
    const uint8_t *run; /* NULL: empty */
    size_t n;
    attrs_t attrs;
};

static int fail(fm_out *o, int status) {
    if (o->status == FM_OK) o->status = status;
    return 0;
}
#define BAD() return fail(o, FM_UNHANDLED)
#define NOMEM() return fail(o, FM_NOMEM)

static int grow_rows(fm_out *o, int t) {
    int64_t cap = o->cap[t] ? 2 * o->cap[t] : 1024;
    for (int c = 0; c < NC && KINDS[t][c] != C_NONE; c++) {
        size_t size = KINDS[t][c] == C_STR ? sizeof(int32_t) : 8;
        void *p = realloc(o->col[t][c], (size_t)cap * size);
        if (!p) return 0;
        o->col[t][c] = p;
    }
    o->cap[t] = cap;
    return 1;
}

/* the index of s among column (t, c)'s distinct strings, added if new: >= 0; -1 None; -2 no memory;
 * -3 a NUL in the string */
static int64_t dedup(fm_out *o, int t, int c, sref s) {
    struct memo *e = NULL;
    if (s.p && (uintptr_t)s.p - (uintptr_t)o->body.p < o->body.n) {
        if (!o->memo && !(o->memo = calloc((size_t)NT * NC * MEMO, sizeof *o->memo))) return -2;
        uint64_t h = ((uint64_t)(uintptr_t)s.p * 0x9E3779B97F4A7C15ULL) >> 60; /* MEMO = 16 */
        e = &o->memo[((size_t)t * NC + (size_t)c) * MEMO + h];
        if (e->p == s.p && e->n == s.n) return e->idx;
    }
    /* a string made for the point at hand is overwritten by the next point's */
    int64_t i = strtab_index(&o->tabs[t][c], &o->blob[t][c], s, &o->point_arena);
    if (e && i >= 0) e->p = s.p, e->n = s.n, e->idx = i;
    return i;
}

/* one row's cells, in column order: ints, doubles and strings taken from these in turn */
typedef struct {
    int64_t i[NC];
    double f[NC];
    sref s[NC];
} row_t;

static int put_row(fm_out *o, int t, const row_t *row) {
    if (o->n[t] == o->cap[t] && !grow_rows(o, t)) NOMEM();
    int64_t r = o->n[t];
    for (int c = 0; c < NC && KINDS[t][c] != C_NONE; c++) {
        switch (KINDS[t][c]) {
        case C_I64: ((int64_t *)o->col[t][c])[r] = row->i[c]; break;
        case C_F64: ((double *)o->col[t][c])[r] = row->f[c]; break;
        default: {
            int64_t idx = dedup(o, t, c, row->s[c]);
            if (idx == -2) NOMEM();
            if (idx == -3) BAD();
            ((int32_t *)o->col[t][c])[r] = (int32_t)idx;
        }
        }
    }
    o->n[t]++;
    return 1;
}

/* -- the messages ------------------------------------------------------------------------------------- */
typedef struct {
    int node_rule; /* R_VAL: node holds node_of(resource); R_BAD: it needs Python (used only when needed) */
    sref node;
} res_t;

/* Origin.node_of(point): the point's own node label, else the resource's */
static int node_of(fm_out *o, const attrs_t *a, const res_t *res, sref *out) {
    int r = str_if_truthy(&o->point_arena, first_truthy(a, KS_POINT_NODE, NKEYS(KS_POINT_NODE)), out);
    if (r != R_NONE) return r;
    *out = res->node;
    return res->node_rule;
}

/* arr (of *cap elements of `size` bytes) grown, zero-filled, to hold element i: the array (arr itself when
 * it holds it already), or NULL without memory (arr and *cap unchanged). */
static void *cover(void *arr, int64_t *cap, int64_t i, size_t size) {
    if (i < *cap) return arr;
    int64_t n = *cap ? *cap : 64;
    while (n <= i) n *= 2;
    char *p = realloc(arr, (size_t)n * size);
    if (!p) return NULL;
    memset(p + (size_t)*cap * size, 0, (size_t)(n - *cap) * size);
    *cap = n;
    return p;
}

/* _dcgm_labels: what a DCGM point's labels say besides its value. The GPU is named by its uuid, else
 * f"{node}/gpu{idx}"; its identity row comes once per resource, where modelName, pci_bus_id or device is
 * truthy; a point naming a pod or container is a placement without pid (pid 0: DCGM knows none). */
static int dcgm_labels(fm_out *o, const attrs_t *a, int64_t t, sref node, sref uuid, int64_t idx, int has_idx) {
    arena_t *pa = &o->point_arena;
    sref gpu = uuid;
    if (!gpu.p) { /* has_idx here: a point with neither was ignored before */
        char num[32] = "/gpu";
        size_t k = 4 + fmt_int(idx, num + 4);
        sref head, tail; /* consecutive in the arena: one string (too long for the point's reserve: declined) */
        if (!arena_put(pa, node.p, node.n, &head) || !arena_put(pa, num, k, &tail)) BAD();
        gpu.p = head.p, gpu.n = node.n + k;
    }
    row_t row;
    const val_t *model = av(a, K_MODEL_NAME), *pci = av(a, K_DCGM_PCI), *dev = av(a, K_DCGM_DEVICE);
    if (truthy(model) || truthy(pci) || truthy(dev)) {
        int64_t gi = dedup(o, T_INFO, 2, gpu);
        if (gi == -2) NOMEM();
        if (gi < 0) BAD();
        uint32_t *seen = cover(o->info_seen, &o->info_seen_cap, gi, sizeof *seen);
        if (!seen) NOMEM();
        o->info_seen = seen;
        if (o->info_seen[gi] != o->res_gen) {
            o->info_seen[gi] = o->res_gen;
            row.i[0] = t, row.s[1] = node, row.s[2] = gpu, row.i[3] = has_idx ? idx : I64_NONE;
            if (str_or_none(pa, model, &row.s[4]) == R_BAD) BAD();
            if (str_or_none(pa, pci, &row.s[5]) == R_BAD) BAD();
            if (str_or_none(pa, dev, &row.s[6]) == R_BAD) BAD();
            if (!put_row(o, T_INFO, &row)) return 0;
        }
    }
    const val_t *pod = av(a, K_POD), *container = av(a, K_CONTAINER);
    if (truthy(pod) || truthy(container)) {
        row.i[0] = t, row.s[1] = node, row.s[2] = gpu, row.i[3] = 0;
        row.s[4].p = NULL, row.s[4].n = 0, row.s[5].p = NULL, row.s[5].n = 0;
        if (str_or_none(pa, pod, &row.s[6]) == R_BAD) BAD();
        if (str_or_none(pa, av(a, K_NS), &row.s[7]) == R_BAD) BAD();
        if (str_or_none(pa, container, &row.s[8]) == R_BAD) BAD();
        row.f[9] = NAN;
        /* the same pod at the same time as this GPU's last placement here: the same placement (equal strings
         * are equal entries of their columns) */
        int64_t e[5];
        const int cols[5] = {2, 1, 6, 7, 8};
        for (int k = 0; k < 5; k++) {
            e[k] = dedup(o, T_PROCESS, cols[k], row.s[cols[k]]);
            if (e[k] == -2) NOMEM();
            if (e[k] < -1) BAD();
        }
        int64_t gi = e[0];
        struct placed *placed = cover(o->placed, &o->placed_cap, gi, sizeof *placed);
        if (!placed) NOMEM();
        o->placed = placed;
        struct placed *last = &o->placed[gi];
        if (last->gen == o->res_gen && last->t == t && last->node == e[1] && last->pod == e[2] && last->ns == e[3]
            && last->container == e[4])
            return 1;
        last->gen = o->res_gen, last->t = t;
        last->node = (int32_t)e[1], last->pod = (int32_t)e[2], last->ns = (int32_t)e[3];
        last->container = (int32_t)e[4];
        if (!put_row(o, T_PROCESS, &row)) return 0;
    }
    return 1;
}

/* add_attr for each attribute field from m->p to end (a run attr_run has measured) */
static int parse_run(rd *m, const uint8_t *end, int depth, attrs_t *a) {
    rd sub;
    while (m->p < end) {
        uint32_t f;
        int wt;
        if (!rd_tag(m, &f, &wt) || !rd_len(m, &sub) || !add_attr(sub, depth + 1, a)) return 0;
    }
    return 1;
}

/* The run of consecutive attribute fields (7) at m into *a (later ones win, as add_attr one by one), m moved
 * past it. Parsing a run is a function of its bytes and the depth (the same for every point), and a GPU's
 * points carry the same labels on every series: a run whose bytes an earlier point's had is taken from the
 * cache. 0: a bad attribute (the caller declines), or no memory (o->status says so). */
static int attr_run(fm_out *o, rd *m, int depth, attrs_t *a) {
    rd it = *m, sub;
    const uint8_t *start = m->p;
    for (;;) { /* the run's extent: tags and lengths only */
        rd at = it;
        uint32_t f;
        int wt;
        if (at.p >= at.end || !rd_tag(&at, &f, &wt) || f != 7 || wt != WT_LEN || !rd_len(&at, &sub)) break;
        it = at;
    }
    size_t n = (size_t)(it.p - start);
    if (!n) return 0; /* a field 7 that is not a message */
    if (n < ATTR_CACHE_MIN) /* a few labels (the agent's): parsing them costs less than the cache */
        return parse_run(m, it.p, depth, a);
    if (!o->attr_cache && !(o->attr_cache = calloc(ATTR_CACHE, sizeof *o->attr_cache))) return fail(o, FM_NOMEM);
    if (!o->attr_at && !(o->attr_at = calloc(ATTR_AT, sizeof *o->attr_at))) return fail(o, FM_NOMEM);
    uint32_t at = o->point_no;
    struct attr_cache *e = at < ATTR_AT ? &o->attr_at[at] : NULL;
    if (!(e && e->run && e->n == n && memcmp(e->run, start, n) == 0)) {
        struct attr_cache *h = &o->attr_cache[hash_words(start, n) & (ATTR_CACHE - 1)];
        if (!(h->run && h->n == n && memcmp(h->run, start, n) == 0)) {
            attrs_t r;
            attrs_clear(&r);
            rd p = *m;
            if (!parse_run(&p, it.p, depth, &r)) return 0;
            h->run = start, h->n = n, h->attrs = r;
        }
        if (e) *e = *h;
        e = h;
    }
    for (uint32_t set = e->attrs.set; set; set &= set - 1) {
        int k = __builtin_ctz(set);
        a->v[k] = e->attrs.v[k];
    }
    a->set |= e->attrs.set;
    *m = it;
    return 1;
}

/* one NumberDataPoint of a metric whose points become rows by `name` (NULL: a name nobody knows) */
static int do_point(fm_out *o, rd m, const name_t *name, const res_t *res, int depth) {
    attrs_t a;
    attrs_clear(&a);
    uint64_t t = 0, bits = 0;
    uint32_t flags = 0;
    int which = 0; /* the value's oneof: 0 none, 4 as_double, 6 as_int (the last one on the wire) */
    if (!arena_reserve(&o->point_arena, 3 * (size_t)(m.end - m.p) + 64)) NOMEM();
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        uint64_t x;
        rd at = m;
        if (!rd_tag(&at, &f, &wt)) BAD();
        if (f == 7) { /* the attributes, a run at a time */
            if (!attr_run(o, &m, depth, &a)) {
                if (o->status == FM_OK) BAD();
                return 0;
            }
            continue;
        }
        m = at;
        switch (f) {
        case 2: ok = wt == WT_I64 && skip_scalar(&m, wt); break;
        case 3: ok = wt == WT_I64 && rd_fixed64(&m, &t); break;
        case 4:
        case 6:
            ok = wt == WT_I64 && rd_fixed64(&m, &bits);
            which = (int)f;
            break;
        case 8:
            ok = wt == WT_VARINT && rd_varint(&m, &x);
            flags = (uint32_t)x; /* a uint32: upb keeps the low 32 bits */
            break;
        default: ok = skip_unknown(&m, wt); /* exemplars (5) included: a message */
        }
        if (!ok) BAD();
    }
    if (!name) return 1; /* out.ignored += len(points), counted by the caller */
    if (name->action == A_SKIP || t > (uint64_t)INT64_MAX) {
        o->ignored++;
        return 1;
    }
    double v = NAN; /* _value: NaN is None */
    if (!(flags & 1)) {
        if (which == 4) {
            memcpy(&v, &bits, sizeof v); /* a NaN stays NaN: None */
        } else if (which == 6) {
            v = (double)(int64_t)bits;
        }
    }
    row_t row;
    arena_t *pa = &o->point_arena;
    sref node;
    row.i[0] = (int64_t)t;
    switch (name->action) {
    case A_HOST:
        if (node_of(o, &a, res, &node) == R_BAD) BAD();
        row.s[1] = node;
        row.s[2].p = (const uint8_t *)name->signal, row.s[2].n = name->signal_n;
        /* str(a.get("container_id") or a.get("cgroup") or "") or None */
        if (str_if_truthy(pa, first_truthy(&a, KS_HOST_SUB, NKEYS(KS_HOST_SUB)), &row.s[3]) == R_BAD) BAD();
        row.f[4] = v;
        return put_row(o, T_HOST, &row);
    case A_PROCESS: {
        sref uuid;
        int64_t idx, pid;
        int has_idx, r;
        if (gpu_of(pa, &a, &uuid, &idx, &has_idx) == R_BAD) BAD();
        if ((r = int32_or_none(first_truthy(&a, KS_PID, NKEYS(KS_PID)), &pid)) == R_BAD) BAD();
        if (!uuid.p || r != R_VAL) {
            o->ignored++;
            return 1;
        }
        if (node_of(o, &a, res, &node) == R_BAD) BAD();
        row.s[1] = node, row.s[2] = uuid, row.i[3] = pid;
        if (str_or_none(pa, av(&a, K_CONTAINER_ID), &row.s[4]) == R_BAD) BAD();
        if (str_or_none(pa, av(&a, K_POD_UID), &row.s[5]) == R_BAD) BAD();
        if (str_or_none(pa, first_truthy(&a, KS_POD, NKEYS(KS_POD)), &row.s[6]) == R_BAD) BAD();
        if (str_or_none(pa, first_truthy(&a, KS_NS, NKEYS(KS_NS)), &row.s[7]) == R_BAD) BAD();
        if (str_or_none(pa, first_truthy(&a, KS_CONTAINER, NKEYS(KS_CONTAINER)), &row.s[8]) == R_BAD) BAD();
        row.f[9] = v;
        return put_row(o, T_PROCESS, &row);
    }
    case A_INFO: {
        sref uuid;
        int64_t idx;
        int has_idx;
        if (gpu_of(pa, &a, &uuid, &idx, &has_idx) == R_BAD) BAD();
        if (!uuid.p) {
            o->ignored++;
            return 1;
        }
        if (node_of(o, &a, res, &node) == R_BAD) BAD();
        row.s[1] = node, row.s[2] = uuid, row.i[3] = has_idx ? idx : I64_NONE;
        if (str_or_none(pa, av(&a, K_MODEL), &row.s[4]) == R_BAD) BAD();
        if (str_or_none(pa, av(&a, K_PCI), &row.s[5]) == R_BAD) BAD();
        if (str_or_none(pa, av(&a, K_DEVICE), &row.s[6]) == R_BAD) BAD();
        return put_row(o, T_INFO, &row);
    }
    default: { /* A_GPU, A_DCGM */
        sref uuid;
        int64_t idx;
        int has_idx;
        if (name->action == A_DCGM && !isnan(v) && name->factor != 1.0) v *= name->factor;
        if (gpu_of(pa, &a, &uuid, &idx, &has_idx) == R_BAD) BAD();
        if (!uuid.p && !has_idx) {
            o->ignored++;
            return 1;
        }
        if (node_of(o, &a, res, &node) == R_BAD) BAD();
        row.s[1] = node, row.s[2] = uuid, row.i[3] = has_idx ? idx : I64_NONE;
        row.s[4].p = (const uint8_t *)name->signal, row.s[4].n = name->signal_n;
        row.s[5].p = NULL, row.s[5].n = 0;
        if (name->label != L_NONE) { /* str(a.get(label)) if a.get(label) is not None else None */
            const val_t *lv = av(&a, LABEL_KEY[name->label]);
            if (lv->type != V_ABSENT && lv->type != V_NONE && str_not_none(pa, lv, &row.s[5]) == R_BAD) BAD();
        }
        row.f[6] = v;
        if (!put_row(o, T_GPU, &row)) return 0;
        return name->action != A_DCGM || dcgm_labels(o, &a, (int64_t)t, node, uuid, idx, has_idx);
    }
    }
}

/* Gauge (field 1: data_points) or Sum (1: data_points, 2: temporality, 3: monotonic) */
static int do_points(fm_out *o, rd m, int is_sum, const name_t *name, const res_t *res, int depth) {
    o->point_no = 0;
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        rd sub;
        if (!rd_tag(&m, &f, &wt)) BAD();
        if (f == 1) {
            if (wt != WT_LEN || !rd_len(&m, &sub)) BAD();
            if (!do_point(o, sub, name, res, depth + 1)) return 0;
            if (!name) o->ignored++;
            o->point_no++;
            continue;
        }
        if (is_sum && (f == 2 || f == 3)) ok = wt == WT_VARINT && skip_scalar(&m, wt);
        else ok = skip_unknown(&m, wt);
        if (!ok) BAD();
    }
    return 1;
}

static int starts_dcgm(const uint8_t *p, size_t n) {
    static const char pre[] = "dcgm_";
    if (n < 5) return 0;
    for (int i = 0; i < 5; i++) {
        uint8_t c = p[i] >= 'A' && p[i] <= 'Z' ? (uint8_t)(p[i] + 32) : p[i];
        if (c != (uint8_t)pre[i]) return 0;
    }
    return 1;
}

static int do_metric(fm_out *o, rd m, const res_t *res, int depth) {
    rd it = m, name = {m.p, m.p}, data = {m.p, m.p};
    uint32_t data_field = 0;
    int n_data = 0;
    /* the name first, wherever it is in the message (a later one wins) */
    while (it.p < it.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&it, &f, &wt)) BAD();
        switch (f) {
        case 1: ok = wt == WT_LEN && rd_string(&it, &name); break;
        case 2: case 3: ok = valid_string(&it, wt); break;
        case 5: case 7: case 9: case 10: case 11:
            ok = wt == WT_LEN && !n_data++ && rd_len(&it, &data); /* two: upb's oneof rules */
            data_field = f;
            break;
        case 12: ok = valid_kv(&it, wt, depth + 1); break;
        default: ok = skip_unknown(&it, wt);
        }
        if (!ok) BAD();
    }
    if (!n_data) {
        o->ignored++;
        return 1;
    }
    if (data_field != 5 && data_field != 7) BAD(); /* histograms and summaries: the reference path */
    size_t n = (size_t)(name.end - name.p);
    const name_t *e = name_lookup(name.p, n);
    if (!e && starts_dcgm(name.p, n)) {
        /* _resolve_cached: a DCGM name in another case is read in upper case; one unknown even so is ignored */
        uint8_t up[256];
        if (n > sizeof up) BAD();
        for (size_t i = 0; i < n; i++) {
            if (name.p[i] >= 0x80) BAD(); /* str.upper() beyond ASCII: Python's */
            up[i] = name.p[i] >= 'a' && name.p[i] <= 'z' ? (uint8_t)(name.p[i] - 32) : name.p[i];
        }
        e = name_lookup(up, n);
    }
    if (e && e->action == A_DECLINE) BAD();
    return do_points(o, data, data_field == 7, e, res, depth + 1);
}

typedef struct {
    fm_out *o;
    const res_t *res;
} metric_ctx;

static int metric_item(void *ctx, rd metric, int depth) {
    metric_ctx *c = ctx;
    return do_metric(c->o, metric, c->res, depth);
}

static int do_resource_metrics(void *ctx, rd m) {
    fm_out *o = ctx;
    const int depth = 1;
    attrs_t a;
    attrs_clear(&a);
    int r = read_resource(m, depth, &o->res_arena, add_attr, &a);
    if (r < 0) NOMEM();
    if (!r) BAD();
    res_t res;
    res.node_rule = str_if_truthy(&o->res_arena, first_truthy(&a, KS_RES_NODE, NKEYS(KS_RES_NODE)), &res.node);
    if (res.node_rule == R_NONE) {
        res.node.p = (const uint8_t *)"unknown", res.node.n = 7;
        res.node_rule = R_VAL;
    }
    o->res_gen++; /* a new Origin: no GPU's DCGM identity row seen yet */
    /* the remembered strings of the previous resource may be overwritten now */
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < NC; c++) o->tabs[t][c].last_p = NULL;
    metric_ctx c = {o, &res};
    return each_item(m, depth, metric_item, &c) || fail(o, FM_UNHANDLED);
}

/* -- the interface ---------------------------------------------------------------------------------- */
int fm_abi(void) { return FM_ABI; }

/* Once, before any fm_add_name and fm_decode. 1 when ready. */
int fm_init(void) {
    if (!keys_ready) keys_ready = keyset_init(&POINT_KEYS, KEYS, K_COUNT);
    return keys_ready;
}

/* What becomes of the points of metric `name` (Python's rules, given once before any fm_decode): action
 * A_*, the attribute of a GPU sample's sub (L_*), the canonical signal name stored, and (A_DCGM) the factor
 * to the catalog's unit. 1: added. */
int fm_add_name(const char *name, size_t n, int action, int label, const char *signal, size_t signal_n,
                double factor) {
    if (n_names >= NAME_CAP / 2 || action <= A_UNKNOWN || action > A_DCGM || label < L_NONE || label > L_XID)
        return 0;
    if (name_lookup((const uint8_t *)name, n)) return 0;
    uint64_t h = hash_words((const uint8_t *)name, n);
    uint64_t j = h & (NAME_CAP - 1);
    while (NAMES[j].name) j = (j + 1) & (NAME_CAP - 1);
    char *copy = malloc(n + 1), *sig = malloc(signal_n + 1);
    if (!copy || !sig) {
        free(copy);
        free(sig);
        return 0;
    }
    memcpy(copy, name, n);
    copy[n] = 0;
    memcpy(sig, signal, signal_n);
    sig[signal_n] = 0;
    name_t *e = &NAMES[j];
    e->n = n, e->hash = h, e->action = action, e->label = label, e->signal = sig, e->signal_n = signal_n;
    e->factor = factor;
    e->name = copy; /* last: a lookup sees a whole entry or none */
    n_names++;
    return 1;
}

void fm_free(fm_out *o) {
    if (!o) return;
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < NC; c++) {
            free(o->col[t][c]);
            free(o->blob[t][c].buf);
            free(o->tabs[t][c].tab);
        }
    free(o->res_arena.buf);
    free(o->point_arena.buf);
    free(o->info_seen);
    free(o->placed);
    free(o->attr_cache);
    free(o->attr_at);
    free(o->memo);
    free(o);
}

/* Decode the serialized ExportMetricsServiceRequest buf[0:len]. Returns NULL without memory; else a result
 * whose status says whether it holds the rows (FM_OK) or the caller must take the reference path. */
fm_out *fm_decode(const uint8_t *buf, size_t len) {
    fm_out *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    if (!keys_ready || !n_names) {
        fail(o, FM_UNHANDLED); /* fm_init or fm_add_name was not called */
        return o;
    }
    rd m = {buf, buf + len};
    o->body.p = buf, o->body.n = len;
    if (!each_resource(m, do_resource_metrics, o)) fail(o, FM_UNHANDLED); /* a callback's own reason stays */
    return o;
}
