/*
 * stacklens' stand-in for NVIDIA's libnvidia-ml.so.1, so the real pynvml can be exercised where no
 * GPU exists. Values and errors come from a script file named by $NVML_STANDIN_SCRIPT (format in
 * README.md beside this file). Only the functions the agent calls are exported: anything else is
 * absent, as on an older driver, and pynvml raises FunctionNotFound for it.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -shared -fPIC -pthread -o libnvidia-ml.so.1 nvml_standin.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
    OK = 0, E_UNINITIALIZED = 1, E_INVALID_ARGUMENT = 2, E_NOT_SUPPORTED = 3, E_INSUFFICIENT_SIZE = 7,
    E_TIMEOUT = 10, E_GPU_IS_LOST = 15, E_UNKNOWN = 999
};
enum { T_DOUBLE = 0, T_U32 = 1, T_U64 = 3, T_I64 = 4 };
#define XID_EVENT 0x8ULL
#define MAX_GPUS 64
#define MAX_XIDS 32
#define TABLE 8192

typedef struct { int type; nvmlReturn_t ret; union { double d; unsigned long long u; long long s; } v; } value_t;

typedef struct {
    int used;
    int dev; /* -1: the gpu.* wildcard, -2: a system setting */
    char key[64];
    char *raw; /* the text after the key */
    int n;
    value_t *vals;
} entry_t;

typedef struct device {
    int index;
    unsigned long long tick;
    unsigned long long field_calls;
    long long lost_at;
    int registered;
    int lost_reported;
    int nxid;
    int xid_value[MAX_XIDS];
    unsigned long long xid_tick[MAX_XIDS];
    int xid_done[MAX_XIDS];
} device_t;

typedef struct { int used; char key[128]; unsigned long long count; } counter_t;

typedef union { double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
                long long sllVal; int siVal; unsigned short usVal; } nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType;
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
typedef struct { device_t *device; unsigned long long eventType, eventData; unsigned int gpuInstanceId, computeInstanceId; }
    nvmlEventData_t;
typedef struct { int id; } event_set_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int refcount;
static entry_t entries[TABLE];
static counter_t counters[TABLE];
static device_t devices[MAX_GPUS];
static int gpu_count;
static unsigned long long clock_base_us = 1767225600000000ULL, clock_step_us = 100000ULL;
static nvmlReturn_t init_error;
static event_set_t the_event_set;
/* The agent asks for the same fields in the same order every cycle: remember, per device and
 * position in the request, which setting answered, so a read costs no key formatting or hashing. */
#define FIELD_CACHE 256
typedef struct { unsigned int field, scope; entry_t *entry; int valid; } field_cache_t;
static field_cache_t field_cache[MAX_GPUS][FIELD_CACHE];

/* ---- hashing: settings and call counters ------------------------------------------------------ */
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
    return e ? e : find(-1, key);
}

static int logging_calls; /* set at nvmlInit when $NVML_STANDIN_CALL_LOG names a file */

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
    if (!f) return;
    for (int i = 0; i < TABLE; i++)
        if (counters[i].used) fprintf(f, "%s %llu\n", counters[i].key, counters[i].count);
    fclose(f);
}

__attribute__((destructor)) static void at_unload(void) { write_call_log(); }

/* ---- the script --------------------------------------------------------------------------------- */
static int parse_value(const char *tok, value_t *out) {
    char *end = NULL;
    memset(out, 0, sizeof *out);
    out->type = T_U64;
    if (strcmp(tok, "NS") == 0) { out->ret = E_NOT_SUPPORTED; return 0; }
    if (strncmp(tok, "ERR:", 4) == 0) { out->ret = (int)strtol(tok + 4, &end, 10); return *end ? -1 : 0; }
    if (strncmp(tok, "d:", 2) == 0) { out->type = T_DOUBLE; out->v.d = strtod(tok + 2, &end); return *end ? -1 : 0; }
    if (strncmp(tok, "u32:", 4) == 0) { out->type = T_U32; out->v.u = strtoull(tok + 4, &end, 10); return *end ? -1 : 0; }
    if (strncmp(tok, "i64:", 4) == 0) { out->type = T_I64; out->v.s = strtoll(tok + 4, &end, 10); return *end ? -1 : 0; }
    if (strncmp(tok, "u64:", 4) == 0) tok += 4;
    out->v.u = strtoull(tok, &end, 10);
    return (*end || end == tok) ? -1 : 0;
}

