/* The compiled fast path of span decoding (correlator/ingest/fast_spans.py loads it with ctypes).
 *
 * Parses the protobuf wire format of an OTLP ExportTraceServiceRequest directly from the body bytes and
 * applies exactly the rules of correlator/ingest/otlp_spans.py::decode_spans (its _f, _i, _s, node_of,
 * is_request_span, the derivations and the start_ns repair, in the same double arithmetic), writing one
 * row per request span into column buffers.
 *
 * Exactness by construction: whatever this file does not handle exactly as protobuf (upb) plus
 * decode_spans would, it does not handle at all: fs_decode reports FS_UNHANDLED and the caller takes the
 * reference path with the same bytes. That covers malformed or truncated wire data, groups, varints that
 * are longer than 10 bytes or carry bits past 64, length-delimited fields this schema does not know (a
 * newer schema may validate them), AnyValue fields outside 1..7 or more than one of them, a KeyValue with
 * its key or its value twice, a Resource twice (upb would merge them), a known field with another wire
 * type, nesting deeper than MAX_DEPTH, and every value conversion
 * that needs Python (a string where a number is read, str() of a float, of a kvlist or of a nested list,
 * a string holding NUL). Invalid UTF-8 in any string field is unhandled too (upb refuses it). What is
 * handled follows protobuf and Python exactly: a later scalar field wins, a later attribute of the same key
 * wins (as in attributes_of's dict), fields are read wherever they are in their message.
 * Every read is bounds-checked; nothing is read past buf + len. fs_decode keeps no state between calls
 * (fs_init fills constant tables once) and may run in several threads at once.
 *
 * Plain C99, no Python headers. Compiled with -ffp-contract=off so that no multiply-add is fused.
 */
#include "_otlp_wire.h"

#define FS_OK 0
#define FS_UNHANDLED 1
#define FS_NOMEM 2

/* -- the output ------------------------------------------------------------------------------------ */
enum { F_TTFT, F_TPOT, F_E2E, F_QUEUE, F_PREFILL, F_DECODE, F_INFERENCE, NF };
enum { I_START, I_END, I_PROMPT, I_OUTPUT, I_PID, NI };
/* string columns: the first ND are deduplicated (an index per row into the column's distinct values), the
 * rest hold one entry per row */
enum { S_NODE, S_SERVICE, S_MODEL, S_ENGINE, S_FINISH, S_CONTAINER, S_POD_UID, S_POD, S_NS, S_GPUS, ND,
       S_TRACE = ND, S_SPAN, S_REQ, S_SUFFIX, NS };
/* The store's form of a request (Store.request_rows): ids of 16 and 8 bytes as 64-bit words (the others as
 * their hex, in S_TRACE / S_SPAN); a request id that ends in 32 hex digits (form 1), a UUID (2) or has 32 hex
 * digits before its last '-' (3) as prefix (S_REQ), two words and suffix (S_SUFFIX); a latency that equals its
 * derivation bit for bit (or is missing with it) not given (NaN) but flagged in U_DERIVED. */
enum { W_TRACE_HI, W_TRACE_LO, W_SPAN, W_REQ_HI, W_REQ_LO, NW };
enum { U_TRACE_WORDS, U_SPAN_WORD, U_REQ_FORM, U_DERIVED, NU };
#define REQ_TEXT 0  /* U_REQ_FORM: the id as text in S_REQ */
#define REQ_NONE 255 /* no request id */
/* the bits of U_DERIVED: store/schema.py's DERIVED_LATENCIES */
#define D_TTFT 1
#define D_TPOT 2
#define D_E2E 4
#define D_INFERENCE 8

/* The rows as Arrow arrays, through Arrow's C data interface
 * (https://arrow.apache.org/docs/format/CDataInterface.html): one struct array whose children are the
 * columns of STORED_REQUEST_COLUMNS (correlator/ingest/batch.py), in its order, so that Python imports the
 * whole table with one call and no copy (fast_spans.py gives the schema). */
struct ArrowArray {
    int64_t length, null_count, offset, n_buffers, n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};
enum { A_START, A_END, A_NODE, A_SERVICE, A_MODEL, A_ENGINE, A_TRACE_HI, A_TRACE_LO, A_SPAN_BIN, A_REQ_HI,
       A_REQ_LO, A_REQ_FORM, A_TRACE_TEXT, A_SPAN_TEXT, A_REQ_TEXT, A_REQ_SUFFIX, A_DERIVED, A_TTFT, A_TPOT,
       A_E2E, A_QUEUE, A_PREFILL, A_DECODE, A_INFERENCE, A_PROMPT, A_OUTPUT, A_FINISH, A_PID, A_CONTAINER,
       A_POD_UID, A_POD, A_NS, A_GPUS, NA };
#define MAX_OWNED (3 * NA) /* 58 at most now */

typedef struct {
    int64_t status;      /* FS_OK, FS_UNHANDLED, FS_NOMEM */
    int64_t n;           /* request rows */
    int64_t ignored;     /* spans decode_spans counts as ignored */
    struct ArrowArray arrow; /* FS_OK with rows: all of them as one Arrow struct array (see fs_arrow) */
    /* private (fast_spans.py reads the four fields above): the columns the array is made from */
    int64_t cap;
    double *f[NF];       /* NaN: None (no value of these columns is ever NaN) */
    int64_t *iv[NI];     /* -1: None (prompt, output, pid; start and end are never None) */
    int32_t *sidx[NS];   /* deduplicated columns: index into the distinct values, -1: None; else NULL */
    blob_t blob[NS];     /* a deduplicated column's distinct entries; another's, an entry per row */
    uint64_t *w[NW];     /* the stored form's words (0 where not used) */
    uint8_t *u8[NU];     /* ... and its flags */
    struct ArrowArray kids[NA];
    struct ArrowArray *kid_ptrs[NA];
    const void *bufs[NA][3];
    const void *top_bufs[1];
    void *owned[MAX_OWNED]; /* the Arrow buffers made from the columns above */
    int n_owned;
    int arrow_live;      /* the Arrow array was made and not yet released */
    int py_done;         /* fs_free was called */
    strtab_t tabs[ND];
    arena_t res_arena;   /* strings this file makes (hex, decimal, joins) for the resource at hand */
    arena_t span_arena;  /* ... and for the span at hand */
} fs_out;

