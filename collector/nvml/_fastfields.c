/* The agent's compiled field decoder: one GPU's nvmlFieldValue_t rows (one batched read) into values,
 * timestamps and statuses, by a plan prepared once per request (collector/nvml/compiled.py), with the
 * counters' previous reads kept in a slot array. Plain C99, no Python headers; loaded with ctypes.
 *
 * The semantics are those of collector/nvml/source.py's Python decoding and collector/counters.py's
 * CounterRates (wrap window 0.25), value for value. Where this code cannot be exact with 64-bit integers
 * (a signed or double counter, a link sum past 2**64, a timestamp far out of range, a 32-bit wrap over a
 * previous value above 2**32) it answers ST_PY for that item without touching its slot: Python then
 * takes the slot over (its state moves into CounterRates for good) and decodes that item itself.
 *
 * sl_sample also makes a fast cycle's NVML calls of every GPU (the batched field read and the three getters),
 * one ctypes call a cycle instead of four a GPU; what they answer is judged by the access layer in Python.
 *
 * The ring (sl_ring_*) is a thread of its own that makes the fast cycles between two of the agent's Python cycles
 * (the nine 100 ms cycles between two once-a-second ones): at each tick of the grid the Python loop would have
 * woken at, the cycle's PCIe counter poll (the poller's pp_cycle, when it has one), sl_sample, and a copy of
 * every answer (the memory regions Python named: the jobs' rows, outputs and answers, the poller's totals) into
 * the tick's slot. Python wakes once a round, puts each slot back where sl_sample wrote it and makes the cycle's
 * readings as if it had just sampled. A tick with anything unusual in it (a call or a field failing, an output
 * left to Python, the poller handing over) ends the round there: Python judges it at once, as the live cycle
 * would, with the counters' slots as that tick left them. */

#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_monotonic_thread.h"

#define SL_ABI 5

typedef struct {
    uint32_t fid, scope;
    int64_t ts_us, latency_us;
    uint32_t vtype, rc;
    uint64_t raw;
} sl_row;

/* one counter's previous read: has 0 none, 1 kept here, 2 kept by Python (CounterRates) */
typedef struct {
    uint64_t value;
    int64_t t_ns;
    int32_t has;
    int32_t pad;
} sl_slot;

enum { K_GAUGE = 0, K_RATE = 1, K_LINKS = 2, K_PY = 3 };
enum { ST_VALUE = 0, ST_NONE = 1, ST_RC = 2, ST_PY = 3 };

/* one output: K_GAUGE / K_RATE read row pos; K_LINKS sums rows pos .. pos + n - 1 (a 64-bit counter);
 * K_PY is always decoded by Python */
typedef struct {
    int32_t kind, pos, n, slot;
    double scale;
} sl_item;

typedef int (*field_values_fn)(void *, int, void *);
typedef int (*clock_info_fn)(void *, unsigned int, unsigned int *);
typedef int (*reasons_fn_t)(void *, unsigned long long *);
typedef int (*utilization_fn)(void *, uint32_t *);

typedef struct {
    const sl_item *items;
    int64_t nitems;
    int64_t nrows;
    sl_slot *slots;
    int64_t nslots;
    double *values;
    int64_t *times;
    int8_t *status;
    /* sl_sample only: one GPU's fast-tier reads (NVML's functions, as pynvml resolved them, and the GPU's
     * handle and its request's array of nrows rows) and what they answered */
    field_values_fn field_fn;
    clock_info_fn clock_fn;
    reasons_fn_t reasons_fn;
    utilization_fn util_fn;
    void *handle;
    void *array;
    int32_t rets[4]; /* field values, SM clock, clock-event reasons, utilisation */
    int32_t ncalled; /* how many of those four calls were made */
    int32_t state;   /* 0 not read, 1 read but unusual (Python's verdicts), 2 read and decoded */
    uint64_t reasons;
    uint32_t sm_clock, util_gpu, util_mem, pad;
} sl_job;