static int is_text_key(const char *key) {
    return !strcmp(key, "uuid") || !strcmp(key, "name") || !strcmp(key, "pci_bus_id") ||
           !strncmp(key, "procs.", 6) || !strcmp(key, "xid");
}

static void clear_script(void) {
    for (int i = 0; i < TABLE; i++) {
        free(entries[i].raw);
        free(entries[i].vals);
    }
    memset(entries, 0, sizeof entries);
    memset(devices, 0, sizeof devices);
    memset(field_cache, 0, sizeof field_cache);
    gpu_count = 0;
    init_error = OK;
    clock_base_us = 1767225600000000ULL;
    clock_step_us = 100000ULL;
}

static int add_entry(int dev, const char *key, const char *rest, int lineno) {
    unsigned long i = hash(dev, key);
    while (entries[i].used && !(entries[i].dev == dev && strcmp(entries[i].key, key) == 0)) i = (i + 1) % TABLE;
    entry_t *e = &entries[i];
    free(e->raw);
    free(e->vals);
    memset(e, 0, sizeof *e);
    e->used = 1;
    e->dev = dev;
    snprintf(e->key, sizeof e->key, "%s", key);
    e->raw = strdup(rest);
    if (dev == -2 || is_text_key(key)) return 0;
    char *copy = strdup(rest), *save = NULL;
    e->vals = calloc(strlen(rest) / 2 + 2, sizeof(value_t));
    for (char *tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
        if (parse_value(tok, &e->vals[e->n]) != 0) {
            fprintf(stderr, "nvml stand-in: script line %d: bad value '%s' for %s\n", lineno, tok, key);
            free(copy);
            return -1;
        }
        e->n++;
    }
    free(copy);
    if (e->n == 0) { fprintf(stderr, "nvml stand-in: script line %d: %s has no value\n", lineno, key); return -1; }
    return 0;
}

static int load_script(void) {
    clear_script();
    const char *path = getenv("NVML_STANDIN_SCRIPT");
    if (!path) return 0; /* no script: a machine with no GPUs */
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "nvml stand-in: cannot open script %s\n", path); return -1; }
    char line[8192];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        lineno++;
        char *hash_mark = strchr(line, '#');
        if (hash_mark) *hash_mark = 0;
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t len = strlen(p);
        while (len && (p[len - 1] == '\n' || p[len - 1] == '\r' || p[len - 1] == ' ' || p[len - 1] == '\t')) p[--len] = 0;
        if (!*p) continue;
        char *rest = strpbrk(p, " \t");
        if (!rest) { fprintf(stderr, "nvml stand-in: script line %d: '%s' has no value\n", lineno, p); rc = -1; break; }
        *rest++ = 0;
        while (*rest == ' ' || *rest == '\t') rest++;
        if (strncmp(p, "gpu.", 4) == 0) {
            char *dot = strchr(p + 4, '.');
            if (!dot) { fprintf(stderr, "nvml stand-in: script line %d: bad key %s\n", lineno, p); rc = -1; break; }
            *dot = 0;
            int dev;
            if (strcmp(p + 4, "*") == 0) dev = -1;
            else {
                char *end;
                dev = (int)strtol(p + 4, &end, 10);
                if (*end || dev < 0 || dev >= MAX_GPUS) {
                    fprintf(stderr, "nvml stand-in: script line %d: bad GPU index %s\n", lineno, p + 4);
                    rc = -1;
                    break;
                }
            }
            rc = add_entry(dev, dot + 1, rest, lineno);
        } else if (!strcmp(p, "gpus")) {
            gpu_count = atoi(rest);
            if (gpu_count < 0 || gpu_count > MAX_GPUS) { fprintf(stderr, "nvml stand-in: gpus %d out of range\n", gpu_count); rc = -1; }
        } else if (!strcmp(p, "clock_base_us")) clock_base_us = strtoull(rest, NULL, 10);
        else if (!strcmp(p, "clock_step_us")) clock_step_us = strtoull(rest, NULL, 10);
        else if (!strcmp(p, "init_error")) init_error = atoi(rest);
        else if (!strcmp(p, "driver") || !strcmp(p, "nvml") || !strcmp(p, "cuda")) rc = add_entry(-2, p, rest, lineno);
        else { fprintf(stderr, "nvml stand-in: script line %d: unknown setting %s\n", lineno, p); rc = -1; }
    }
    fclose(f);
    if (rc != 0) return rc;
    for (int d = 0; d < gpu_count; d++) {
        device_t *dv = &devices[d];
        dv->index = d;
        entry_t *lost = lookup(d, "lost_at_tick");
        dv->lost_at = lost ? (long long)lost->vals[0].v.u : -1;
        entry_t *x = lookup(d, "xid");
        if (x) {
            char *copy = strdup(x->raw), *save = NULL;
            for (char *tok = strtok_r(copy, " \t", &save); tok && dv->nxid < MAX_XIDS; tok = strtok_r(NULL, " \t", &save)) {
                char *at = strchr(tok, '@');
                dv->xid_value[dv->nxid] = atoi(tok);
                dv->xid_tick[dv->nxid] = at ? strtoull(at + 1, NULL, 10) : 0;
                dv->nxid++;
            }
            free(copy);
        }
    }
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------------------ */
#define ENTER(sym, dev, key)                                                \
    pthread_mutex_lock(&mu);                                                \
    count_call(sym, dev, key);                                              \
    if (refcount <= 0) { pthread_mutex_unlock(&mu); return E_UNINITIALIZED; }