/* -- the keys decode_spans reads -------------------------------------------------------------------- */
enum {
    K_E2E, K_QUEUE, K_TTFT, K_PREFILL, K_DECODE, K_INFERENCE, K_SRV_TTFT,
    K_COMPLETION, K_OUTPUT, K_PROMPT, K_INPUT, K_PID,
    K_RESP_MODEL, K_REQ_MODEL, K_PROVIDER, K_SYSTEM, K_REQ_ID, K_RESP_ID, K_FINISHES, K_FINISH,
    K_CONTAINER, K_POD_UID, K_POD, K_NS, K_GPUS,
    K_NODE, K_HOST, K_HOSTNAME_UC, K_HOSTNAME, K_SERVICE, K_MODEL, K_VLLM_MODEL,
    K_COUNT
};

static const char *const KEYS[K_COUNT] = {
    "gen_ai.latency.e2e", "gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token",
    "gen_ai.latency.time_in_model_prefill", "gen_ai.latency.time_in_model_decode",
    "gen_ai.latency.time_in_model_inference", "gen_ai.server.time_to_first_token",
    "gen_ai.usage.completion_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.input_tokens", "process.pid",
    "gen_ai.response.model", "gen_ai.request.model", "gen_ai.provider.name", "gen_ai.system",
    "gen_ai.request.id", "gen_ai.response.id", "gen_ai.response.finish_reasons", "gen_ai.response.finish_reason",
    "container.id", "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "gpu.uuids",
    "k8s.node.name", "host.name", "Hostname", "hostname", "service.name", "model", "vllm.model",
};
static keyset_t SPAN_KEYS;
static int keylen_ready;

static const char LAT_PREFIX[] = "gen_ai.latency.";

typedef struct {
    val_t v[K_COUNT];
    int latency_prefix; /* some key starts with gen_ai.latency. */
} attrs_t;

/* one KeyValue of an attribute list into attrs (a later one of the same key wins, as in a dict) */
static int add_attr(rd kvmsg, int depth, void *attrs) {
    attrs_t *a = attrs;
    rd key;
    val_t v;
    if (!parse_kv(kvmsg, depth, &key, &v)) return 0;
    size_t n = (size_t)(key.end - key.p);
    if (n >= sizeof LAT_PREFIX - 1 && memcmp(key.p, LAT_PREFIX, sizeof LAT_PREFIX - 1) == 0) a->latency_prefix = 1;
    int k = keyset_index(&SPAN_KEYS, key.p, n);
    if (k >= 0) a->v[k] = v;
    return 1;
}

static void attrs_clear(attrs_t *a) {
    for (int i = 0; i < K_COUNT; i++) a->v[i].type = V_ABSENT;
    a->latency_prefix = 0;
}

/* -- decode_spans' value rules ---------------------------------------------------------------------- */

/* _f(attrs, k) for one key: R_VAL with *out, R_NONE to try the next key */
static int f_one(const val_t *v, double *out) {
    switch (v->type) {
    case V_DBL:
        if (0.0 <= v->d && v->d < INFINITY) {
            *out = v->d;
            return R_VAL;
        }
        return R_NONE;
    case V_INT: {
        double f = (double)v->i;
        if (isfinite(f) && f >= 0.0) {
            *out = f;
            return R_VAL;
        }
        return R_NONE;
    }
    case V_STR:
    case V_BYTES:
        return R_BAD; /* float(str): Python's parser */
    default:
        return R_NONE; /* absent, None, bool, list, dict */
    }
}

static int get_f(const attrs_t *a, int k1, int k2, double *out) {
    int r = f_one(&a->v[k1], out);
    if (r != R_NONE || k2 < 0) return r;
    return f_one(&a->v[k2], out);
}

static int i_one(const val_t *v, int64_t *out) {
    if (v->type == V_INT) {
        if (v->i >= 0 && v->i <= INT32_MAXV) {
            *out = v->i;
            return R_VAL;
        }
        return R_NONE;
    }
    double f;
    int r = f_one(v, &f);
    if (r != R_VAL) return r;
    if (f <= (double)INT32_MAXV) {
        *out = (int64_t)f;
        return R_VAL;
    }
    return 2; /* None, and no further key is tried */
}

static int get_i(const attrs_t *a, int k1, int k2, int64_t *out) {
    int r = i_one(&a->v[k1], out);
    if (r == 2) return R_NONE;
    if (r != R_NONE || k2 < 0) return r;
    r = i_one(&a->v[k2], out);
    return r == 2 ? R_NONE : r;
}

/* ",".join(str(x) for x in the list) */
static int join_of(arena_t *o, const val_t *v, sref *out) {
    rd it = {v->p, v->p + v->n};
    size_t start = o->len;
    int first = 1;
    while (it.p < it.end) {
        uint32_t g;
        int wt;
        rd el;
        val_t ev;
        sref s;
        if (!rd_tag(&it, &g, &wt)) return R_BAD;
        if (g != 1) {
            if (!skip_unknown(&it, wt)) return R_BAD;
            continue;
        }
        if (!rd_len(&it, &el) || !parse_any(el, 0, &ev)) return R_BAD;
        if (v->i == 1) return str_of(o, &ev, out); /* one element: itself, no copy of a string */
        if (!first && !arena_put(o, ",", 1, &s)) return R_BAD;
        first = 0;
        size_t before = o->len;
        if (str_of(o, &ev, &s) != R_VAL) return R_BAD;
        if (o->len == before && s.n) { /* a string element: copy it in */
            if (!arena_put(o, s.p, s.n, &s)) return R_BAD;
        }
    }
    out->p = (const uint8_t *)o->buf + start;
    out->n = o->len - start;
    return R_VAL;
}