/* timestamps in us beyond this (either sign) go to Python: t * 1000 and the differences stay in int64 */
#define TS_LIMIT ((int64_t)1 << 52)
#define NOW_LIMIT ((int64_t)1 << 61)

int sl_abi(void) { return SL_ABI; }

static double value_of(const sl_row *r) {
    switch (r->vtype) {
    case 0: {
        double d;
        memcpy(&d, &r->raw, sizeof d);
        return d;
    }
    case 1: return (double)(uint32_t)(r->raw & 0xFFFFFFFFu);
    case 4: return (double)(int64_t)r->raw;
    case 5: return (double)(int32_t)(uint32_t)(r->raw & 0xFFFFFFFFu);
    case 6: return (double)(r->raw & 0xFFFFu);
    default: return (double)r->raw; /* 2, 3 and any other type: the raw 64 bits, unsigned */
    }
}

/* CounterRates.update for a non-negative value below 2**64; returns the status, the rate in *rate.
 * ST_PY (slot untouched) where the Python integer arithmetic could not be followed exactly. */
static int rate_of(sl_slot *s, uint64_t v, int64_t t, int width, double *rate) {
    if (s->has == 2) return ST_PY;
    if (s->has == 0) {
        s->value = v;
        s->t_ns = t;
        s->has = 1;
        return ST_NONE;
    }
    int64_t dt = t - s->t_ns; /* |t|, |t_ns| < 2**62: no overflow */
    if (dt <= 0) return ST_NONE; /* the driver has not refreshed it: keep the earlier baseline */
    uint64_t last = s->value;
    if (v >= last) {
        s->value = v;
        s->t_ns = t;
        *rate = (double)(v - last) * 1e9 / (double)dt;
        return ST_VALUE;
    }
    if (width <= 32) {
        if (last > ((uint64_t)1 << 32)) return ST_PY; /* modulus - last + v below zero: Python's */
        s->value = v;
        s->t_ns = t;
        *rate = (double)(((uint64_t)1 << 32) - last + v) * 1e9 / (double)dt;
        return ST_VALUE;
    }
    s->value = v;
    s->t_ns = t;
    /* near the top: last >= 0.75 * 2**64 and v < 0.25 * 2**64 (exact comparisons, as Python's) */
    if (last >= ((uint64_t)3 << 62) && v < ((uint64_t)1 << 62)) {
        *rate = (double)(v - last) * 1e9 / (double)dt; /* unsigned: 2**64 - last + v */
        return ST_VALUE;
    }
    return ST_NONE; /* a reset: no rate this interval, re-baselined */
}

/* Decodes every item of the job from rows (nrows rows, the job's request). Returns 0, or -1 when the plan
 * does not fit the rows (then nothing was written and no slot changed). */
