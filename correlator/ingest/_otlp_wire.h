/* What the compiled OTLP decoders share (_fastspans.c, _fastmetrics.c): a bounds-checked reader of the
 * protobuf wire format, AnyValue and KeyValue parsing with upb's validation (UTF-8, one oneof member, known
 * wire types), key lookup tables, Python's str() of the scalar values, and the checks of messages that are
 * parsed by upb but not kept. Each decoder includes it once; everything here is static.
 *
 * The rule both decoders follow: whatever they cannot reproduce exactly as upb plus the Python decoder
 * would, they decline, and the caller takes the reference path with the same bytes.
 */
#ifndef STACKLENS_OTLP_WIRE_H
#define STACKLENS_OTLP_WIRE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 48
#define INT32_MAXV 2147483647LL

/* a value rule's outcome */
#define R_NONE 0
#define R_VAL 1
#define R_BAD (-1) /* needs Python: unhandled */

typedef struct {
    char *buf;
    size_t cap, len;
} arena_t;


/* -- reading the wire format ---------------------------------------------------------------------- */
typedef struct {
    const uint8_t *p, *end;
} rd;

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

static inline int rd_varint(rd *r, uint64_t *out) {
    if (r->p < r->end && *r->p < 0x80) { /* the common case: one byte */
        *out = *r->p++;
        return 1;
    }
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end) return 0;
        uint8_t b = *r->p++;
        if (i == 9) {
            if (b > 1) return 0; /* bits past 64, or longer than 10 bytes: let upb decide */
            v |= (uint64_t)b << 63;
            *out = v;
            return 1;
        }
        v |= (uint64_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

static inline int rd_tag(rd *r, uint32_t *field, int *wt) {
    uint64_t t;
    if (!rd_varint(r, &t)) return 0;
    if (t > 0xFFFFFFFFu) return 0;
    *field = (uint32_t)(t >> 3);
    *wt = (int)(t & 7);
    return *field != 0;
}

static inline int rd_len(rd *r, rd *sub) {
    uint64_t n;
    if (!rd_varint(r, &n)) return 0;
    if (n > (uint64_t)(r->end - r->p)) return 0;
    sub->p = r->p;
    sub->end = r->p + n;
    r->p += n;
    return 1;
}

static int rd_fixed64(rd *r, uint64_t *out) {
    if (r->end - r->p < 8) return 0;
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | r->p[i];
    r->p += 8;
    *out = v;
    return 1;
}

static int rd_skip_fixed(rd *r, size_t n) {
    if ((size_t)(r->end - r->p) < n) return 0;
    r->p += n;
    return 1;
}

/* a field of wire type VARINT, I64 or I32 whose value is not needed */
static int skip_scalar(rd *r, int wt) {
    uint64_t v;
    switch (wt) {
    case WT_VARINT: return rd_varint(r, &v);
    case WT_I64: return rd_skip_fixed(r, 8);
    case WT_I32: return rd_skip_fixed(r, 4);
    default: return 0;
    }
}

/* a field number this schema does not know: a scalar (which no schema can refuse) is skipped */
static int skip_unknown(rd *r, int wt) {
    if (wt == WT_LEN) return 0;
    return skip_scalar(r, wt);
}

static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) { /* eight ASCII bytes at a time */
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        uint8_t lo = 0x80, hi = 0xBF;
        size_t k;
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c == 0xE0) { k = 2; lo = 0xA0; }
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) k = 2;
        else if (c == 0xED) { k = 2; hi = 0x9F; }
        else if (c == 0xF0) { k = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) k = 3;
        else if (c == 0xF4) { k = 3; hi = 0x8F; }
        else return 0;
        if (n - i <= k) return 0;
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

static inline int rd_string(rd *r, rd *sub) {
    return rd_len(r, sub) && utf8_ok(sub->p, (size_t)(sub->end - sub->p));
}


/* -- attribute values ---------------------------------------------------------------------------------- */
enum { V_ABSENT, V_NONE, V_STR, V_BOOL, V_INT, V_DBL, V_ARR, V_KVL, V_BYTES };

typedef struct {
    int type;
    const uint8_t *p; /* STR, BYTES: the bytes; ARR: the ArrayValue message */
    size_t n;
    int64_t i;        /* INT, BOOL; ARR, KVL: the number of elements */
    double d;
} val_t;