/* _s(attrs, k) for one key: R_VAL with a non-empty string, R_NONE to try the next key, R_BAD */
static int s_one(arena_t *o, const val_t *v, sref *out) {
    int r;
    switch (v->type) {
    case V_ABSENT:
    case V_NONE:
        return R_NONE;
    case V_ARR:
        if (v->i == 0) return R_NONE;
        r = join_of(o, v, out);
        break;
    case V_DBL:
    case V_KVL:
        return R_BAD; /* str(float), str(dict): Python's */
    default:
        r = str_of(o, v, out);
    }
    if (r != R_VAL) return r;
    return out->n ? R_VAL : R_NONE;
}

static int get_s(arena_t *o, const attrs_t *a, const int *keys, int nkeys, sref *out) {
    out->p = NULL, out->n = 0;
    for (int i = 0; i < nkeys; i++) {
        int r = s_one(o, &a->v[keys[i]], out);
        if (r != R_NONE) return r;
    }
    out->p = NULL, out->n = 0;
    return R_NONE;
}

/* node_of(resource): the first truthy of four keys, as str() */
static int node_of(arena_t *o, const attrs_t *a, sref *out) {
    static const int keys[4] = {K_NODE, K_HOST, K_HOSTNAME_UC, K_HOSTNAME};
    for (int i = 0; i < 4; i++) {
        const val_t *v = &a->v[keys[i]];
        switch (v->type) {
        case V_ABSENT:
        case V_NONE:
            continue;
        case V_STR:
        case V_BYTES:
            if (!v->n) continue;
            return str_of(o, v, out);
        case V_INT:
        case V_BOOL:
            if (!v->i) continue;
            return str_of(o, v, out);
        case V_DBL:
            if (v->d == 0.0) continue;
            return R_BAD;
        default: /* list, dict: repr() unless empty */
            if (v->i == 0) continue;
            return R_BAD;
        }
    }
    out->p = (const uint8_t *)"unknown", out->n = 7;
    return R_VAL;
}

/* -- output columns -------------------------------------------------------------------------------- */
/* each column of arr[0:count] to cap rows; 0 without memory */
#define GROW(arr, count)                                                    \
    for (int c_ = 0; c_ < (count); c_++) {                                  \
        void *p_ = realloc((arr)[c_], (size_t)cap * sizeof *(arr)[c_]);     \
        if (!p_) return 0;                                                  \
        (arr)[c_] = p_;                                                     \
    }

static int grow_rows(fs_out *o) {
    int64_t cap = o->cap ? 2 * o->cap : 256;
    GROW(o->f, NF)
    GROW(o->iv, NI)
    GROW(o->sidx, ND)
    GROW(o->w, NW)
    GROW(o->u8, NU)
    o->cap = cap;
    return 1;
}

/* append the hex of n bytes as an entry; 0 without memory */
static int blob_hex(blob_t *b, const uint8_t *p, size_t n) {
    if (!blob_reserve(b, 2 * n + 1)) return 0;
    hex_into(b->buf + b->len, p, n);
    b->len += (int64_t)(2 * n);
    b->buf[b->len++] = 0;
    b->count++;
    return 1;
}

/* -- the stored form ---------------------------------------------------------------------------------- */
static uint64_t be64(const uint8_t *p) {
    uint64_t w = 0;
    for (int i = 0; i < 8; i++) w = w << 8 | p[i];
    return w;
}

/* a byte's value as a lower-case hex digit, -1: not one (fs_init fills it) */
static int8_t HEXV[256];

/* 32 lower-case hex digits as two words; 0 if some byte is not one */
static int hex_words(const uint8_t *p, uint64_t *hi, uint64_t *lo) {
    uint64_t a = 0, b = 0;
    int bad = 0;
    for (int i = 0; i < 16; i++) {
        int v = HEXV[p[i]];
        bad |= v;
        a = a << 4 | (uint64_t)(v & 15);
    }
    for (int i = 16; i < 32; i++) {
        int v = HEXV[p[i]];
        bad |= v;
        b = b << 4 | (uint64_t)(v & 15);
    }
    if (bad < 0) return 0;
    *hi = a, *lo = b;
    return 1;
}

/* Store._split_request_id of one id s[0:n]: its form (REQ_TEXT, or 1, 2, 3: see above), and for a form
 * where its 32 digits (a UUID's 36 characters) begin, their words, and (form 3) where the suffix begins */
static int request_form(const uint8_t *s, size_t n, size_t *at, size_t *suffix_at, uint64_t *hi, uint64_t *lo) {
    uint8_t any = 0;
    for (size_t i = 0; i < n; i++) any |= s[i];
    if (any & 0x80) return REQ_TEXT; /* not ASCII */
    if (n >= 32 && hex_words(s + n - 32, hi, lo)) {
        *at = n - 32;
        return 1;
    }
    if (n >= 36) {
        const uint8_t *u = s + n - 36;
        if (u[8] == '-' && u[13] == '-' && u[18] == '-' && u[23] == '-') {
            uint8_t d[32];
            memcpy(d, u, 8), memcpy(d + 8, u + 9, 4), memcpy(d + 12, u + 14, 4), memcpy(d + 16, u + 19, 4);
            memcpy(d + 20, u + 24, 12);
            if (hex_words(d, hi, lo)) {
                *at = n - 36;
                return 2;
            }
        }
    }
    if (n >= 34) {
        size_t dash = n;
        while (dash > 0 && s[dash - 1] != '-') dash--;
        if (dash > 0 && dash - 1 >= 32 && hex_words(s + dash - 1 - 32, hi, lo)) { /* the last '-' at dash - 1 */
            *at = dash - 1 - 32, *suffix_at = dash - 1;
            return 3;
        }
    }
    *hi = *lo = 0;
    return REQ_TEXT;
}

