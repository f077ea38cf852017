/*
 * stacklens' stand-in for NVIDIA's libnvidia-ml.so.1, so the real pynvml can be exercised where no
 * GPU exists. Values and errors come from a script file named by $NVML_STANDIN_SCRIPT (format in
 * README.md beside this file). Only the functions the agent calls are exported: anything else is
 * absent, as on an older driver, and pynvml raises FunctionNotFound for it.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -shared -fPIC -pthread -o libnvidia-ml.so.1 nvml_standin.c
 *
 * Structure layouts follow pynvml's ctypes classes (c_nvmlFieldValue_t, nvmlPciInfo_t,
 * c_nvmlMemory_t, c_nvmlMemory_v2_t, c_nvmlProcessInfo_v3_t, c_nvmlEventData_t, ...).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    OK = 0, E_UNINITIALIZED = 1, E_INVALID_ARGUMENT = 2, E_NOT_SUPPORTED = 3, E_NOT_FOUND = 6,
    E_INSUFFICIENT_SIZE = 7, E_TIMEOUT = 10, E_GPU_IS_LOST = 15, E_MEMORY = 20, E_ARGUMENT_VERSION_MISMATCH = 25,
    E_UNKNOWN = 999
};
/* nvmlValueType_t */
enum { T_DOUBLE = 0, T_U32 = 1, T_U64 = 3, T_I64 = 4 };
#define XID_EVENT 0x8ULL                /* nvmlEventTypeXidCriticalError */
#define MEMORY_V2_VERSION 0x02000028u   /* nvmlMemory_v2: sizeof(nvmlMemory_v2_t) | 2 << 24 */
#define NOT_AVAILABLE_ULL (~0ULL)       /* NVML_VALUE_NOT_AVAILABLE for unsigned long long */
#define MAX_GPUS 64
#define MAX_XIDS 32
#define MAX_PROCS 256
#define MAX_EVENT_SETS 16
#define TABLE 8192
#define TEXT_MAX 96                     /* NVML_DEVICE_UUID_V2_BUFFER_SIZE, NVML_DEVICE_NAME_V2_BUFFER_SIZE */

/* ---- NVML's structures, as pynvml lays them out ----------------------------------------------- */
typedef union { double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
                long long sllVal; int siVal; unsigned short usVal; } nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; }
    nvmlProcessInfo_t;
struct device;
typedef struct { struct device *device; unsigned long long eventType, eventData;
                 unsigned int gpuInstanceId, computeInstanceId; } nvmlEventData_t;

/* ---- our state ---------------------------------------------------------------------------------- */
/* One scripted value: a number of some type, or an error in its place (ret != OK). */
typedef struct { int type; nvmlReturn_t ret; union { double d; unsigned long long u; long long s; } v; } value_t;

enum { DEV_WILDCARD = -1, DEV_SYSTEM = -2 };
typedef struct {
    int used;
    int dev;        /* a GPU index, DEV_WILDCARD (gpu.*) or DEV_SYSTEM */
    char key[64];
    char *raw;      /* the text after the key */
    nvmlReturn_t text_ret; /* text settings: NS or ERR:<code> in place of the text */
    int n;          /* sequence settings: the values, one per tick */
    value_t *vals;
} entry_t;

typedef struct device {
    int index;
    unsigned long long tick;
    unsigned long long field_calls;
    long long lost_at;  /* -1: never */
    int lost_reported;  /* the event wait said GPU_IS_LOST once */
    int nxid;
    unsigned int xid_value[MAX_XIDS];
    unsigned long long xid_tick[MAX_XIDS];
    int xid_done[MAX_XIDS];
} device_t;

typedef struct { int used; unsigned long long registered; /* bit per GPU index */ } event_set_t;

typedef struct { int used; char key[128]; unsigned long long count; } counter_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
/* signalled whenever what an event wait looks at changes (a tick, a shutdown): waiters block on it, as a
   real driver blocks in the kernel, instead of polling */
static pthread_cond_t events_changed = PTHREAD_COND_INITIALIZER;
static int refcount;
static entry_t entries[TABLE];
static counter_t counters[TABLE];
static device_t devices[MAX_GPUS];
static event_set_t event_sets[MAX_EVENT_SETS];
static int gpu_count;
static unsigned long long clock_base_us, clock_step_us;
static nvmlReturn_t init_error;
static int logging_calls; /* $NVML_STANDIN_CALL_LOG names a file: count every call */

/* The agent asks for the same fields in the same order every cycle: remember, per device and
 * position in the request, which setting answered, so a read costs no key formatting or hashing.
 * Used only when calls are not being counted. */
#define FIELD_CACHE 256
typedef struct { unsigned int field, scope; entry_t *entry; int valid; } field_cache_t;
static field_cache_t field_cache[MAX_GPUS][FIELD_CACHE];

/* ---- hashing: settings and call counters -------------------------------------------------------- */
static unsigned long hash(int dev, const char *key) {
    unsigned long h = 5381u + (unsigned long)(dev + 3) * 131u;
    for (const char *p = key; *p; p++) h = h * 33u + (unsigned char)*p;
    return h % TABLE;
}

static entry_t *find(int dev, const char *key) {
    for (unsigned long i = hash(dev, key), probes = 0; probes < TABLE; i = (i + 1) % TABLE, probes++) {
        if (!entries[i].used) return NULL;
        if (entries[i].dev == dev && strcmp(entries[i].key, key) == 0) return &entries[i];
    }
    return NULL;
}

/* The device's own setting, else the gpu.* wildcard. */
static entry_t *lookup(int dev, const char *key) {
    entry_t *e = find(dev, key);
    return e ? e : find(DEV_WILDCARD, key);
}