#define LEAVE(rc) do { nvmlReturn_t r_ = (rc); pthread_mutex_unlock(&mu); return r_; } while (0)

static int dev_ok(device_t *d) { return d && d >= devices && d < devices + gpu_count; }
static int lost(device_t *d) { return d->lost_at >= 0 && (long long)d->tick >= d->lost_at; }

/* The value of a sequence setting at the device's current tick. */
static nvmlReturn_t seq(device_t *d, const char *key, value_t *out) {
    entry_t *e = lookup(d->index, key);
    if (!e || e->n == 0) return E_NOT_SUPPORTED;
    *out = e->vals[d->tick < (unsigned long long)e->n ? d->tick : (unsigned long long)e->n - 1];
    return out->ret;
}

static nvmlReturn_t get_uint(device_t *d, const char *sym, const char *key, unsigned int *out) {
    ENTER(sym, dev_ok(d) ? d->index : -1, key);
    if (!dev_ok(d) || !out) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *out = (unsigned int)(v.type == T_DOUBLE ? v.v.d : (double)v.v.u);
    LEAVE(rc);
}

static nvmlReturn_t get_ull(device_t *d, const char *sym, const char *key, unsigned long long *out) {
    ENTER(sym, dev_ok(d) ? d->index : -1, key);
    if (!dev_ok(d) || !out) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t v;
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *out = v.v.u;
    LEAVE(rc);
}

static nvmlReturn_t copy_text(char *buf, unsigned int len, const char *text) {
    if (!buf) return E_INVALID_ARGUMENT;
    if (strlen(text) + 1 > len) return E_INSUFFICIENT_SIZE;
    strcpy(buf, text);
    return OK;
}