static int parse_any(rd m, int depth, val_t *v);

static int parse_kv(rd m, int depth, rd *key, val_t *v) {
    int seen_key = 0, seen_val = 0;
    key->p = key->end = m.p;
    v->type = V_NONE;
    if (depth > MAX_DEPTH) return 0;
    while (m.p < m.end) {
        uint32_t f;
        int wt;
        if (!rd_tag(&m, &f, &wt)) return 0;
        if (f == 1) {
            if (wt != WT_LEN || seen_key++ || !rd_string(&m, key)) return 0;
        } else if (f == 2) {
            rd sub;
            if (wt != WT_LEN || seen_val++ || !rd_len(&m, &sub) || !parse_any(sub, depth + 1, v)) return 0;
        } else if (f == 3) { /* key_strindex (int32) in newer schemas */
            if (wt != WT_VARINT || !skip_scalar(&m, wt)) return 0;
        } else if (!skip_unknown(&m, wt)) {
            return 0;
        }
    }
    return 1;
}

static int parse_any(rd m, int depth, val_t *v) {
    int seen = 0;
    v->type = V_NONE;
    if (depth > MAX_DEPTH) return 0;
    while (m.p < m.end) {
        uint32_t f;
        int wt;
        uint64_t x;
        rd sub;
        if (!rd_tag(&m, &f, &wt)) return 0;
        if (f < 1 || f > 7 || seen++) return 0; /* one member of the oneof, and only those this file knows */
        switch (f) {
        case 1:
            if (wt != WT_LEN || !rd_string(&m, &sub)) return 0;
            v->type = V_STR, v->p = sub.p, v->n = (size_t)(sub.end - sub.p);
            break;
        case 2:
            if (wt != WT_VARINT || !rd_varint(&m, &x)) return 0;
            v->type = V_BOOL, v->i = x != 0;
            break;
        case 3:
            if (wt != WT_VARINT || !rd_varint(&m, &x)) return 0;
            v->type = V_INT, v->i = (int64_t)x;
            break;
        case 4: {
            if (wt != WT_I64 || !rd_fixed64(&m, &x)) return 0;
            double d;
            memcpy(&d, &x, sizeof d);
            v->type = V_DBL, v->d = d;
            break;
        }
        case 5:
        case 6: {
            if (wt != WT_LEN || !rd_len(&m, &sub)) return 0;
            v->type = f == 5 ? V_ARR : V_KVL, v->p = sub.p, v->n = (size_t)(sub.end - sub.p), v->i = 0;
            rd it = sub;
            while (it.p < it.end) {
                uint32_t g;
                int wt2;
                if (!rd_tag(&it, &g, &wt2)) return 0;
                if (g == 1) {
                    rd el;
                    val_t ev;
                    rd k;
                    if (wt2 != WT_LEN || !rd_len(&it, &el)) return 0;
                    if (f == 5 ? !parse_any(el, depth + 1, &ev) : !parse_kv(el, depth + 1, &k, &ev)) return 0;
                    v->i++;
                } else if (!skip_unknown(&it, wt2)) {
                    return 0;
                }
            }
            break;
        }
        case 7:
            if (wt != WT_LEN || !rd_len(&m, &sub)) return 0;
            v->type = V_BYTES, v->p = sub.p, v->n = (size_t)(sub.end - sub.p);
            break;
        default:
            return 0;
        }
    }
    return 1;
}


/* strings made here live in the arena, reserved beforehand for the message at hand */
typedef struct {
    const uint8_t *p; /* NULL: None */
    size_t n;
} sref;

static int arena_put(arena_t *o, const void *s, size_t n, sref *out) {
    if (o->cap - o->len < n) return 0;
    char *dst = o->buf + o->len;
    if (n) memcpy(dst, s, n);
    o->len += n;
    out->p = (const uint8_t *)dst;
    out->n = n;
    return 1;
}

static const char HEX[] = "0123456789abcdef";

static void hex_into(char *dst, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[2 * i] = HEX[p[i] >> 4];
        dst[2 * i + 1] = HEX[p[i] & 15];
    }
}

static int arena_hex(arena_t *o, const uint8_t *p, size_t n, sref *out) {
    if ((o->cap - o->len) / 2 < n) return 0;
    char *dst = o->buf + o->len;
    hex_into(dst, p, n);
    o->len += 2 * n;
    out->p = (const uint8_t *)dst;
    out->n = 2 * n;
    return 1;
}