/* Store._derive_latencies for one latency: whether value (NaN: missing) equals its derivation d (valid:
 * derivable) bit for bit, or both are missing */
static int derived_same(double value, double d, int valid) {
    int ok = !isnan(value);
    if (ok && valid) return value == d && signbit(value) == signbit(d);
    return ok == valid;
}

/* the index of s in deduplicated column c (added if new): >= 0; -1 for None; -2 no memory; -3 a NUL */
static int64_t dedup(fs_out *o, int c, sref s) {
    /* a string in the span arena is overwritten by the next span's */
    return strtab_index(&o->tabs[c], &o->blob[c], s, &o->span_arena);
}

/* -- the messages ------------------------------------------------------------------------------------ */
static int fail(fs_out *o, int status) {
    if (o->status == FS_OK) o->status = status;
    return 0;
}
#define BAD() return fail(o, FS_UNHANDLED)
#define NOMEM() return fail(o, FS_NOMEM)

static int valid_event(rd m, int depth) {
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) return 0;
        switch (f) {
        case 1: ok = wt == WT_I64 && skip_scalar(&m, wt); break;
        case 2: ok = valid_string(&m, wt); break;
        case 3: ok = valid_kv(&m, wt, depth + 1); break;
        case 4: ok = wt == WT_VARINT && skip_scalar(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) return 0;
    }
    return 1;
}

static int valid_link(rd m, int depth) {
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) return 0;
        switch (f) {
        case 1: case 2: ok = valid_bytes(&m, wt); break;
        case 3: ok = valid_string(&m, wt); break;
        case 4: ok = valid_kv(&m, wt, depth + 1); break;
        case 5: ok = wt == WT_VARINT && skip_scalar(&m, wt); break;
        case 6: ok = wt == WT_I32 && skip_scalar(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) return 0;
    }
    return 1;
}

static int valid_status(rd m) {
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) return 0;
        switch (f) {
        case 2: ok = valid_string(&m, wt); break;
        case 3: ok = wt == WT_VARINT && skip_scalar(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) return 0;
    }
    return 1;
}

typedef struct {
    sref node, service, model, container, pod_uid, pod, ns, gpus;
    int64_t pid; /* -1: None */
} res_t;

static const int KS_SERVICE[] = {K_SERVICE};
static const int KS_RES_MODEL[] = {K_REQ_MODEL, K_RESP_MODEL, K_MODEL, K_VLLM_MODEL};
static const int KS_SPAN_MODEL[] = {K_RESP_MODEL, K_REQ_MODEL};
static const int KS_ENGINE[] = {K_PROVIDER, K_SYSTEM};
static const int KS_REQ[] = {K_REQ_ID, K_RESP_ID};
static const int KS_FINISH[] = {K_FINISHES, K_FINISH};
static const int KS_CONTAINER[] = {K_CONTAINER};
static const int KS_POD_UID[] = {K_POD_UID};
static const int KS_POD[] = {K_POD};
static const int KS_NS[] = {K_NS};
static const int KS_GPUS[] = {K_GPUS};
#define S(o, a, ks, out) (get_s((o), (a), (ks), (int)(sizeof(ks) / sizeof(ks)[0]), (out)) == R_BAD)