static void count_call(const char *sym, int dev, const char *key) {
    if (!logging_calls) return; /* no log asked for: cost nothing, so benchmarks measure the agent */
    char k[128];
    snprintf(k, sizeof k, "%s %d %s", sym, dev, key ? key : "-");
    for (unsigned long i = hash(0, k), probes = 0; probes < TABLE; i = (i + 1) % TABLE, probes++) {
        if (!counters[i].used) { counters[i].used = 1; snprintf(counters[i].key, sizeof counters[i].key, "%s", k); }
        if (strcmp(counters[i].key, k) == 0) { counters[i].count++; return; }
    }
}

static void write_call_log(void) {
    const char *path = getenv("NVML_STANDIN_CALL_LOG");
    if (!path || !*path) return;
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "nvml stand-in: cannot write call log %s: %s\n", path, strerror(errno)); return; }
    for (int i = 0; i < TABLE; i++)
        if (counters[i].used) fprintf(f, "%s %llu\n", counters[i].key, counters[i].count);
    fclose(f);
}

static void read_logging_setting(void) {
    const char *log = getenv("NVML_STANDIN_CALL_LOG");
    logging_calls = log && *log;
}

__attribute__((constructor)) static void at_load(void) { read_logging_setting(); }

__attribute__((destructor)) static void at_unload(void) {
    pthread_mutex_lock(&mu);
    write_call_log();
    pthread_mutex_unlock(&mu);
}

/* ---- the script ------------------------------------------------------------------------------------ */
static int script_line; /* for messages */