static size_t fmt_int(int64_t v, char *buf) { /* str(int), buf of 21 */
    char tmp[24];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t m = 0;
    if (v < 0) buf[m++] = '-';
    while (n) buf[m++] = tmp[--n];
    return m;
}

/* str(x) of a scalar (not float, list or dict): R_VAL, or R_BAD */
static int str_of(arena_t *o, const val_t *v, sref *out) {
    char buf[24];
    switch (v->type) {
    case V_STR:
        out->p = v->p, out->n = v->n;
        return R_VAL;
    case V_INT:
        return arena_put(o, buf, fmt_int(v->i, buf), out) ? R_VAL : R_BAD;
    case V_BOOL:
        return arena_put(o, v->i ? "True" : "False", v->i ? 4 : 5, out) ? R_VAL : R_BAD;
    case V_BYTES:
        return arena_hex(o, v->p, v->n, out) ? R_VAL : R_BAD;
    case V_NONE:
        return arena_put(o, "None", 4, out) ? R_VAL : R_BAD;
    default:
        return R_BAD;
    }
}


static int arena_reserve(arena_t *a, size_t n) {
    a->len = 0;
    if (a->cap >= n) return 1;
    char *b = realloc(a->buf, n);
    if (!b) return 0;
    a->buf = b;
    a->cap = n;
    return 1;
}


static int valid_kv(rd *m, int wt, int depth) {
    rd sub, key;
    val_t v;
    return wt == WT_LEN && rd_len(m, &sub) && parse_kv(sub, depth, &key, &v);
}

static int valid_string(rd *m, int wt) {
    rd sub;
    return wt == WT_LEN && rd_string(m, &sub);
}

static int valid_bytes(rd *m, int wt) {
    rd sub;
    return wt == WT_LEN && rd_len(m, &sub);
}

/* InstrumentationScope, Span.Event, Span.Link, Status: parsed by upb, so checked here, not kept */
static int valid_scope(rd m, int depth) {
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) return 0;
        switch (f) {
        case 1: case 2: ok = valid_string(&m, wt); break;
        case 3: ok = valid_kv(&m, wt, depth + 1); break;
        case 4: ok = wt == WT_VARINT && skip_scalar(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) return 0;
    }
    return 1;
}


/* -- the attribute keys a decoder reads ------------------------------------------------------------- */
/* the keys of each length (at most MAX_SAME_LEN of them), -1 after the last */
#define MAX_KEYLEN 40
#define MAX_SAME_LEN 8
#define MAX_KEYS 64

typedef struct {
    const char *const *keys;
    int count;
    size_t len[MAX_KEYS];
    signed char bylen[MAX_KEYLEN + 1][MAX_SAME_LEN + 1];
} keyset_t;

/* 0 when a key is too long, too many keys share a length, or there are too many keys */
static int keyset_init(keyset_t *ks, const char *const *keys, int count) {
    if (count > MAX_KEYS) return 0;
    ks->keys = keys;
    ks->count = count;
    memset(ks->bylen, -1, sizeof ks->bylen);
    for (int i = 0; i < count; i++) {
        ks->len[i] = strlen(keys[i]);
        if (ks->len[i] > MAX_KEYLEN) return 0;
        signed char *slot = ks->bylen[ks->len[i]];
        int used = 0;
        while (*slot >= 0) slot++, used++;
        if (used >= MAX_SAME_LEN) return 0;
        *slot = (signed char)i;
    }
    return 1;
}

static inline int keyset_index(const keyset_t *ks, const uint8_t *k, size_t n) {
    if (n > MAX_KEYLEN) return -1;
    for (const signed char *c = ks->bylen[n]; *c >= 0; c++)
        if (memcmp(ks->keys[(int)*c], k, n) == 0) return *c;
    return -1;
}

/* -- string columns ----------------------------------------------------------------------------------- */
/* A column of strings is a blob of NUL-terminated entries one after another (Python splits it at the NULs;
 * no entry holds one); a deduplicated column holds each distinct string once, rows give its index. */
typedef struct {
    char *buf;
    int64_t len, cap, count;
} blob_t;