int sl_decode(const sl_job *job, const void *rows_v, int64_t now_ns) {
    const sl_row *rows = (const sl_row *)rows_v;
    int64_t nitems = job->nitems, nrows = job->nrows;
    int py_times = now_ns > NOW_LIMIT || now_ns < -NOW_LIMIT;
    for (int64_t j = 0; j < nitems; j++) {
        const sl_item *it = &job->items[j];
        if (it->kind == K_PY) continue;
        if (it->pos < 0 || it->n < 1 || (int64_t)it->pos + it->n > nrows) return -1;
        if (it->kind != K_GAUGE && (it->slot < 0 || it->slot >= job->nslots)) return -1;
    }
    for (int64_t j = 0; j < nitems; j++) {
        const sl_item *it = &job->items[j];
        double *val = &job->values[j];
        int64_t *t_out = &job->times[j];
        int8_t *st = &job->status[j];
        *val = 0.0;
        *t_out = 0;
        if (it->kind == K_PY) {
            *st = ST_PY;
            continue;
        }
        if (it->kind == K_LINKS) {
            const sl_row *r = &rows[it->pos];
            int ok = 1, carry = 0;
            /* Python reads the links' timestamps as a column of unsigned 64-bit words (_link_sum): a negative
             * one is above 2**63 there, so the latest is the unsigned maximum */
            uint64_t ts = 0;
            uint64_t sum = 0;
            for (int32_t k = 0; k < it->n; k++) {
                ok &= r[k].vtype == 3 && r[k].rc == 0;
                if ((uint64_t)r[k].ts_us > ts) ts = (uint64_t)r[k].ts_us;
                uint64_t next = sum + r[k].raw;
                carry |= next < sum;
                sum = next;
            }
            /* Python: t = ts_us * 1000 or now_ns */
            if (ts > (uint64_t)TS_LIMIT || (ts == 0 && py_times)) {
                *st = ST_PY;
                continue;
            }
            int64_t t = ts != 0 ? (int64_t)ts * 1000 : now_ns;
            *t_out = t;
            if (!ok) {
                *st = ST_NONE;
                continue;
            }
            if (carry || py_times) {
                *st = ST_PY;
                continue;
            }
            double rate = 0.0;
            int s = rate_of(&job->slots[it->slot], sum, t, 64, &rate);
            if (s == ST_VALUE) *val = rate * it->scale;
            *st = (int8_t)s;
            continue;
        }
        const sl_row *r = &rows[it->pos];
        if (r->ts_us > TS_LIMIT || ((r->ts_us <= 0) && py_times)) {
            *st = ST_PY;
            continue;
        }
        int64_t t = r->ts_us > 0 ? r->ts_us * 1000 : now_ns;
        *t_out = t;
        if (r->rc != 0) {
            *st = ST_RC; /* absent when NVML does not support the field, else missing: Python's verdict */
            continue;
        }
        if (it->kind == K_GAUGE) {
            *val = value_of(r) * it->scale;
            *st = ST_VALUE;
            continue;
        }
        /* a counter's rate: unsigned types here; a signed or double counter is Python's */
        uint64_t v;
        int width = 64;
        switch (r->vtype) {
        case 0: case 4: case 5: *st = ST_PY; continue;
        case 1: v = r->raw & 0xFFFFFFFFu; width = 32; break;
        case 6: v = r->raw & 0xFFFFu; break;
        default: v = r->raw; break;
        }
        if (py_times) {
            *st = ST_PY;
            continue;
        }
        double rate = 0.0;
        int s = rate_of(&job->slots[it->slot], v, t, width, &rate);
        if (s == ST_VALUE) *val = rate * it->scale;
        *st = (int8_t)s;
    }
    return 0;
}

/* One fast-tier read of each GPU of jobs: its batched field values, then (only when every field answered) its
 * rows decoded and its three getters called in order until one fails, as the Python sampler calls them. What
 * is unusual (a call or a field failing) is left to Python, which applies the access layer's verdicts to the
 * answers recorded here (state, rets, ncalled) and makes whatever calls the Python path would make next. */
void sl_sample(sl_job *const *jobs, int64_t njobs, int64_t now_ns) {
    for (int64_t g = 0; g < njobs; g++) {
        sl_job *job = jobs[g];
        job->state = 0;
        job->ncalled = 1;
        int ret = job->field_fn(job->handle, (int)job->nrows, job->array);
        job->rets[0] = ret;
        job->state = 1;
        if (ret != 0) continue;
        const sl_row *rows = (const sl_row *)job->array;
        int64_t k = 0;
        while (k < job->nrows && rows[k].rc == 0) k++;
        if (k < job->nrows) continue;
        if (sl_decode(job, rows, now_ns) != 0) continue;
        job->state = 2;
        unsigned int sm = 0;
        job->ncalled = 2;
        job->rets[1] = ret = job->clock_fn(job->handle, 1u /* NVML_CLOCK_SM */, &sm);
        job->sm_clock = sm;
        if (ret != 0) continue;
        unsigned long long reasons = 0;
        job->ncalled = 3;
        job->rets[2] = ret = job->reasons_fn(job->handle, &reasons);
        job->reasons = reasons;
        if (ret != 0) continue;
        uint32_t util[2] = {0, 0};
        job->ncalled = 4;
        job->rets[3] = job->util_fn(job->handle, util);
        job->util_gpu = util[0];
        job->util_mem = util[1];
    }
}