__attribute__((format(printf, 1, 2))) static int bad(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "nvml stand-in: script %s line %d: ", getenv("NVML_STANDIN_SCRIPT"), script_line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

/* Unsigned decimal (or 0x hex) with nothing after it. */
static int parse_ull(const char *s, unsigned long long *out) {
    if (!*s || *s == '-' || *s == '+' || *s == ' ') return -1;
    char *end = NULL;
    errno = 0;
    int base = (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) ? 16 : 10;
    *out = strtoull(s, &end, base);
    return (errno || *end || end == s) ? -1 : 0;
}

static int parse_ll(const char *s, long long *out) {
    if (!*s) return -1;
    char *end = NULL;
    errno = 0;
    *out = strtoll(s, &end, 10);
    return (errno || *end || end == s) ? -1 : 0;
}

/* NS or ERR:<code> in place of a value: the error, else OK (and -1 for a malformed ERR:). */
static int parse_error(const char *tok, nvmlReturn_t *ret) {
    *ret = OK;
    if (strcmp(tok, "NS") == 0) { *ret = E_NOT_SUPPORTED; return 0; }
    if (strncmp(tok, "ERR:", 4) == 0) {
        unsigned long long code;
        if (parse_ull(tok + 4, &code) != 0 || code == 0 || code > 0x7fffffff) return -1;
        *ret = (nvmlReturn_t)code;
    }
    return 0;
}

static int parse_value(const char *tok, value_t *out) {
    memset(out, 0, sizeof *out);
    out->type = T_U64;
    if (parse_error(tok, &out->ret) != 0) return -1;
    if (out->ret != OK) return 0;
    if (strncmp(tok, "d:", 2) == 0) {
        char *end = NULL;
        out->type = T_DOUBLE;
        out->v.d = strtod(tok + 2, &end);
        return (*end || end == tok + 2) ? -1 : 0;
    }
    if (strncmp(tok, "u32:", 4) == 0) {
        out->type = T_U32;
        return (parse_ull(tok + 4, &out->v.u) != 0 || out->v.u > 0xffffffffULL) ? -1 : 0;
    }
    if (strncmp(tok, "i64:", 4) == 0) { out->type = T_I64; return parse_ll(tok + 4, &out->v.s); }
    if (strncmp(tok, "u64:", 4) == 0) tok += 4;
    return parse_ull(tok, &out->v.u);
}

static unsigned long long as_ull(const value_t *v) {
    if (v->type == T_DOUBLE) return v->v.d <= 0 ? 0 : (unsigned long long)v->v.d;
    if (v->type == T_I64) return (unsigned long long)v->v.s;
    return v->v.u;
}

/* The keys a GPU may have. Text settings are kept as written; the others are value sequences. */
typedef enum { K_UNKNOWN, K_SEQ, K_TEXT, K_ONE } key_kind;

static int all_digits(const char *s) {
    if (!*s) return 0;
    for (; *s; s++) if (*s < '0' || *s > '9') return 0;
    return 1;
}

static key_kind key_kind_of(const char *key) {
    static const char *text[] = {"name", "uuid", "pci_bus_id", "xid", "procs.compute", "procs.graphics",
                                 "procs.mps", NULL};
    static const char *one[] = {"lost_at_tick", "events_unsupported", NULL};
    static const char *seq[] = {
        "temp.gpu", "reasons", "power_mw", "power_limit_mw", "energy_mj", "mem.total", "mem.used", "mem.free",
        "mem.reserved", "util.gpu", "util.mem", "pcie.tx_kbps", "pcie.rx_kbps", "pcie.replay", "pcie.gen",
        "pcie.width", "pcie.max_gen", "pcie.max_width", "remap.cor", "remap.unc", "remap.pending", "remap.failure",
        "clock.graphics", "clock.sm", "clock.mem", "clock.video", "clock_max.graphics", "clock_max.sm",
        "clock_max.mem", "clock_max.video", NULL};
    for (int i = 0; text[i]; i++) if (!strcmp(key, text[i])) return K_TEXT;
    for (int i = 0; one[i]; i++) if (!strcmp(key, one[i])) return K_ONE;
    for (int i = 0; seq[i]; i++) if (!strcmp(key, seq[i])) return K_SEQ;
    if (!strncmp(key, "temp.", 5) && all_digits(key + 5)) return K_SEQ;
    if (!strncmp(key, "nvlink.state.", 13) && all_digits(key + 13)) return K_SEQ;
    if (!strncmp(key, "ecc.", 4) && (key[4] == '0' || key[4] == '1') && key[5] == '.' &&
        (key[6] == '0' || key[6] == '1') && !key[7]) return K_SEQ;
    return K_UNKNOWN;
}

/* field.<id> and field.<id>.<scope>, kept as field.<id>.<scope>. */
static int field_key(const char *key, char *out, size_t len) {
    if (strncmp(key, "field.", 6) != 0) return 0;
    char id[16] = {0}, scope[16] = "0";
    const char *dot = strchr(key + 6, '.');
    size_t idlen = dot ? (size_t)(dot - (key + 6)) : strlen(key + 6);
    if (idlen == 0 || idlen >= sizeof id) return -1;
    memcpy(id, key + 6, idlen);
    if (dot) {
        if (strlen(dot + 1) >= sizeof scope) return -1;
        strcpy(scope, dot + 1);
    }
    unsigned long long a, b;
    if (!all_digits(id) || !all_digits(scope) || parse_ull(id, &a) || parse_ull(scope, &b) || a > 0xffffffffULL ||
        b > 0xffffffffULL) return -1;
    snprintf(out, len, "field.%llu.%llu", a, b);
    return 1;
}

static void clear_script(void) {
    for (int i = 0; i < TABLE; i++) {
        free(entries[i].raw);
        free(entries[i].vals);
    }
    memset(entries, 0, sizeof entries);
    memset(devices, 0, sizeof devices);
    memset(event_sets, 0, sizeof event_sets);
    memset(field_cache, 0, sizeof field_cache);
    gpu_count = 0;
    init_error = OK;
    clock_base_us = 1767225600000000ULL;
    clock_step_us = 100000ULL;
}

static entry_t *new_entry(int dev, const char *key, const char *rest) {
    unsigned long i = hash(dev, key), probes = 0;
    while (entries[i].used && !(entries[i].dev == dev && strcmp(entries[i].key, key) == 0)) {
        i = (i + 1) % TABLE;
        if (++probes >= TABLE) return NULL;
    }
    entry_t *e = &entries[i];
    free(e->raw);
    free(e->vals);
    memset(e, 0, sizeof *e);
    e->used = 1;
    e->dev = dev;
    snprintf(e->key, sizeof e->key, "%s", key);
    e->raw = strdup(rest);
    return e;
}

static int check_xids(const char *raw) {
    char *copy = strdup(raw), *save = NULL;
    int n = 0, rc = 0;
    for (char *tok = strtok_r(copy, " \t", &save); tok && rc == 0; tok = strtok_r(NULL, " \t", &save)) {
        char *at = strchr(tok, '@');
        unsigned long long v, t;
        if (!at) { rc = bad("xid '%s': expected <xid>@<tick>", tok); break; }
        *at = 0;
        if (parse_ull(tok, &v) || parse_ull(at + 1, &t) || v > 0xffffffffULL) {
            *at = '@';
            rc = bad("xid '%s': expected <xid>@<tick>", tok);
        } else if (++n > MAX_XIDS) rc = bad("more than %d XIDs", MAX_XIDS);
    }
    free(copy);
    return rc;
}

static int check_procs(const char *raw) {
    if (!strcmp(raw, "-")) return 0;
    char *copy = strdup(raw), *save = NULL;
    int n = 0, rc = 0;
    for (char *tok = strtok_r(copy, " \t", &save); tok && rc == 0; tok = strtok_r(NULL, " \t", &save)) {
        char *colon = strchr(tok, ':');
        unsigned long long pid, bytes;
        if (colon) *colon = 0;
        if (parse_ull(tok, &pid) || pid > 0xffffffffULL || (colon && parse_ull(colon + 1, &bytes))) {
            if (colon) *colon = ':';
            rc = bad("process '%s': expected <pid>:<bytes>, or - for none", tok);
        } else if (++n > MAX_PROCS) rc = bad("more than %d processes", MAX_PROCS);
    }
    free(copy);
    return rc;
}

static int parse_bus_id(const char *s, unsigned int *domain, unsigned int *bus, unsigned int *dev, unsigned int *fn) {
    int used = 0;
    if (strlen(s) >= 32 || sscanf(s, "%8x:%2x:%2x.%1x%n", domain, bus, dev, fn, &used) != 4 || s[used]) return -1;
    return (*dev > 0x1f || *fn > 7) ? -1 : 0;
}

static int add_gpu_setting(int dev, const char *key_in, const char *rest) {
    char key[64];
    if (strlen(key_in) >= sizeof key) return bad("key %s is too long", key_in);
    int f = field_key(key_in, key, sizeof key);
    if (f < 0) return bad("bad field key %s (field.<id> or field.<id>.<scope>)", key_in);
    key_kind kind = K_SEQ;
    if (f == 0) {
        strcpy(key, key_in);
        kind = key_kind_of(key);
        if (kind == K_UNKNOWN) return bad("unknown GPU setting '%s'", key);
    }
    entry_t *e = new_entry(dev, key, rest);
    if (!e) return bad("too many settings (%d)", TABLE);
    if (kind == K_TEXT) {
        /* the whole text may be NS or ERR:<code> instead */
        if (parse_error(rest, &e->text_ret) != 0) return bad("%s: bad error '%s'", key, rest);
        if (e->text_ret != OK) return 0;
        if (strlen(rest) >= TEXT_MAX) return bad("%s: '%s' is too long", key, rest);
        unsigned int a, b, c, d;
        if (!strcmp(key, "pci_bus_id") && parse_bus_id(rest, &a, &b, &c, &d))
            return bad("pci_bus_id '%s': expected dddddddd:bb:dd.f", rest);
        if (!strcmp(key, "xid")) return check_xids(rest);
        if (!strncmp(key, "procs.", 6)) return check_procs(rest);
        return 0;
    }
    char *copy = strdup(rest), *save = NULL;
    e->vals = calloc(strlen(rest) / 2 + 2, sizeof(value_t));
    for (char *tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
        if (parse_value(tok, &e->vals[e->n]) != 0) {
            bad("bad value '%s' for %s", tok, key);
            free(copy);
            return -1;
        }
        e->n++;
    }
    free(copy);
    if (kind == K_ONE && (e->n != 1 || e->vals[0].ret != OK || e->vals[0].type != T_U64))
        return bad("%s takes one number, not '%s'", key, rest);
    return 0;
}

static int add_system_setting(const char *key, const char *rest) {
    unsigned long long u;
    if (!strcmp(key, "gpus")) {
        if (parse_ull(rest, &u) || u > MAX_GPUS) return bad("gpus '%s': expected 0 to %d", rest, MAX_GPUS);
        gpu_count = (int)u;
    } else if (!strcmp(key, "clock_base_us") || !strcmp(key, "clock_step_us")) {
        if (parse_ull(rest, &u)) return bad("%s '%s': expected microseconds", key, rest);
        if (!strcmp(key, "clock_base_us")) clock_base_us = u;
        else clock_step_us = u;
    } else if (!strcmp(key, "init_error")) {
        if (parse_ull(rest, &u) || u > 0x7fffffff) return bad("init_error '%s': expected an NVML error code", rest);
        init_error = (nvmlReturn_t)u;
    } else if (!strcmp(key, "driver") || !strcmp(key, "nvml") || !strcmp(key, "cuda")) {
        entry_t *e = new_entry(DEV_SYSTEM, key, rest);
        if (!e) return bad("too many settings (%d)", TABLE);
        if (parse_error(rest, &e->text_ret) != 0) return bad("%s: bad error '%s'", key, rest);
        if (e->text_ret == OK && strlen(rest) >= 80) return bad("%s: '%s' is too long", key, rest);
        long long v;
        if (e->text_ret == OK && !strcmp(key, "cuda") && (parse_ll(rest, &v) || v < 0 || v > 0x7fffffff))
            return bad("cuda '%s': expected a number such as 13000", rest);
    } else {
        return bad("unknown setting '%s'", key);
    }
    return 0;
}

static void setup_devices(void) {
    for (int d = 0; d < gpu_count; d++) {
        device_t *dv = &devices[d];
        dv->index = d;
        entry_t *lost = lookup(d, "lost_at_tick");
        dv->lost_at = lost ? (long long)lost->vals[0].v.u : -1;
        entry_t *x = lookup(d, "xid");
        if (x && x->text_ret == OK) {
            char *copy = strdup(x->raw), *save = NULL;
            for (char *tok = strtok_r(copy, " \t", &save); tok && dv->nxid < MAX_XIDS;
                 tok = strtok_r(NULL, " \t", &save)) {
                char *at = strchr(tok, '@');
                *at = 0;
                dv->xid_value[dv->nxid] = (unsigned int)strtoul(tok, NULL, 0);
                dv->xid_tick[dv->nxid] = strtoull(at + 1, NULL, 0);
                dv->nxid++;
            }
            free(copy);
        }
    }
}

static int load_script(void) {
    clear_script();
    script_line = 0;
    const char *path = getenv("NVML_STANDIN_SCRIPT");
    if (!path || !*path) return 0; /* no script: a machine with no GPUs */
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "nvml stand-in: cannot open script %s: %s\n", path, strerror(errno)); return -1; }
    static char line[1 << 16];
    int rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        script_line++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n' && !feof(f)) { rc = bad("line too long"); break; }
        char *hash_mark = strchr(line, '#');
        if (hash_mark) *hash_mark = 0;
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        len = strlen(p);
        while (len && (p[len - 1] == '\n' || p[len - 1] == '\r' || p[len - 1] == ' ' || p[len - 1] == '\t'))
            p[--len] = 0;
        if (!*p) continue;
        char *rest = strpbrk(p, " \t");
        if (!rest) { rc = bad("'%s' has no value", p); break; }
        *rest++ = 0;
        while (*rest == ' ' || *rest == '\t') rest++;
        if (strncmp(p, "gpu.", 4) != 0) { rc = add_system_setting(p, rest); continue; }
        char *dot = strchr(p + 4, '.');
        if (!dot || !dot[1]) { rc = bad("bad key '%s': expected gpu.<index|*>.<setting>", p); break; }
        *dot = 0;
        int dev;
        unsigned long long idx;
        if (strcmp(p + 4, "*") == 0) dev = DEV_WILDCARD;
        else if (!all_digits(p + 4) || parse_ull(p + 4, &idx) || idx >= MAX_GPUS) {
            rc = bad("bad GPU index '%s' (0 to %d, or *)", p + 4, MAX_GPUS - 1);
            break;
        } else dev = (int)idx;
        rc = add_gpu_setting(dev, dot + 1, rest);
    }
    fclose(f);
    if (rc != 0) return rc;
    setup_devices();
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------------------------ */
#define ENTER(sym, dev, key)                                                \
    pthread_mutex_lock(&mu);                                                \
    count_call(sym, dev, key);                                              \
    if (refcount <= 0) { pthread_mutex_unlock(&mu); return E_UNINITIALIZED; }