static int do_span(fs_out *o, rd m, const res_t *res, int depth) {
    attrs_t a;
    attrs_clear(&a);
    rd trace = {m.p, m.p}, span_id = {m.p, m.p}, name = {m.p, m.p}, sub;
    uint64_t start = 0, end = 0;
    if (!arena_reserve(&o->span_arena, 3 * (size_t)(m.end - m.p) + 64)) NOMEM();
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) BAD();
        switch (f) {
        case 1: ok = wt == WT_LEN && rd_len(&m, &trace); break;
        case 2: ok = wt == WT_LEN && rd_len(&m, &span_id); break;
        case 3: ok = valid_string(&m, wt); break;
        case 4: ok = valid_bytes(&m, wt); break;
        case 5: ok = wt == WT_LEN && rd_string(&m, &name); break;
        case 6: case 10: case 12: case 14: ok = wt == WT_VARINT && skip_scalar(&m, wt); break;
        case 7: ok = wt == WT_I64 && rd_fixed64(&m, &start); break;
        case 8: ok = wt == WT_I64 && rd_fixed64(&m, &end); break;
        case 9: ok = wt == WT_LEN && rd_len(&m, &sub) && add_attr(sub, depth + 1, &a); break;
        case 11: ok = wt == WT_LEN && rd_len(&m, &sub) && valid_event(sub, depth + 1); break;
        case 13: ok = wt == WT_LEN && rd_len(&m, &sub) && valid_link(sub, depth + 1); break;
        case 15: ok = wt == WT_LEN && rd_len(&m, &sub) && valid_status(sub); break;
        case 16: ok = wt == WT_I32 && skip_scalar(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) BAD();
    }
    size_t name_n = (size_t)(name.end - name.p);
    int vllm = name_n == 11 && memcmp(name.p, "llm_request", 11) == 0;
    /* is_request_span */
    if (!(vllm || a.latency_prefix || (a.v[K_REQ_MODEL].type != V_ABSENT
                                       && (a.v[K_OUTPUT].type != V_ABSENT || a.v[K_COMPLETION].type != V_ABSENT)))) {
        o->ignored++;
        return 1;
    }
    if (start > (uint64_t)INT64_MAX || end > (uint64_t)INT64_MAX) {
        o->ignored++; /* past the year 2262 */
        return 1;
    }
    int64_t start_ns = (int64_t)start, end_ns = (int64_t)end;
    double e2e, queue, ttft, prefill, decode, inference;
    int h_e2e, h_queue, h_ttft, h_prefill, h_decode, h_inference;
    if ((h_e2e = get_f(&a, K_E2E, -1, &e2e)) == R_BAD) BAD();
    if (!h_e2e && end_ns >= start_ns && start_ns > 0) {
        e2e = (double)(end_ns - start_ns) / 1e9;
        h_e2e = 1;
    }
    if ((h_queue = get_f(&a, K_QUEUE, -1, &queue)) == R_BAD) BAD();
    if ((h_ttft = get_f(&a, K_TTFT, K_SRV_TTFT, &ttft)) == R_BAD) BAD();
    if ((h_prefill = get_f(&a, K_PREFILL, -1, &prefill)) == R_BAD) BAD();
    if ((h_decode = get_f(&a, K_DECODE, -1, &decode)) == R_BAD) BAD();
    if ((h_inference = get_f(&a, K_INFERENCE, -1, &inference)) == R_BAD) BAD();
    if (!h_prefill && h_ttft && h_queue) {
        double x = ttft - queue;
        prefill = x > 0.0 ? x : 0.0; /* max(0.0, x): the first unless the second is greater */
        h_prefill = 1;
    }
    if (!h_decode && h_ttft && h_e2e) {
        double x = e2e - ttft;
        decode = x > 0.0 ? x : 0.0;
        h_decode = 1;
    }
    if (!h_inference && h_prefill && h_decode) {
        inference = prefill + decode;
        h_inference = 1;
    }
    if (!h_ttft && h_queue && h_prefill) {
        ttft = queue + prefill;
        h_ttft = 1;
    }
    int64_t output, prompt, pid;
    int h_output, h_prompt, h_pid;
    if ((h_output = get_i(&a, K_COMPLETION, K_OUTPUT, &output)) == R_BAD) BAD();
    if (start_ns <= 0 && end_ns > 0 && h_e2e) {
        double x = e2e * 1e9;
        /* x < end_ns compared exactly (as Python compares a float with an int) */
        if (x < 9223372036854775808.0 && (int64_t)x < end_ns) start_ns = end_ns - (int64_t)x;
    }
    sref model, engine, req, finish, container, pod_uid, pod, ns, gpus;
    arena_t *sa = &o->span_arena;
    if (S(sa, &a, KS_SPAN_MODEL, &model)) BAD();
    if (!model.p) model = res->model;
    if (vllm) {
        engine.p = (const uint8_t *)"vllm", engine.n = 4;
    } else {
        if (S(sa, &a, KS_ENGINE, &engine)) BAD();
        if (!engine.p) engine = res->service;
        if (!engine.p) engine.p = (const uint8_t *)"genai", engine.n = 5;
    }
    if (S(sa, &a, KS_REQ, &req)) BAD();
    if ((h_prompt = get_i(&a, K_PROMPT, K_INPUT, &prompt)) == R_BAD) BAD();
    if (S(sa, &a, KS_FINISH, &finish)) BAD();
    if ((h_pid = get_i(&a, K_PID, -1, &pid)) == R_BAD) BAD();
    if (!h_pid || pid == 0) pid = res->pid; /* _i(a, "process.pid") or res_pid */
    if (S(sa, &a, KS_CONTAINER, &container)) BAD();
    if (!container.p) container = res->container;
    if (S(sa, &a, KS_POD_UID, &pod_uid)) BAD();
    if (!pod_uid.p) pod_uid = res->pod_uid;
    if (S(sa, &a, KS_POD, &pod)) BAD();
    if (!pod.p) pod = res->pod;
    if (S(sa, &a, KS_NS, &ns)) BAD();
    if (!ns.p) ns = res->ns;
    if (S(sa, &a, KS_GPUS, &gpus)) BAD();
    if (!gpus.p) gpus = res->gpus;

    if (o->n == o->cap && !grow_rows(o)) NOMEM();
    int64_t r = o->n;
    o->f[F_TTFT][r] = h_ttft ? ttft : NAN;
    o->f[F_TPOT][r] = h_decode && h_output && output >= 2 ? decode / (double)(output - 1) : NAN;
    o->f[F_E2E][r] = h_e2e ? e2e : NAN;
    o->f[F_QUEUE][r] = h_queue ? queue : NAN;
    o->f[F_PREFILL][r] = h_prefill ? prefill : NAN;
    o->f[F_DECODE][r] = h_decode ? decode : NAN;
    o->f[F_INFERENCE][r] = h_inference ? inference : NAN;
    o->iv[I_START][r] = start_ns;
    o->iv[I_END][r] = end_ns;
    o->iv[I_PROMPT][r] = h_prompt ? prompt : -1;
    o->iv[I_OUTPUT][r] = h_output ? output : -1;
    o->iv[I_PID][r] = pid;
    const sref cols[ND] = {res->node, res->service, model, engine, finish, container, pod_uid, pod, ns, gpus};
    for (int c = 0; c < ND; c++) {
        int64_t idx = dedup(o, c, cols[c]);
        if (idx == -2) NOMEM();
        if (idx == -3) BAD();
        o->sidx[c][r] = (int32_t)idx;
    }
    /* the stored form */
    uint8_t derived = 0;
    {
        double v_ttft = o->f[F_TTFT][r], v_tpot = o->f[F_TPOT][r], v_e2e = o->f[F_E2E][r];
        double v_queue = o->f[F_QUEUE][r], v_prefill = o->f[F_PREFILL][r], v_decode = o->f[F_DECODE][r];
        double v_inf = o->f[F_INFERENCE][r];
        int q_ok = !isnan(v_queue), p_ok = !isnan(v_prefill), d_ok = !isnan(v_decode);
        int64_t out = o->iv[I_OUTPUT][r];
        int64_t st = o->iv[I_START][r], en = o->iv[I_END][r];
        int e2e_ok = st > 0 && en >= st;
        if (derived_same(v_ttft, v_queue + v_prefill, q_ok && p_ok)) derived |= D_TTFT;
        if (derived_same(v_tpot, out >= 2 ? v_decode / (double)(out - 1) : 0.0, d_ok && out >= 2)) derived |= D_TPOT;
        if (derived_same(v_e2e, e2e_ok ? (double)(en - st) / 1e9 : 0.0, e2e_ok)) derived |= D_E2E;
        if (derived_same(v_inf, v_prefill + v_decode, p_ok && d_ok)) derived |= D_INFERENCE;
    }
    o->u8[U_DERIVED][r] = derived;
    size_t trace_n = (size_t)(trace.end - trace.p), span_n = (size_t)(span_id.end - span_id.p);
    o->u8[U_TRACE_WORDS][r] = trace_n == 16;
    o->w[W_TRACE_HI][r] = trace_n == 16 ? be64(trace.p) : 0;
    o->w[W_TRACE_LO][r] = trace_n == 16 ? be64(trace.p + 8) : 0;
    o->u8[U_SPAN_WORD][r] = span_n == 8;
    o->w[W_SPAN][r] = span_n == 8 ? be64(span_id.p) : 0;
    if (!blob_hex(&o->blob[S_TRACE], trace.p, trace_n == 16 ? 0 : trace_n)) NOMEM();
    if (!blob_hex(&o->blob[S_SPAN], span_id.p, span_n == 8 ? 0 : span_n)) NOMEM();
    size_t at = 0, suffix_at = 0;
    uint64_t hi = 0, lo = 0;
    int form = req.p ? request_form(req.p, req.n, &at, &suffix_at, &hi, &lo) : REQ_NONE;
    o->u8[U_REQ_FORM][r] = (uint8_t)form;
    o->w[W_REQ_HI][r] = hi;
    o->w[W_REQ_LO][r] = lo;
    int b = blob_put(&o->blob[S_REQ], req.p ? req.p : (const uint8_t *)"",
                     form == REQ_NONE ? 0 : form == REQ_TEXT ? req.n : at);
    if (b == 0) NOMEM();
    if (b < 0) BAD();
    b = blob_put(&o->blob[S_SUFFIX], form == 3 ? req.p + suffix_at : (const uint8_t *)"",
                 form == 3 ? req.n - suffix_at : 0);
    if (b == 0) NOMEM();
    if (b < 0) BAD();
    o->n++;
    return 1;
}