/* -- the ring: the fast cycles between two Python cycles, on a thread of their own ----------------------------- */

typedef struct {
    void *src;
    int64_t len;
} sl_region;

typedef int (*pcie_cycle_fn)(void *);

typedef struct {
    sl_job *const *jobs;
    int64_t njobs;
    const sl_region *regions; /* what a tick keeps, in this order */
    int64_t nregions, slot_bytes, cap;
    uint8_t *store;   /* cap * slot_bytes */
    int64_t *tick_ns; /* cap: each kept tick's CLOCK_REALTIME time (the agent's time.time_ns) */
    int32_t *pcie_rc; /* cap: what the PCIe poller's pp_cycle answered at the tick */
    pcie_cycle_fn pcie_cycle; /* NULL: no polled PCIe counters */
    void *pcie_poller;
    /* a round: ticks at first_at + k * period, k < ticks <= cap (CLOCK_MONOTONIC seconds: time.monotonic); due:
     * first_at + ticks * period, when the caller's next cycle is (its waiting ends then, or sooner if early) */
    double first_at, period, due;
    int64_t ticks;
    /* under the lock: the round's ticks kept and missed (the thread got to them after the next tick's time) */
    int64_t kept, missed;
    int32_t armed;   /* a round is under way: only the thread touches the jobs and the store */
    int32_t unusual; /* the round ended at its last kept tick, which has something only Python can judge */
    int32_t early;   /* the round ended before its last tick: unusual, or cut */
    int32_t pad;
    int64_t rounds;
    mt_runtime *rt;
} sl_ring;

static int64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* one tick into slot s: the cycle's PCIe poll, the GPUs' reads, the copy; whether it is unusual */
static int take_tick(sl_ring *r, int64_t s) {
    int64_t now_ns = realtime_ns();
    int unusual = 0;
    r->tick_ns[s] = now_ns;
    r->pcie_rc[s] = 0;
    if (r->pcie_cycle != NULL) {
        int rc = r->pcie_cycle(r->pcie_poller);
        r->pcie_rc[s] = rc;
        unusual |= rc != 0;
    }
    sl_sample(r->jobs, r->njobs, now_ns);
    for (int64_t g = 0; g < r->njobs; g++) {
        const sl_job *job = r->jobs[g];
        if (job->state != 2 || job->ncalled != 4 || job->rets[1] || job->rets[2] || job->rets[3]) {
            unusual = 1;
            continue;
        }
        for (int64_t j = 0; j < job->nitems; j++) unusual |= job->status[j] == ST_PY;
    }
    uint8_t *dst = r->store + s * r->slot_bytes;
    for (int64_t k = 0; k < r->nregions; k++) {
        memcpy(dst, r->regions[k].src, (size_t)r->regions[k].len);
        dst += r->regions[k].len;
    }
    return unusual;
}