#define LEAVE(rc) do { nvmlReturn_t r_ = (rc); pthread_mutex_unlock(&mu); return r_; } while (0)

/* A handle is one of our device structs, for a GPU the script has. */
static int dev_ok(const device_t *d) {
    uintptr_t p = (uintptr_t)d, base = (uintptr_t)devices;
    return d && p >= base && p < base + (uintptr_t)gpu_count * sizeof(device_t) &&
           (p - base) % sizeof(device_t) == 0;
}
static int dev_index(const device_t *d) { return dev_ok(d) ? d->index : -1; }
static int lost(const device_t *d) { return d->lost_at >= 0 && (long long)d->tick >= d->lost_at; }

/* Checks every device call makes: a real handle, the GPU still there. */
#define DEVICE_CHECKS(d, ...)                                       \
    if (!dev_ok(d) || __VA_ARGS__) LEAVE(E_INVALID_ARGUMENT);       \
    if (lost(d)) LEAVE(E_GPU_IS_LOST)

static const value_t *at_tick(const entry_t *e, unsigned long long tick) {
    return &e->vals[tick < (unsigned long long)e->n ? tick : (unsigned long long)e->n - 1];
}

/* The value of a sequence setting at the device's current tick. */
static nvmlReturn_t seq(const device_t *d, const char *key, value_t *out) {
    const entry_t *e = lookup(d->index, key);
    if (!e || e->n == 0) return E_NOT_SUPPORTED;
    *out = *at_tick(e, d->tick);
    return out->ret;
}