/* room for n more bytes; 0 without memory */
static int blob_reserve(blob_t *b, size_t n) {
    if ((size_t)(b->cap - b->len) >= n) return 1;
    size_t cap = b->cap ? (size_t)b->cap : 4096;
    while (cap - (size_t)b->len < n) cap *= 2;
    char *p = realloc(b->buf, cap);
    if (!p) return 0;
    b->buf = p;
    b->cap = (int64_t)cap;
    return 1;
}

/* append an entry; 0 without memory, -1 for a NUL in the string */
static int blob_put(blob_t *b, const uint8_t *p, size_t n) {
    if (n && memchr(p, 0, n)) return -1;
    if (!blob_reserve(b, n + 1)) return 0;
    if (n) memcpy(b->buf + b->len, p, n);
    b->len += (int64_t)n;
    b->buf[b->len++] = 0;
    b->count++;
    return 1;
}

/* a hash of a string eight bytes at a time (ids and names are 10-40 bytes: byte-wise FNV costs more) */
static uint64_t hash_words(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 32;
        p += 8, n -= 8;
    }
    uint64_t w = 0;
    if (n) memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    return h ^ (h >> 29);
}

typedef struct {
    size_t off; /* offset + 1 of the entry in the blob; 0: an empty slot */
    size_t len;
    uint64_t hash;
    int32_t idx;
} slot_t;

/* the distinct strings of a deduplicated column: an open-addressing table over its blob */
typedef struct {
    slot_t *tab;
    int64_t cap;
    const uint8_t *last_p; /* the last string looked up and its index, when it outlives the row at hand */
    size_t last_n;
    int32_t last_i;
} strtab_t;

/* The index of s among the distinct strings of blob b (added if new): >= 0; -1 for None (s.p NULL); -2
 * without memory; -3 for a NUL in the string. A string inside `scratch` (made for the row at hand, and
 * overwritten by the next row's) is not remembered as the last one. */
static int64_t strtab_index(strtab_t *st, blob_t *b, sref s, const arena_t *scratch) {
    if (!s.p) return -1;
    if (s.p == st->last_p && s.n == st->last_n) return st->last_i;
    if (b->count >= INT32_MAX / 2) return -2;
    if (b->count * 2 >= st->cap) { /* grow and rehash */
        int64_t cap = st->cap ? 2 * st->cap : 64;
        slot_t *tab = calloc((size_t)cap, sizeof *tab);
        if (!tab) return -2;
        for (int64_t i = 0; i < st->cap; i++) {
            slot_t *e = &st->tab[i];
            if (!e->off) continue;
            int64_t j = (int64_t)(e->hash & (uint64_t)(cap - 1));
            while (tab[j].off) j = (j + 1) & (cap - 1);
            tab[j] = *e;
        }
        free(st->tab);
        st->tab = tab;
        st->cap = cap;
    }
    uint64_t h = hash_words(s.p, s.n);
    int64_t mask = st->cap - 1, j = (int64_t)(h & (uint64_t)mask);
    int32_t idx = -1;
    while (st->tab[j].off) {
        slot_t *e = &st->tab[j];
        if (e->hash == h && e->len == s.n && memcmp(b->buf + e->off - 1, s.p, s.n) == 0) {
            idx = e->idx;
            break;
        }
        j = (j + 1) & mask;
    }
    if (idx < 0) {
        size_t off = (size_t)b->len;
        int r = blob_put(b, s.p, s.n);
        if (r <= 0) return r == 0 ? -2 : -3;
        idx = (int32_t)(b->count - 1);
        slot_t *e = &st->tab[j];
        e->off = off + 1, e->len = s.n, e->hash = h, e->idx = idx;
    }
    uintptr_t at = (uintptr_t)s.p, lo = (uintptr_t)scratch->buf;
    if (at >= lo && at - lo < scratch->cap) {
        st->last_p = NULL;
    } else {
        st->last_p = s.p, st->last_n = s.n, st->last_i = idx;
    }
    return idx;
}

/* -- the messages both requests share ----------------------------------------------------------------- */
/* ExportTraceServiceRequest and ExportMetricsServiceRequest have one shape down to the spans and metrics:
 *   Export...ServiceRequest { repeated Resource{Spans,Metrics} = 1 }
 *   Resource{Spans,Metrics} { Resource resource = 1; repeated Scope{Spans,Metrics} = 2; string schema_url = 3 }
 *   Resource { repeated KeyValue attributes = 1; uint32 dropped_attributes_count = 2 }
 *   Scope{Spans,Metrics} { InstrumentationScope scope = 1; repeated Span|Metric = 2; string schema_url = 3 }
 * These walk it; a callback that fails returns 0 (having said why in its own state). */