/* ---- init and system ------------------------------------------------------------------------------ */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    count_call("nvmlInit", -1, NULL);
    if (refcount == 0) {
        const char *log = getenv("NVML_STANDIN_CALL_LOG");
        logging_calls = log && *log;
        if (load_script() != 0) { pthread_mutex_unlock(&mu); return E_UNKNOWN; }
        if (init_error) { nvmlReturn_t e = init_error; pthread_mutex_unlock(&mu); return e; }
    }
    refcount++;
    pthread_mutex_unlock(&mu);
    return OK;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    ENTER("nvmlShutdown", -1, NULL);
    refcount--;
    write_call_log();
    LEAVE(OK);
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case OK: return "Success";
    case E_UNINITIALIZED: return "Uninitialized";
    case E_INVALID_ARGUMENT: return "Invalid Argument";
    case E_NOT_SUPPORTED: return "Not Supported";
    case E_INSUFFICIENT_SIZE: return "Insufficient Size";
    case E_TIMEOUT: return "Timeout";
    case E_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t system_text(const char *sym, const char *key, const char *dflt, char *buf, unsigned int len) {
    ENTER(sym, -1, key);
    entry_t *e = find(-2, key);
    LEAVE(copy_text(buf, len, e ? e->raw : dflt));
}
nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    return system_text("nvmlSystemGetDriverVersion", "driver", "580.82.07", buf, len);
}
nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned int len) {
    return system_text("nvmlSystemGetNVMLVersion", "nvml", "13.580.82", buf, len);
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
    ENTER("nvmlSystemGetCudaDriverVersion", -1, NULL);
    entry_t *e = find(-2, "cuda");
    if (v) *v = e ? atoi(e->raw) : 13000;
    LEAVE(v ? OK : E_INVALID_ARGUMENT);
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    ENTER("nvmlDeviceGetCount", -1, NULL);
    if (!n) LEAVE(E_INVALID_ARGUMENT);
    *n = (unsigned int)gpu_count;
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *n) { return nvmlDeviceGetCount_v2(n); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, device_t **h) {
    ENTER("nvmlDeviceGetHandleByIndex", (int)i, NULL);
    if (!h || i >= (unsigned int)gpu_count) LEAVE(E_INVALID_ARGUMENT);
    if (lost(&devices[i])) LEAVE(E_GPU_IS_LOST);
    *h = &devices[i];
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, device_t **h) { return nvmlDeviceGetHandleByIndex_v2(i, h); }

static void default_uuid(int i, char *out, size_t len) {
    snprintf(out, len, "GPU-00000000-0000-0000-0000-0000000000%02x", i);
}

static const char *uuid_of(int i, char *scratch, size_t len) {
    entry_t *e = find(i, "uuid");
    if (e) return e->raw;
    default_uuid(i, scratch, len);
    return scratch;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, device_t **h) {
    ENTER("nvmlDeviceGetHandleByUUID", -1, NULL);
    char scratch[96];
    for (int i = 0; uuid && h && i < gpu_count; i++)
        if (strcmp(uuid, uuid_of(i, scratch, sizeof scratch)) == 0) { *h = &devices[i]; LEAVE(OK); }
    LEAVE(E_INVALID_ARGUMENT);
}

/* ---- identity ----------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetUUID(device_t *d, char *buf, unsigned int len) {
    ENTER("nvmlDeviceGetUUID", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d)) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    char scratch[96];
    LEAVE(copy_text(buf, len, uuid_of(d->index, scratch, sizeof scratch)));
}

nvmlReturn_t nvmlDeviceGetName(device_t *d, char *buf, unsigned int len) {
    ENTER("nvmlDeviceGetName", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d)) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    entry_t *e = lookup(d->index, "name");
    LEAVE(copy_text(buf, len, e ? e->raw : "NVIDIA H100 80GB HBM3"));
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(device_t *d, nvmlPciInfo_t *pci) {
    ENTER("nvmlDeviceGetPciInfo", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !pci) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    memset(pci, 0, sizeof *pci);
    entry_t *e = find(d->index, "pci_bus_id");
    if (e) snprintf(pci->busId, sizeof pci->busId, "%s", e->raw);
    else snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", 0x18 + 0x10 * d->index);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%.15s", pci->busId);
    pci->bus = 0x18u + 0x10u * (unsigned int)d->index;
    pci->pciDeviceId = 0x233010deu;
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetPciInfo_v2(device_t *d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }
nvmlReturn_t nvmlDeviceGetPciInfo(device_t *d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }

nvmlReturn_t nvmlDeviceGetIndex(device_t *d, unsigned int *i) {
    ENTER("nvmlDeviceGetIndex", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !i) LEAVE(E_INVALID_ARGUMENT);
    *i = (unsigned int)d->index;
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetMinorNumber(device_t *d, unsigned int *m) {
    ENTER("nvmlDeviceGetMinorNumber", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !m) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    *m = (unsigned int)d->index;
    LEAVE(OK);
}

/* ---- the batched field read: advances the device's tick ------------------------------------------ */
nvmlReturn_t nvmlDeviceGetFieldValues(device_t *d, int count, nvmlFieldValue_t *values) {
    ENTER("nvmlDeviceGetFieldValues", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || count < 0 || (count > 0 && !values)) LEAVE(E_INVALID_ARGUMENT);
    /* each batched read after the first starts a new tick; the getters after it read the same row */
    if (d->field_calls++ > 0) d->tick++;
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
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
            if (!e && fv->scopeId == 0) {
                snprintf(key, sizeof key, "field.%u", fv->fieldId);
                e = lookup(d->index, key);
            }
            if (c) { c->field = fv->fieldId; c->scope = fv->scopeId; c->entry = e; c->valid = 1; }
        }
        value_t v = {0};
        fv->timestamp = (long long)(clock_base_us + d->tick * clock_step_us);
        fv->latencyUsec = 0;
        if (!e || e->n == 0) fv->nvmlReturn = E_NOT_SUPPORTED;
        else {
            v = e->vals[d->tick < (unsigned long long)e->n ? d->tick : (unsigned long long)e->n - 1];
            fv->nvmlReturn = v.ret;
        }
        memset(&fv->value, 0, sizeof fv->value);
        fv->valueType = T_U64;
        if (fv->nvmlReturn != OK) continue;
        fv->valueType = v.type;
        if (v.type == T_DOUBLE) fv->value.dVal = v.v.d;
        else if (v.type == T_U32) fv->value.uiVal = (unsigned int)v.v.u;
        else if (v.type == T_I64) fv->value.sllVal = v.v.s;
        else fv->value.ullVal = v.v.u;
    }
    LEAVE(OK);
}