/* A text setting, or its scripted error; dflt when absent (NULL: NOT_SUPPORTED). */
static nvmlReturn_t text_setting(int dev, const char *key, const char *dflt, const char **out) {
    const entry_t *e = dev == DEV_SYSTEM ? find(DEV_SYSTEM, key) : lookup(dev, key);
    if (e && e->text_ret != OK) return e->text_ret;
    *out = e ? e->raw : dflt;
    return *out ? OK : E_NOT_SUPPORTED;
}

static nvmlReturn_t get_uint(device_t *d, const char *sym, const char *key, unsigned int *out) {
    ENTER(sym, dev_index(d), key);
    DEVICE_CHECKS(d, !out);
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *out = (unsigned int)as_ull(&v);
    LEAVE(rc);
}

static nvmlReturn_t get_ull(device_t *d, const char *sym, const char *key, unsigned long long *out) {
    ENTER(sym, dev_index(d), key);
    DEVICE_CHECKS(d, !out);
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *out = as_ull(&v);
    LEAVE(rc);
}

static nvmlReturn_t copy_text(char *buf, unsigned int len, const char *text) {
    if (!buf) return E_INVALID_ARGUMENT;
    if (strlen(text) + 1 > len) return E_INSUFFICIENT_SIZE;
    strcpy(buf, text);
    return OK;
}

/* ---- init and system --------------------------------------------------------------------------------- */
EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    if (refcount == 0) read_logging_setting();
    count_call("nvmlInit", -1, NULL);
    if (refcount == 0) {
        if (load_script() != 0) { pthread_mutex_unlock(&mu); return E_UNKNOWN; }
        if (init_error) { nvmlReturn_t e = init_error; pthread_mutex_unlock(&mu); return e; }
    }
    refcount++;
    pthread_mutex_unlock(&mu);
    return OK;
}
EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    ENTER("nvmlShutdown", -1, NULL);
    refcount--;
    pthread_cond_broadcast(&events_changed);
    write_call_log();
    LEAVE(OK);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request";
    case 18: return "RM has detected an NVML/RM version mismatch";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "vGPU operation not available while ECC is enabled";
    case 23: return "Insufficient resources";
    case 24: return "Frequency not supported";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    case 30: return "Reset type not supported";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t system_text(const char *sym, const char *key, const char *dflt, char *buf, unsigned int len) {
    ENTER(sym, -1, key);
    const char *text = NULL;
    nvmlReturn_t rc = text_setting(DEV_SYSTEM, key, dflt, &text);
    LEAVE(rc == OK ? copy_text(buf, len, text) : rc);
}
EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    return system_text("nvmlSystemGetDriverVersion", "driver", "580.82.07", buf, len);
}
EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned int len) {
    return system_text("nvmlSystemGetNVMLVersion", "nvml", "13.580.82", buf, len);
}
EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
    ENTER("nvmlSystemGetCudaDriverVersion", -1, "cuda");
    if (!v) LEAVE(E_INVALID_ARGUMENT);
    const char *text = NULL;
    nvmlReturn_t rc = text_setting(DEV_SYSTEM, "cuda", "13000", &text);
    if (rc == OK) *v = atoi(text);
    LEAVE(rc);
}
EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    ENTER("nvmlDeviceGetCount", -1, NULL);
    if (!n) LEAVE(E_INVALID_ARGUMENT);
    *n = (unsigned int)gpu_count;
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *n) { return nvmlDeviceGetCount_v2(n); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, device_t **h) {
    ENTER("nvmlDeviceGetHandleByIndex", i < MAX_GPUS ? (int)i : -1, NULL);
    if (!h || i >= (unsigned int)gpu_count) LEAVE(E_INVALID_ARGUMENT);
    if (lost(&devices[i])) LEAVE(E_GPU_IS_LOST);
    *h = &devices[i];
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, device_t **h) {
    return nvmlDeviceGetHandleByIndex_v2(i, h);
}

/* The UUID, or its scripted error. */
static nvmlReturn_t uuid_of(int i, char *scratch, size_t len, const char **out) {
    snprintf(scratch, len, "GPU-00000000-0000-0000-0000-0000000000%02x", i);
    return text_setting(i, "uuid", scratch, out);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, device_t **h) {
    ENTER("nvmlDeviceGetHandleByUUID", -1, NULL);
    if (!uuid || !h) LEAVE(E_INVALID_ARGUMENT);
    char scratch[TEXT_MAX];
    for (int i = 0; i < gpu_count; i++) {
        const char *text = NULL;
        if (uuid_of(i, scratch, sizeof scratch, &text) == OK && strcmp(uuid, text) == 0) {
            if (lost(&devices[i])) LEAVE(E_GPU_IS_LOST);
            *h = &devices[i];
            LEAVE(OK);
        }
    }
    LEAVE(E_NOT_FOUND);
}