static void *ring_run(void *arg) {
    sl_ring *r = (sl_ring *)arg;
    mt_runtime *rt = r->rt;
    pthread_mutex_lock(&rt->mu);
    while (!rt->stop) {
        if (!r->armed) {
            pthread_cond_wait(&rt->cv, &rt->mu);
            continue;
        }
        int64_t k = r->kept + r->missed;
        if (k >= r->ticks) {
            r->armed = 0;
            /* a waiter sleeps until due anyway: woken only when it is past (a late round) or the round was cut */
            if (r->early || mt_now_s() >= r->due) pthread_cond_broadcast(&rt->cv);
            continue;
        }
        double at = r->first_at + (double)k * r->period;
        double now = mt_now_s();
        if (now < at) {
            struct timespec until = mt_deadline(at);
            pthread_cond_timedwait(&rt->cv, &rt->mu, &until);
            continue;
        }
        if (now - at >= r->period) { /* the next tick is due already: this one is skipped, as Agent.run skips */
            r->missed++;
            continue;
        }
        /* the lock is free while NVML is called: Python only waits (armed is set) */
        pthread_mutex_unlock(&rt->mu);
        int unusual = take_tick(r, r->kept);
        pthread_mutex_lock(&rt->mu);
        r->kept++;
        if (unusual) {
            r->unusual = r->early = 1;
            r->armed = 0;
            pthread_cond_broadcast(&rt->cv);
        }
    }
    r->armed = 0;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

/* the lock, the condition (on CLOCK_MONOTONIC) and the thread, idle until armed; 0, or -1 */
int sl_ring_init(sl_ring *r) {
    mt_runtime *rt = mt_new();
    if (rt == NULL) return -1;
    r->rt = rt;
    if (pthread_create(&rt->thread, NULL, ring_run, r) != 0) {
        mt_free(rt);
        r->rt = NULL;
        return -1;
    }
    rt->started = 1;
    return 0;
}

/* a round of ticks at first_at + k * period (0 <= k < ticks <= cap); 0, or -1 (one under way, or stopped) */
int sl_ring_arm(sl_ring *r, double first_at, double period, int64_t ticks) {
    mt_runtime *rt = r->rt;
    if (rt == NULL || ticks < 1 || ticks > r->cap || !(period > 0.0)) return -1;
    pthread_mutex_lock(&rt->mu);
    int rc = -1;
    if (!r->armed && !rt->stop) {
        r->first_at = first_at;
        r->period = period;
        r->due = first_at + (double)ticks * period;
        r->ticks = ticks;
        r->kept = r->missed = 0;
        r->unusual = r->early = 0;
        r->armed = 1;
        r->rounds++;
        pthread_cond_broadcast(&rt->cv);
        rc = 0;
    }
    pthread_mutex_unlock(&rt->mu);
    return rc;
}

/* waits until the round is over and its due time has come (the caller's next cycle), or until it ended early (a
 * tick only Python can judge, or cut), or until limit (CLOCK_MONOTONIC seconds): 1 over, 0 still under way. A round
 * that ends as planned wakes nobody before its due time: one wake-up a round. */
int sl_ring_wait(sl_ring *r, double limit) {
    mt_runtime *rt = r->rt;
    if (rt == NULL) return 1;
    pthread_mutex_lock(&rt->mu);
    for (;;) {
        double now = mt_now_s();
        if ((!r->armed && (r->early || now >= r->due)) || now >= limit) break;
        struct timespec until = mt_deadline(now < r->due && r->due < limit ? r->due : limit);
        pthread_cond_timedwait(&rt->cv, &rt->mu, &until);
    }
    int over = !r->armed;
    pthread_mutex_unlock(&rt->mu);
    return over;
}

/* the round cut short: no tick after the one being taken, if any (then sl_ring_wait) */
void sl_ring_cut(sl_ring *r) {
    mt_runtime *rt = r->rt;
    if (rt == NULL) return;
    pthread_mutex_lock(&rt->mu);
    if (r->armed) {
        r->ticks = r->kept + r->missed;
        r->early = 1;
    }
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
}

/* slot s's answers put back where they were taken from; 0, or -1 (a round under way, or no such slot) */
int sl_ring_restore(sl_ring *r, int64_t s) {
    if (r->armed || s < 0 || s >= r->kept) return -1;
    const uint8_t *src = r->store + s * r->slot_bytes;
    for (int64_t k = 0; k < r->nregions; k++) {
        memcpy(r->regions[k].src, src, (size_t)r->regions[k].len);
        src += r->regions[k].len;
    }
    return 0;
}

/* the thread stopped (after the tick it is taking, if any) and joined, the lock freed; idempotent */
void sl_ring_free(sl_ring *r) {
    mt_runtime *rt = r->rt;
    if (rt == NULL) return;
    pthread_mutex_lock(&rt->mu);
    rt->stop = 1;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
    if (rt->started) pthread_join(rt->thread, NULL);
    mt_free(rt);
    r->rt = NULL;
    r->armed = 0;
}