typedef struct {
    fs_out *o;
    const res_t *res;
} span_ctx;

static int span_item(void *ctx, rd span, int depth) {
    span_ctx *c = ctx;
    return do_span(c->o, span, c->res, depth);
}

static int do_resource_spans(void *ctx, rd m) {
    fs_out *o = ctx;
    const int depth = 1;
    attrs_t a;
    attrs_clear(&a);
    int r = read_resource(m, depth, &o->res_arena, add_attr, &a);
    if (r < 0) NOMEM();
    if (!r) BAD();
    res_t res;
    arena_t *ra = &o->res_arena;
    if (node_of(ra, &a, &res.node) == R_BAD) BAD();
    if (S(ra, &a, KS_SERVICE, &res.service)) BAD();
    if (S(ra, &a, KS_RES_MODEL, &res.model)) BAD();
    int h = get_i(&a, K_PID, -1, &res.pid);
    if (h == R_BAD) BAD();
    if (!h) res.pid = -1;
    if (S(ra, &a, KS_CONTAINER, &res.container)) BAD();
    if (S(ra, &a, KS_POD_UID, &res.pod_uid)) BAD();
    if (S(ra, &a, KS_POD, &res.pod)) BAD();
    if (S(ra, &a, KS_NS, &res.ns)) BAD();
    if (S(ra, &a, KS_GPUS, &res.gpus)) BAD();
    /* the remembered strings of the previous resource may be overwritten now */
    for (int c = 0; c < ND; c++) o->tabs[c].last_p = NULL;
    span_ctx c = {o, &res};
    return each_item(m, depth, span_item, &c) || fail(o, FS_UNHANDLED);
}

/* -- the rows as Arrow arrays ---------------------------------------------------------------------- */
static const uint64_t NO_BYTES[1]; /* the data of a string column without any */

static void *own(fs_out *o, size_t n) {
    if (o->n_owned == MAX_OWNED) return NULL;
    void *p = malloc(n ? n : 1);
    if (p) o->owned[o->n_owned++] = p;
    return p;
}

static void child_release(struct ArrowArray *a) { a->release = NULL; } /* its parent owns its buffers */

static struct ArrowArray *child(fs_out *o, int k, int n_buffers) {
    struct ArrowArray *a = &o->kids[k];
    memset(a, 0, sizeof *a);
    a->length = o->n;
    a->n_buffers = n_buffers;
    a->buffers = o->bufs[k];
    a->release = child_release;
    o->kid_ptrs[k] = a;
    return a;
}

/* the validity bitmap of `valid` (a byte per row) and the null count; no bitmap when none is null */
static int validity(fs_out *o, struct ArrowArray *a, const uint8_t *valid) {
    int64_t n = o->n, nulls = 0;
    for (int64_t i = 0; i < n; i++) nulls += !valid[i];
    a->null_count = nulls;
    a->buffers[0] = NULL;
    if (!nulls) return 1;
    uint8_t *bits = own(o, (size_t)(n + 7) / 8);
    if (!bits) return 0;
    memset(bits, 0, (size_t)(n + 7) / 8);
    for (int64_t i = 0; i < n; i++) bits[i >> 3] |= (uint8_t)(valid[i] << (i & 7));
    a->buffers[0] = bits;
    return 1;
}

static int fixed(fs_out *o, int k, const void *data, const uint8_t *valid) {
    struct ArrowArray *a = child(o, k, 2);
    a->buffers[1] = data;
    return valid ? validity(o, a, valid) : 1;
}