/* ---- identity ---------------------------------------------------------------------------------------- */
EXPORT nvmlReturn_t nvmlDeviceGetUUID(device_t *d, char *buf, unsigned int len) {
    ENTER("nvmlDeviceGetUUID", dev_index(d), NULL);
    DEVICE_CHECKS(d, !buf);
    char scratch[TEXT_MAX];
    const char *text = NULL;
    nvmlReturn_t rc = uuid_of(d->index, scratch, sizeof scratch, &text);
    LEAVE(rc == OK ? copy_text(buf, len, text) : rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(device_t *d, char *buf, unsigned int len) {
    ENTER("nvmlDeviceGetName", dev_index(d), NULL);
    DEVICE_CHECKS(d, !buf);
    const char *text = NULL;
    nvmlReturn_t rc = text_setting(d->index, "name", "NVIDIA H100 80GB HBM3", &text);
    LEAVE(rc == OK ? copy_text(buf, len, text) : rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(device_t *d, nvmlPciInfo_t *pci) {
    ENTER("nvmlDeviceGetPciInfo", dev_index(d), NULL);
    DEVICE_CHECKS(d, !pci);
    /* default: buses 0x18, 0x28, ... 0xf8, then the next domain */
    char dflt[32];
    snprintf(dflt, sizeof dflt, "%08X:%02X:00.0", (unsigned int)d->index / 15u,
             0x18u + 0x10u * ((unsigned int)d->index % 15u));
    const char *text = NULL;
    nvmlReturn_t rc = text_setting(d->index, "pci_bus_id", dflt, &text);
    if (rc != OK) LEAVE(rc);
    unsigned int domain = 0, bus = 0, dev = 0, fn = 0;
    parse_bus_id(text, &domain, &bus, &dev, &fn); /* checked when the script was read */
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busId, sizeof pci->busId, "%s", text);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X", domain & 0xffffu, bus, dev, fn);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = 0x233010deu;    /* H100 SXM5, NVIDIA */
    pci->pciSubSystemId = 0x16c110deu;
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(device_t *d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }
EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(device_t *d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }

EXPORT nvmlReturn_t nvmlDeviceGetIndex(device_t *d, unsigned int *i) {
    ENTER("nvmlDeviceGetIndex", dev_index(d), NULL);
    DEVICE_CHECKS(d, !i);
    *i = (unsigned int)d->index;
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(device_t *d, unsigned int *m) {
    ENTER("nvmlDeviceGetMinorNumber", dev_index(d), NULL);
    DEVICE_CHECKS(d, !m);
    *m = (unsigned int)d->index;
    LEAVE(OK);
}

/* whether an event wait on this device would return now: an XID that came due, or the GPU lost */
static int event_due(const device_t *d) {
    if (lost(d)) return 1;
    for (int x = 0; x < d->nxid; x++)
        if (!d->xid_done[x] && d->tick >= d->xid_tick[x]) return 1;
    return 0;
}

/* ---- the batched field read: advances the device's tick ------------------------------------------------ */
EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(device_t *d, int count, nvmlFieldValue_t *values) {
    ENTER("nvmlDeviceGetFieldValues", dev_index(d), NULL);
    if (!dev_ok(d) || count < 0 || (count > 0 && !values)) LEAVE(E_INVALID_ARGUMENT);
    /* each batched read after the first starts a new tick; the getters after it read the same row */
    if (d->field_calls++ > 0) {
        d->tick++;
        if (event_due(d)) pthread_cond_broadcast(&events_changed);  /* wake a waiter only when it has news */
    }
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    long long timestamp = (long long)(clock_base_us + d->tick * clock_step_us);
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *fv = &values[i];
        field_cache_t *c = i < FIELD_CACHE ? &field_cache[d->index][i] : NULL;
        entry_t *e;
        if (c && c->valid && c->field == fv->fieldId && c->scope == fv->scopeId && !logging_calls) {
            e = c->entry;
        } else {
            char key[48];
            snprintf(key, sizeof key, "field.%u.%u", fv->fieldId, fv->scopeId);
            count_call("field", d->index, key);
            e = lookup(d->index, key);
            if (c) { c->field = fv->fieldId; c->scope = fv->scopeId; c->entry = e; c->valid = 1; }
        }
        fv->timestamp = timestamp;
        fv->latencyUsec = 0;
        memset(&fv->value, 0, sizeof fv->value);
        fv->valueType = T_U64;
        if (!e || e->n == 0) { fv->nvmlReturn = E_NOT_SUPPORTED; continue; }
        const value_t *v = at_tick(e, d->tick);
        fv->nvmlReturn = v->ret;
        if (v->ret != OK) continue;
        fv->valueType = (unsigned int)v->type;
        if (v->type == T_DOUBLE) fv->value.dVal = v->v.d;
        else if (v->type == T_U32) fv->value.uiVal = (unsigned int)v->v.u;
        else if (v->type == T_I64) fv->value.sllVal = v->v.s;
        else fv->value.ullVal = v->v.u;
    }
    LEAVE(OK);
}

/* ---- simple getters ---------------------------------------------------------------------------------- */
EXPORT nvmlReturn_t nvmlDeviceGetTemperature(device_t *d, int sensor, unsigned int *t) {
    char key[32] = "temp.gpu";
    if (sensor != 0) snprintf(key, sizeof key, "temp.%u", (unsigned int)sensor);
    return get_uint(d, "nvmlDeviceGetTemperature", key, t);
}

static nvmlReturn_t clock_reading(device_t *d, const char *sym, int type, int max, unsigned int *mhz) {
    static const char *cur[] = {"clock.graphics", "clock.sm", "clock.mem", "clock.video"};
    static const char *top[] = {"clock_max.graphics", "clock_max.sm", "clock_max.mem", "clock_max.video"};
    if (type < 0 || type > 3) {
        ENTER(sym, dev_index(d), NULL);
        LEAVE(E_INVALID_ARGUMENT);
    }
    return get_uint(d, sym, max ? top[type] : cur[type], mhz);
}
EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(device_t *d, int type, unsigned int *mhz) {
    return clock_reading(d, "nvmlDeviceGetClockInfo", type, 0, mhz);
}
EXPORT nvmlReturn_t nvmlDeviceGetMaxClockInfo(device_t *d, int type, unsigned int *mhz) {
    return clock_reading(d, "nvmlDeviceGetMaxClockInfo", type, 1, mhz);
}
EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(device_t *d, unsigned long long *r) {
    return get_ull(d, "nvmlDeviceGetCurrentClocksEventReasons", "reasons", r);
}
EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(device_t *d, unsigned long long *r) {
    return get_ull(d, "nvmlDeviceGetCurrentClocksThrottleReasons", "reasons", r);
}
EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(device_t *d, unsigned int *mw) {
    return get_uint(d, "nvmlDeviceGetPowerUsage", "power_mw", mw);
}
EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(device_t *d, unsigned int *mw) {
    return get_uint(d, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw", mw);
}
EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(device_t *d, unsigned long long *mj) {
    return get_ull(d, "nvmlDeviceGetTotalEnergyConsumption", "energy_mj", mj);
}
EXPORT nvmlReturn_t nvmlDeviceGetPcieReplayCounter(device_t *d, unsigned int *n) {
    return get_uint(d, "nvmlDeviceGetPcieReplayCounter", "pcie.replay", n);
}
EXPORT nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(device_t *d, unsigned int *g) {
    return get_uint(d, "nvmlDeviceGetCurrPcieLinkGeneration", "pcie.gen", g);
}
EXPORT nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(device_t *d, unsigned int *w) {
    return get_uint(d, "nvmlDeviceGetCurrPcieLinkWidth", "pcie.width", w);
}
EXPORT nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(device_t *d, unsigned int *g) {
    return get_uint(d, "nvmlDeviceGetMaxPcieLinkGeneration", "pcie.max_gen", g);
}
EXPORT nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(device_t *d, unsigned int *w) {
    return get_uint(d, "nvmlDeviceGetMaxPcieLinkWidth", "pcie.max_width", w);
}

static void sleep_ms(unsigned int ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* The real call samples the link for 20 ms; so does this one (without holding the lock), whenever it
 * gets as far as sampling. */
EXPORT nvmlReturn_t nvmlDeviceGetPcieThroughput(device_t *d, int counter, unsigned int *kbps) {
    const char *key = counter == 0 ? "pcie.tx_kbps" : counter == 1 ? "pcie.rx_kbps" : NULL;
    ENTER("nvmlDeviceGetPcieThroughput", dev_index(d), key);
    DEVICE_CHECKS(d, !kbps || !key);
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    pthread_mutex_unlock(&mu);
    if (rc == E_NOT_SUPPORTED) return rc;
    sleep_ms(20);
    if (rc == OK) *kbps = (unsigned int)as_ull(&v);
    return rc;
}

/* The memory sizes: total, used and free are needed; reserved is 0 when absent. */
static nvmlReturn_t memory(const device_t *d, unsigned long long *total, unsigned long long *used,
                           unsigned long long *free_, unsigned long long *reserved) {
    value_t t, u, f, r;
    nvmlReturn_t rc = seq(d, "mem.total", &t);
    if (rc == OK) rc = seq(d, "mem.used", &u);
    if (rc == OK) rc = seq(d, "mem.free", &f);
    if (rc != OK) return rc;
    nvmlReturn_t rr = seq(d, "mem.reserved", &r);
    if (rr != OK && rr != E_NOT_SUPPORTED) return rr;
    *total = as_ull(&t);
    *used = as_ull(&u);
    *free_ = as_ull(&f);
    *reserved = rr == OK ? as_ull(&r) : 0;
    return OK;
}
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(device_t *d, nvmlMemory_t *m) {
    ENTER("nvmlDeviceGetMemoryInfo", dev_index(d), NULL);
    DEVICE_CHECKS(d, !m);
    unsigned long long total, used, free_, reserved;
    nvmlReturn_t rc = memory(d, &total, &used, &free_, &reserved);
    if (rc == OK) { m->total = total; m->used = used; m->free = free_; }
    LEAVE(rc);
}
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(device_t *d, nvmlMemory_v2_t *m) {
    ENTER("nvmlDeviceGetMemoryInfo_v2", dev_index(d), NULL);
    DEVICE_CHECKS(d, !m);
    if (m->version != MEMORY_V2_VERSION) LEAVE(E_ARGUMENT_VERSION_MISMATCH);
    unsigned long long total, used, free_, reserved;
    nvmlReturn_t rc = memory(d, &total, &used, &free_, &reserved);
    if (rc == OK) { m->total = total; m->used = used; m->free = free_; m->reserved = reserved; }
    LEAVE(rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(device_t *d, nvmlUtilization_t *u) {
    ENTER("nvmlDeviceGetUtilizationRates", dev_index(d), NULL);
    DEVICE_CHECKS(d, !u);
    value_t g, m;
    nvmlReturn_t rc = seq(d, "util.gpu", &g);
    if (rc == OK) rc = seq(d, "util.mem", &m);
    if (rc == OK) { u->gpu = (unsigned int)as_ull(&g); u->memory = (unsigned int)as_ull(&m); }
    LEAVE(rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(device_t *d, unsigned int link, int *active) {
    char key[32];
    snprintf(key, sizeof key, "nvlink.state.%u", link);
    ENTER("nvmlDeviceGetNvLinkState", dev_index(d), key);
    DEVICE_CHECKS(d, !active);
    if (!lookup(d->index, key)) LEAVE(E_INVALID_ARGUMENT); /* no such link */
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *active = (int)as_ull(&v);
    LEAVE(rc);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(device_t *d, int error_type, int counter_type, unsigned long long *n) {
    if (error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1) {
        ENTER("nvmlDeviceGetTotalEccErrors", dev_index(d), NULL);
        LEAVE(E_INVALID_ARGUMENT);
    }
    char key[32];
    snprintf(key, sizeof key, "ecc.%d.%d", error_type, counter_type);
    return get_ull(d, "nvmlDeviceGetTotalEccErrors", key, n);
}

EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(device_t *d, unsigned int *cor, unsigned int *unc,
                                              unsigned int *pending, unsigned int *failure) {
    ENTER("nvmlDeviceGetRemappedRows", dev_index(d), NULL);
    DEVICE_CHECKS(d, !cor || !unc || !pending || !failure);
    value_t a, b, c, e;
    nvmlReturn_t rc = seq(d, "remap.cor", &a);
    if (rc == OK) rc = seq(d, "remap.unc", &b);
    if (rc == OK) rc = seq(d, "remap.pending", &c);
    if (rc == OK) rc = seq(d, "remap.failure", &e);
    if (rc == OK) {
        *cor = (unsigned int)as_ull(&a);
        *unc = (unsigned int)as_ull(&b);
        *pending = (unsigned int)as_ull(&c);
        *failure = (unsigned int)as_ull(&e);
    }
    LEAVE(rc);
}

/* Running processes: "pid:bytes pid:bytes", "-" for none; NVML's size-query protocol: a count too
 * small (or no array) gets INSUFFICIENT_SIZE and the count needed. */
static nvmlReturn_t procs(device_t *d, const char *sym, const char *key, unsigned int *count,
                          nvmlProcessInfo_t *out) {
    ENTER(sym, dev_index(d), key);
    DEVICE_CHECKS(d, !count);
    const char *text = NULL;
    nvmlReturn_t rc = text_setting(d->index, key, NULL, &text);
    if (rc != OK) LEAVE(rc);
    static nvmlProcessInfo_t found[MAX_PROCS]; /* under the lock */
    unsigned int n = 0;
    char *copy = strdup(text), *save = NULL;
    for (char *tok = strtok_r(copy, " \t", &save); tok && n < MAX_PROCS; tok = strtok_r(NULL, " \t", &save)) {
        if (strcmp(tok, "-") == 0) continue;
        char *colon = strchr(tok, ':');
        found[n].pid = (unsigned int)strtoul(tok, NULL, 0);
        found[n].usedGpuMemory = colon ? strtoull(colon + 1, NULL, 0) : NOT_AVAILABLE_ULL;
        found[n].gpuInstanceId = found[n].computeInstanceId = 0xFFFFFFFFu;
        n++;
    }
    free(copy);
    if (*count < n || (!out && n > 0)) { *count = n; LEAVE(E_INSUFFICIENT_SIZE); }
    *count = n;
    if (n) memcpy(out, found, n * sizeof *out);
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetComputeRunningProcesses", "procs.compute", c, p);
}
EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetGraphicsRunningProcesses", "procs.graphics", c, p);
}
EXPORT nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetMPSComputeRunningProcesses", "procs.mps", c, p);
}

/* ---- events ------------------------------------------------------------------------------------------------ */
static int set_ok(const event_set_t *s) {
    uintptr_t p = (uintptr_t)s, base = (uintptr_t)event_sets;
    return s && p >= base && p < base + sizeof event_sets && (p - base) % sizeof(event_set_t) == 0 && s->used;
}

static int events_unsupported(const device_t *d) {
    const entry_t *e = lookup(d->index, "events_unsupported");
    return e && e->vals[0].v.u;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(event_set_t **set) {
    ENTER("nvmlEventSetCreate", -1, NULL);
    if (!set) LEAVE(E_INVALID_ARGUMENT);
    for (int i = 0; i < MAX_EVENT_SETS; i++) {
        if (!event_sets[i].used) {
            event_sets[i].used = 1;
            event_sets[i].registered = 0;
            *set = &event_sets[i];
            LEAVE(OK);
        }
    }
    LEAVE(E_MEMORY);
}
EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(device_t *d, unsigned long long *types) {
    ENTER("nvmlDeviceGetSupportedEventTypes", dev_index(d), NULL);
    DEVICE_CHECKS(d, !types);
    *types = events_unsupported(d) ? 0 : XID_EVENT;
    LEAVE(OK);
}
EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(device_t *d, unsigned long long types, event_set_t *set) {
    ENTER("nvmlDeviceRegisterEvents", dev_index(d), NULL);
    DEVICE_CHECKS(d, !set_ok(set));
    if (events_unsupported(d) || !(types & XID_EVENT)) LEAVE(E_NOT_SUPPORTED);
    set->registered |= 1ULL << d->index;
    LEAVE(OK);
}


/* One look for something to report, under the lock: 1 and *rc set when there is. */
static int poll_events(event_set_t *set, nvmlEventData_t *data, nvmlReturn_t *rc) {
    if (refcount <= 0 || !set_ok(set)) { *rc = refcount <= 0 ? E_UNINITIALIZED : E_INVALID_ARGUMENT; return 1; }
    for (int i = 0; i < gpu_count; i++) {
        device_t *d = &devices[i];
        if (!(set->registered & (1ULL << i))) continue;
        if (lost(d)) {
            if (!d->lost_reported) { d->lost_reported = 1; *rc = E_GPU_IS_LOST; return 1; }
            continue;
        }
        for (int x = 0; x < d->nxid; x++) {
            if (!d->xid_done[x] && d->tick >= d->xid_tick[x]) {
                d->xid_done[x] = 1;
                memset(data, 0, sizeof *data);
                data->device = d;
                data->eventType = XID_EVENT;
                data->eventData = d->xid_value[x];
                data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
                *rc = OK;
                return 1;
            }
        }
    }
    return 0;
}

/* Waits for an event: blocks on the condition the ticking threads signal, until one is due or the timeout. */
EXPORT nvmlReturn_t nvmlEventSetWait_v2(event_set_t *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    ENTER("nvmlEventSetWait", -1, NULL);
    if (!data) LEAVE(E_INVALID_ARGUMENT);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec += 1; deadline.tv_nsec -= 1000000000L; }
    for (;;) {
        nvmlReturn_t rc = OK;
        if (poll_events(set, data, &rc)) LEAVE(rc);
        if (pthread_cond_timedwait(&events_changed, &mu, &deadline) == ETIMEDOUT) {
            if (poll_events(set, data, &rc)) LEAVE(rc);
            LEAVE(E_TIMEOUT);
        }
    }
}
EXPORT nvmlReturn_t nvmlEventSetWait(event_set_t *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}
EXPORT nvmlReturn_t nvmlEventSetFree(event_set_t *set) {
    ENTER("nvmlEventSetFree", -1, NULL);
    if (!set_ok(set)) LEAVE(E_INVALID_ARGUMENT);
    set->used = 0;
    set->registered = 0;
    LEAVE(OK);
}