/* ---- cheap getters ------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetTemperature(device_t *d, int sensor, unsigned int *t) {
    return get_uint(d, "nvmlDeviceGetTemperature", sensor == 0 ? "temp.gpu" : "temp.other", t);
}
static const char *clock_key(int type, int max) {
    static const char *cur[] = {"clock.graphics", "clock.sm", "clock.mem", "clock.video"};
    static const char *top[] = {"clock_max.graphics", "clock_max.sm", "clock_max.mem", "clock_max.video"};
    return (type >= 0 && type < 4) ? (max ? top[type] : cur[type]) : "clock.invalid";
}
nvmlReturn_t nvmlDeviceGetClockInfo(device_t *d, int type, unsigned int *mhz) {
    return get_uint(d, "nvmlDeviceGetClockInfo", clock_key(type, 0), mhz);
}
nvmlReturn_t nvmlDeviceGetMaxClockInfo(device_t *d, int type, unsigned int *mhz) {
    return get_uint(d, "nvmlDeviceGetMaxClockInfo", clock_key(type, 1), mhz);
}
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(device_t *d, unsigned long long *r) {
    return get_ull(d, "nvmlDeviceGetCurrentClocksEventReasons", "reasons", r);
}
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(device_t *d, unsigned long long *r) {
    return get_ull(d, "nvmlDeviceGetCurrentClocksThrottleReasons", "reasons", r);
}
nvmlReturn_t nvmlDeviceGetPowerUsage(device_t *d, unsigned int *mw) { return get_uint(d, "nvmlDeviceGetPowerUsage", "power_mw", mw); }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(device_t *d, unsigned int *mw) {
    return get_uint(d, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw", mw);
}
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(device_t *d, unsigned long long *mj) {
    return get_ull(d, "nvmlDeviceGetTotalEnergyConsumption", "energy_mj", mj);
}
nvmlReturn_t nvmlDeviceGetPcieReplayCounter(device_t *d, unsigned int *n) { return get_uint(d, "nvmlDeviceGetPcieReplayCounter", "pcie.replay", n); }
nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(device_t *d, unsigned int *g) { return get_uint(d, "nvmlDeviceGetCurrPcieLinkGeneration", "pcie.gen", g); }
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(device_t *d, unsigned int *w) { return get_uint(d, "nvmlDeviceGetCurrPcieLinkWidth", "pcie.width", w); }
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(device_t *d, unsigned int *g) { return get_uint(d, "nvmlDeviceGetMaxPcieLinkGeneration", "pcie.max_gen", g); }
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(device_t *d, unsigned int *w) { return get_uint(d, "nvmlDeviceGetMaxPcieLinkWidth", "pcie.max_width", w); }

nvmlReturn_t nvmlDeviceGetPcieThroughput(device_t *d, int counter, unsigned int *kbps) {
    struct timespec ts = {0, 20 * 1000 * 1000}; /* the real call samples a 20 ms window */
    nanosleep(&ts, NULL);
    return get_uint(d, "nvmlDeviceGetPcieThroughput", counter == 0 ? "pcie.tx_kbps" : "pcie.rx_kbps", kbps);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(device_t *d, nvmlMemory_t *m) {
    ENTER("nvmlDeviceGetMemoryInfo", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !m) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t total, used, free_;
    nvmlReturn_t rc = seq(d, "mem.total", &total);
    if (rc == OK) rc = seq(d, "mem.used", &used);
    if (rc == OK) rc = seq(d, "mem.free", &free_);
    if (rc == OK) { m->total = total.v.u; m->used = used.v.u; m->free = free_.v.u; }
    LEAVE(rc);
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(device_t *d, nvmlMemory_v2_t *m) {
    ENTER("nvmlDeviceGetMemoryInfo_v2", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !m) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t total, used, free_, reserved;
    nvmlReturn_t rc = seq(d, "mem.total", &total);
    if (rc == OK) rc = seq(d, "mem.used", &used);
    if (rc == OK) rc = seq(d, "mem.free", &free_);
    if (rc == OK) {
        m->total = total.v.u; m->used = used.v.u; m->free = free_.v.u;
        m->reserved = seq(d, "mem.reserved", &reserved) == OK ? reserved.v.u : 0;
    }
    LEAVE(rc);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(device_t *d, nvmlUtilization_t *u) {
    ENTER("nvmlDeviceGetUtilizationRates", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !u) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t g, m;
    nvmlReturn_t rc = seq(d, "util.gpu", &g);
    if (rc == OK) rc = seq(d, "util.mem", &m);
    if (rc == OK) { u->gpu = (unsigned int)g.v.u; u->memory = (unsigned int)m.v.u; }
    LEAVE(rc);
}

nvmlReturn_t nvmlDeviceGetNvLinkState(device_t *d, unsigned int link, int *active) {
    char key[32];
    snprintf(key, sizeof key, "nvlink.state.%u", link);
    ENTER("nvmlDeviceGetNvLinkState", dev_ok(d) ? d->index : -1, key);
    if (!dev_ok(d) || !active) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t v;
    if (!lookup(d->index, key)) LEAVE(E_INVALID_ARGUMENT); /* no such link */
    nvmlReturn_t rc = seq(d, key, &v);
    if (rc == OK) *active = (int)v.v.u;
    LEAVE(rc);
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(device_t *d, int error_type, int counter_type, unsigned long long *n) {
    char key[32];
    snprintf(key, sizeof key, "ecc.%d.%d", error_type, counter_type);
    return get_ull(d, "nvmlDeviceGetTotalEccErrors", key, n);
}

nvmlReturn_t nvmlDeviceGetRemappedRows(device_t *d, unsigned int *cor, unsigned int *unc, unsigned int *pending,
                                       unsigned int *failure) {
    ENTER("nvmlDeviceGetRemappedRows", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !cor || !unc || !pending || !failure) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    value_t a, b, c, e;
    nvmlReturn_t rc = seq(d, "remap.cor", &a);
    if (rc == OK) rc = seq(d, "remap.unc", &b);
    if (rc == OK) rc = seq(d, "remap.pending", &c);
    if (rc == OK) rc = seq(d, "remap.failure", &e);
    if (rc == OK) { *cor = (unsigned int)a.v.u; *unc = (unsigned int)b.v.u; *pending = (unsigned int)c.v.u; *failure = (unsigned int)e.v.u; }
    LEAVE(rc);
}

/* Running processes: "pid:bytes pid:bytes", "-" for none; NVML's size-query protocol. */
static nvmlReturn_t procs(device_t *d, const char *sym, const char *key, unsigned int *count, nvmlProcessInfo_t *out) {
    ENTER(sym, dev_ok(d) ? d->index : -1, key);
    if (!dev_ok(d) || !count) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    entry_t *e = lookup(d->index, key);
    if (!e) LEAVE(E_NOT_SUPPORTED);
    nvmlProcessInfo_t found[256];
    unsigned int n = 0;
    char *copy = strdup(e->raw), *save = NULL;
    for (char *tok = strtok_r(copy, " \t", &save); tok && n < 256; tok = strtok_r(NULL, " \t", &save)) {
        if (strcmp(tok, "-") == 0) continue;
        char *colon = strchr(tok, ':');
        found[n].pid = (unsigned int)strtoul(tok, NULL, 10);
        found[n].usedGpuMemory = colon ? strtoull(colon + 1, NULL, 10) : ~0ULL;
        found[n].gpuInstanceId = found[n].computeInstanceId = 0xFFFFFFFFu;
        n++;
    }
    free(copy);
    if (*count < n || (!out && n > 0)) { *count = n; LEAVE(E_INSUFFICIENT_SIZE); }
    *count = n;
    if (n) memcpy(out, found, n * sizeof *out);
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetComputeRunningProcesses", "procs.compute", c, p);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetGraphicsRunningProcesses", "procs.graphics", c, p);
}
nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(device_t *d, unsigned int *c, nvmlProcessInfo_t *p) {
    return procs(d, "nvmlDeviceGetMPSComputeRunningProcesses", "procs.mps", c, p);
}

/* ---- events ---------------------------------------------------------------------------------------- */
nvmlReturn_t nvmlEventSetCreate(event_set_t **set) {
    ENTER("nvmlEventSetCreate", -1, NULL);
    if (!set) LEAVE(E_INVALID_ARGUMENT);
    *set = &the_event_set;
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(device_t *d, unsigned long long *types) {
    ENTER("nvmlDeviceGetSupportedEventTypes", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !types) LEAVE(E_INVALID_ARGUMENT);
    entry_t *e = lookup(d->index, "events_unsupported");
    *types = (e && e->vals[0].v.u) ? 0 : XID_EVENT;
    LEAVE(OK);
}
nvmlReturn_t nvmlDeviceRegisterEvents(device_t *d, unsigned long long types, event_set_t *set) {
    ENTER("nvmlDeviceRegisterEvents", dev_ok(d) ? d->index : -1, NULL);
    if (!dev_ok(d) || !set) LEAVE(E_INVALID_ARGUMENT);
    if (lost(d)) LEAVE(E_GPU_IS_LOST);
    entry_t *e = lookup(d->index, "events_unsupported");
    if ((e && e->vals[0].v.u) || !(types & XID_EVENT)) LEAVE(E_NOT_SUPPORTED);
    d->registered = 1;
    LEAVE(OK);
}
nvmlReturn_t nvmlEventSetWait_v2(event_set_t *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    pthread_mutex_lock(&mu);
    count_call("nvmlEventSetWait", -1, NULL);
    pthread_mutex_unlock(&mu);
    if (!set || !data) return E_INVALID_ARGUMENT;
    for (unsigned int waited = 0;; waited += 5) {
        pthread_mutex_lock(&mu);
        if (refcount <= 0) { pthread_mutex_unlock(&mu); return E_UNINITIALIZED; }
        for (int i = 0; i < gpu_count; i++) {
            device_t *d = &devices[i];
            if (!d->registered) continue;
            if (lost(d) && !d->lost_reported) { d->lost_reported = 1; pthread_mutex_unlock(&mu); return E_GPU_IS_LOST; }
            for (int x = 0; x < d->nxid; x++) {
                if (!d->xid_done[x] && d->tick >= d->xid_tick[x]) {
                    d->xid_done[x] = 1;
                    data->device = d;
                    data->eventType = XID_EVENT;
                    data->eventData = (unsigned long long)d->xid_value[x];
                    data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
                    pthread_mutex_unlock(&mu);
                    return OK;
                }
            }
        }
        pthread_mutex_unlock(&mu);
        if (waited >= timeout_ms) return E_TIMEOUT;
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
nvmlReturn_t nvmlEventSetWait(event_set_t *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}
nvmlReturn_t nvmlEventSetFree(event_set_t *set) {
    ENTER("nvmlEventSetFree", -1, NULL);
    (void)set;
    LEAVE(OK);
}