/* a column of one entry per row (blob b): its NULs squeezed out in place, the offsets made */
static int row_strings(fs_out *o, int k, blob_t *b, const uint8_t *valid) {
    int64_t n = o->n;
    if (b->count != n || b->len >= INT32_MAX) return -1;
    int32_t *offsets = own(o, (size_t)(n + 1) * sizeof *offsets);
    if (!offsets) return 0;
    char *buf = b->buf;
    int64_t to = 0, from = 0;
    for (int64_t r = 0; r < n; r++) {
        const char *end = memchr(buf + from, 0, (size_t)(b->len - from));
        int64_t len = end - (buf + from);
        offsets[r] = (int32_t)to;
        if (len && to != from) memmove(buf + to, buf + from, (size_t)len);
        to += len;
        from += len + 1;
    }
    offsets[n] = (int32_t)to;
    struct ArrowArray *a = child(o, k, 3);
    a->buffers[1] = offsets;
    a->buffers[2] = buf ? (const void *)buf : (const void *)NO_BYTES;
    return validity(o, a, valid);
}

/* a deduplicated column: each row's value (index idx[r] into the distinct entries of b; -1 None) copied out */
static int dedup_strings(fs_out *o, int k, const blob_t *b, const int32_t *idx, uint8_t *valid) {
    int64_t n = o->n, count = b->count;
    int64_t *start = malloc((size_t)(count + 1) * sizeof *start); /* entry e: start[e] to start[e + 1] - 1 */
    if (!start) return 0;
    start[0] = 0;
    for (int64_t e = 0; e < count; e++) /* the entries, NUL-terminated, one after another */
        start[e + 1] = start[e] + (int64_t)strlen(b->buf + start[e]) + 1;
    int64_t total = 0;
    for (int64_t r = 0; r < n; r++) {
        valid[r] = idx[r] >= 0;
        if (valid[r]) total += start[idx[r] + 1] - start[idx[r]] - 1;
    }
    int ok = total < INT32_MAX ? 1 : -1;
    int32_t *offsets = ok > 0 ? own(o, (size_t)(n + 1) * sizeof *offsets) : NULL;
    char *data = offsets ? own(o, (size_t)total) : NULL;
    if (ok > 0 && !data) ok = 0;
    if (ok > 0) {
        int64_t to = 0;
        for (int64_t r = 0; r < n; r++) {
            offsets[r] = (int32_t)to;
            if (!valid[r]) continue;
            int64_t at = start[idx[r]], len = start[idx[r] + 1] - at - 1;
            memcpy(data + to, b->buf + at, (size_t)len);
            to += len;
        }
        offsets[n] = (int32_t)to;
        struct ArrowArray *a = child(o, k, 3);
        a->buffers[1] = offsets;
        a->buffers[2] = data;
        ok = validity(o, a, valid);
    }
    free(start);
    return ok;
}

/* a count or pid (-1: None) as int32; one over 32 bits is left to the reference path (as _batch was) */
static int int32_column(fs_out *o, int k, const int64_t *src, uint8_t *valid) {
    int64_t n = o->n;
    int32_t *v = own(o, (size_t)n * sizeof *v);
    if (!v) return 0;
    for (int64_t r = 0; r < n; r++) {
        if (src[r] > INT32_MAX) return -1;
        valid[r] = src[r] >= 0;
        v[r] = valid[r] ? (int32_t)src[r] : 0;
    }
    return fixed(o, k, v, valid);
}

static void arrow_release(struct ArrowArray *a);

/* Make o->arrow from the columns: FS_OK, FS_NOMEM, or FS_UNHANDLED (a count over 32 bits, strings over
 * 2 GiB). The float, word, start/end and derived columns are the decoder's own buffers; the rest are made
 * here (validity bitmaps, int32 counts, string offsets); a per-row string column is squeezed in place. */