typedef int (*attr_fn)(rd kv, int depth, void *attrs);
typedef int (*item_fn)(void *ctx, rd item, int depth);

/* the Resource of a Resource{Spans,Metrics} message, wherever it is (empty when none; 0 when there are two:
 * upb would merge them), every other field validated */
static int find_resource(rd m, rd *resource) {
    int n_resource = 0;
    resource->p = resource->end = m.p;
    while (m.p < m.end) {
        uint32_t f;
        int wt, ok;
        if (!rd_tag(&m, &f, &wt)) return 0;
        switch (f) {
        case 1: ok = wt == WT_LEN && !n_resource++ && rd_len(&m, resource); break;
        case 2: ok = valid_bytes(&m, wt); break;
        case 3: ok = valid_string(&m, wt); break;
        default: ok = skip_unknown(&m, wt);
        }
        if (!ok) return 0;
    }
    return 1;
}

/* each attribute of a Resource message through add */
static int resource_attrs(rd resource, int depth, attr_fn add, void *attrs) {
    while (resource.p < resource.end) {
        uint32_t f;
        int wt, ok;
        rd sub;
        if (!rd_tag(&resource, &f, &wt)) return 0;
        switch (f) {
        case 1: ok = wt == WT_LEN && rd_len(&resource, &sub) && add(sub, depth + 1, attrs); break;
        case 2: ok = wt == WT_VARINT && skip_scalar(&resource, wt); break;
        default: ok = skip_unknown(&resource, wt); /* entity_refs (3) included: a message */
        }
        if (!ok) return 0;
    }
    return 1;
}

/* the resource of Resource{Spans,Metrics} m: found, room made in `arena` for the strings made from it (3x its
 * size: hex, decimal), its attributes passed to add. 1; 0 unhandled; -1 without memory */
static int read_resource(rd m, int depth, arena_t *arena, attr_fn add, void *attrs) {
    rd resource;
    if (!find_resource(m, &resource)) return 0;
    if (!arena_reserve(arena, 3 * (size_t)(resource.end - resource.p) + 64)) return -1;
    return resource_attrs(resource, depth + 1, add, attrs);
}

/* each span or metric (field 2 of each Scope{Spans,Metrics}, field 2 of m, a Resource{Spans,Metrics}
 * find_resource validated) through f, in order */
static int each_item(rd m, int depth, item_fn f, void *ctx) {
    while (m.p < m.end) {
        uint32_t field;
        int wt;
        rd scope;
        if (!rd_tag(&m, &field, &wt)) return 0;
        if (field != 2) { /* validated by find_resource */
            if (wt == WT_LEN ? !rd_len(&m, &scope) : !skip_scalar(&m, wt)) return 0;
            continue;
        }
        if (!rd_len(&m, &scope)) return 0;
        while (scope.p < scope.end) {
            uint32_t g;
            int wt2, ok;
            rd sub;
            if (!rd_tag(&scope, &g, &wt2)) return 0;
            switch (g) {
            case 1: ok = wt2 == WT_LEN && rd_len(&scope, &sub) && valid_scope(sub, depth + 2); break;
            case 2:
                if (wt2 != WT_LEN || !rd_len(&scope, &sub)) return 0;
                ok = f(ctx, sub, depth + 2);
                break;
            case 3: ok = valid_string(&scope, wt2); break;
            default: ok = skip_unknown(&scope, wt2);
            }
            if (!ok) return 0;
        }
    }
    return 1;
}

/* each Resource{Spans,Metrics} (field 1) of an export request through f */
static int each_resource(rd m, int (*f)(void *ctx, rd rs), void *ctx) {
    while (m.p < m.end) {
        uint32_t field;
        int wt;
        rd sub;
        if (!rd_tag(&m, &field, &wt)) return 0;
        if (field == 1) {
            if (wt != WT_LEN || !rd_len(&m, &sub) || !f(ctx, sub)) return 0;
        } else if (!skip_unknown(&m, wt)) {
            return 0;
        }
    }
    return 1;
}

#endif