static int fs_arrow(fs_out *o) {
    int64_t n = o->n;
    uint8_t *valid = malloc((size_t)n); /* each column's, in turn */
    if (!valid) return FS_NOMEM;
    const uint8_t *trace_w = o->u8[U_TRACE_WORDS], *span_w = o->u8[U_SPAN_WORD], *form = o->u8[U_REQ_FORM];
    const uint8_t *derived = o->u8[U_DERIVED];
    uint8_t *form_out = own(o, (size_t)n);
    int ok = form_out != NULL;
#define TRY(x) do { if (ok > 0) ok = (x); } while (0)
#define EACH(expr) do { for (int64_t r = 0; r < n; r++) valid[r] = (uint8_t)(expr); } while (0)
    TRY(fixed(o, A_START, o->iv[I_START], NULL));
    TRY(fixed(o, A_END, o->iv[I_END], NULL));
    static const struct { int a, s; } DEDUP[] = {
        {A_NODE, S_NODE}, {A_SERVICE, S_SERVICE}, {A_MODEL, S_MODEL}, {A_ENGINE, S_ENGINE},
        {A_FINISH, S_FINISH}, {A_CONTAINER, S_CONTAINER}, {A_POD_UID, S_POD_UID}, {A_POD, S_POD}, {A_NS, S_NS},
        {A_GPUS, S_GPUS}};
    for (size_t j = 0; j < sizeof DEDUP / sizeof *DEDUP; j++)
        TRY(dedup_strings(o, DEDUP[j].a, &o->blob[DEDUP[j].s], o->sidx[DEDUP[j].s], valid));
    if (ok > 0) EACH(trace_w[r]);
    TRY(fixed(o, A_TRACE_HI, o->w[W_TRACE_HI], valid));
    TRY(fixed(o, A_TRACE_LO, o->w[W_TRACE_LO], valid));
    if (ok > 0) EACH(!trace_w[r]);
    TRY(row_strings(o, A_TRACE_TEXT, &o->blob[S_TRACE], valid));
    if (ok > 0) EACH(span_w[r]);
    TRY(fixed(o, A_SPAN_BIN, o->w[W_SPAN], valid));
    if (ok > 0) EACH(!span_w[r]);
    TRY(row_strings(o, A_SPAN_TEXT, &o->blob[S_SPAN], valid));
    if (ok > 0) {
        EACH(form[r] != REQ_TEXT && form[r] != REQ_NONE);
        for (int64_t r = 0; r < n; r++) form_out[r] = form[r] == 2 ? 2 : 1;
    }
    TRY(fixed(o, A_REQ_HI, o->w[W_REQ_HI], valid));
    TRY(fixed(o, A_REQ_LO, o->w[W_REQ_LO], valid));
    TRY(fixed(o, A_REQ_FORM, form_out, valid));
    if (ok > 0) EACH(form[r] != REQ_NONE);
    TRY(row_strings(o, A_REQ_TEXT, &o->blob[S_REQ], valid));
    if (ok > 0) EACH(form[r] == 3);
    TRY(row_strings(o, A_REQ_SUFFIX, &o->blob[S_SUFFIX], valid));
    TRY(fixed(o, A_DERIVED, derived, NULL));
    /* a latency: NaN is None; one that equals its derivation is not stored (its bit in derived) */
    static const struct { int a, f, bit; } LAT[] = {
        {A_TTFT, F_TTFT, D_TTFT}, {A_TPOT, F_TPOT, D_TPOT}, {A_E2E, F_E2E, D_E2E}, {A_QUEUE, F_QUEUE, 0},
        {A_PREFILL, F_PREFILL, 0}, {A_DECODE, F_DECODE, 0}, {A_INFERENCE, F_INFERENCE, D_INFERENCE}};
    for (size_t j = 0; j < sizeof LAT / sizeof *LAT; j++) {
        const double *f = o->f[LAT[j].f];
        int bit = LAT[j].bit;
        if (ok > 0) EACH(!isnan(f[r]) && !(derived[r] & bit));
        TRY(fixed(o, LAT[j].a, f, valid));
    }
    TRY(int32_column(o, A_PROMPT, o->iv[I_PROMPT], valid));
    TRY(int32_column(o, A_OUTPUT, o->iv[I_OUTPUT], valid));
    TRY(int32_column(o, A_PID, o->iv[I_PID], valid));
#undef TRY
#undef EACH
    free(valid);
    if (ok <= 0) return ok < 0 ? FS_UNHANDLED : FS_NOMEM;
    struct ArrowArray *a = &o->arrow;
    memset(a, 0, sizeof *a);
    a->length = n;
    a->n_buffers = 1; /* a struct array: a validity bitmap only, none here */
    a->buffers = o->top_bufs;
    a->n_children = NA;
    a->children = o->kid_ptrs;
    a->release = arrow_release;
    a->private_data = o;
    o->arrow_live = 1;
    return FS_OK;
}

/* -- the interface ---------------------------------------------------------------------------------- */
#define FS_ABI 7 /* fast_spans.py's _ABI: the public head of fs_out, and the functions */

int fs_abi(void) { return FS_ABI; }

/* Once, before any fs_decode (which may then run in several threads at once: it keeps no state). */
void fs_init(void) {
    if (keylen_ready) return;
    for (int c = 0; c < 256; c++)
        HEXV[c] = (int8_t)(c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1);
    keylen_ready = keyset_init(&SPAN_KEYS, KEYS, K_COUNT);
}

static void free_parts(fs_out *o) { /* what only the decoding needs */
    for (int c = 0; c < ND; c++) {
        free(o->tabs[c].tab);
        o->tabs[c].tab = NULL;
    }
    free(o->res_arena.buf);
    free(o->span_arena.buf);
    o->res_arena.buf = o->span_arena.buf = NULL;
}

static void really_free(fs_out *o) {
    for (int c = 0; c < NF; c++) free(o->f[c]);
    for (int c = 0; c < NI; c++) free(o->iv[c]);
    for (int c = 0; c < NS; c++) {
        free(o->sidx[c]);
        free(o->blob[c].buf);
    }
    for (int c = 0; c < NW; c++) free(o->w[c]);
    for (int c = 0; c < NU; c++) free(o->u8[c]);
    for (int c = 0; c < o->n_owned; c++) free(o->owned[c]);
    free_parts(o);
    free(o);
}

/* Arrow's release of the array it imported (moved out of o->arrow), when the last of its buffers goes,
 * in whatever thread that is. fs_free has been called by then (the importer calls it right after the
 * import, before the table reaches anyone else), or is still to come when the import failed: whichever of
 * the two comes last frees. */
static void arrow_release(struct ArrowArray *a) {
    fs_out *o = a->private_data;
    a->release = NULL;
    o->arrow_live = 0;
    if (o->py_done) really_free(o);
}

/* The caller is done with o. Its rows stay until Arrow releases them if o->arrow was imported (moved:
 * its release is NULL here then); else everything is freed now. */
void fs_free(fs_out *o) {
    if (!o) return;
    o->py_done = 1;
    if (o->arrow_live) {
        if (o->arrow.release == NULL) return; /* Arrow holds the rows: arrow_release frees */
        o->arrow_live = 0; /* made but never imported */
    }
    really_free(o);
}

/* Decode the serialized ExportTraceServiceRequest buf[0:len]. Returns NULL without memory; else a result
 * whose status says whether it holds the rows (FS_OK: as columns and, when there are any, as o->arrow) or
 * the caller must take the reference path. */
fs_out *fs_decode(const uint8_t *buf, size_t len) {
    fs_out *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    if (!keylen_ready) {
        fail(o, FS_UNHANDLED); /* fs_init was not called */
        return o;
    }
    rd m = {buf, buf + len};
    if (!each_resource(m, do_resource_spans, o)) fail(o, FS_UNHANDLED); /* a callback's own reason stays */
    if (o->status == FS_OK && o->n > 0) {
        free_parts(o);
        int status = fs_arrow(o);
        if (status != FS_OK) fail(o, status);
    }
    return o;
}
