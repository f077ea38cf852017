/* The PCIe byte counters' poller in C: a thread of its own (no Python, no GIL) that reads fields 197/198 of
 * every polled GPU on the wrap-safe grid of collector/nvml/pcie.py and keeps their 64-bit totals, and the
 * agent's cycle's own poll, one ctypes call that also copies the totals out. Plain C99 + POSIX threads,
 * no Python headers; loaded with ctypes by collector/nvml/pcie_native.py.
 *
 * The semantics are PcieCounterPoller's (Python), which stays the reference and the fallback:
 *  - the schedule (pp_begin, pp_cycle_mark, pp_wake, pp_plan) is _PythonSchedule's, step for step, in
 *    doubles on CLOCK_MONOTONIC (Python's time.monotonic), so the tests run the same simulations on both;
 *  - a poll where every GPU answered every field with SUCCESS, in a value type this code follows exactly,
 *    advances the totals as PcieCounterPoller._unwrap_all does. Anything else (a call or a field failing,
 *    a signed or double value, a total that would leave [0, 2**64)) changes nothing here: the poll's rows
 *    and return codes are kept, nothing polls any more, and Python takes the poller over for good (the
 *    access layer's verdicts on those answers, then its own thread). */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_monotonic_thread.h"

#define PP_ABI 1

/* nvmlFieldValue_t as collector/nvml/access.py's FIELD_ROW reads it */
typedef struct {
    uint32_t fid, scope;
    int64_t ts_us, latency_us;
    uint32_t vtype, rc;
    uint64_t raw;
} pp_row;

typedef int (*field_values_fn)(void *, int, void *);

/* the schedule, in seconds on CLOCK_MONOTONIC; has_* say whether the optional times are set */
typedef struct {
    double period, interval, late_after;
    int64_t k;
    double previous, next_at, grid, anchor, last_poll_at, last_gap;
    int32_t has_previous, has_grid, has_anchor, has_last;
    int64_t late_polls;
} pp_sched;


typedef struct {
    pp_sched sched;
    field_values_fn field_fn;
    int64_t ndev, nfields;
    void *const *handles; /* ndev */
    pp_row *rows;         /* ndev * nfields, field and scope ids set by Python */
    int32_t *rets;        /* ndev: what each device's call answered in the latest poll */
    uint64_t *last_raw, *total; /* per counter (ndev * nfields): the unwrapped state */
    int64_t *time_ns;
    uint8_t *has;
    uint64_t *out_total; /* the copy handed to the cycle */
    int64_t *out_time;
    uint8_t *out_has;
    int64_t polls, cycle_polls, thread_polls, calls;
    int32_t unusual; /* a poll found what only Python can judge: its rows and rets are kept, nothing polls */
    int32_t pad;
    mt_runtime *rt;
} pp_poller;

int pp_abi(void) { return PP_ABI; }

/* -- the schedule (PcieCounterPoller's, see _PythonSchedule in pcie.py) ------------------------------------ */

static double py_mod(double x, double y) { /* Python's float %: the sign of the divisor */
    double m = fmod(x, y);
    if (m != 0.0 && ((m < 0.0) != (y < 0.0))) m += y;
    return m;
}

static void note_gap(pp_sched *s, double now, int has_prev, double prev) {
    if (!has_prev || now - prev <= s->late_after) return;
    s->late_polls++;
    s->last_gap = now - prev;
}

/* the thread starts: from the latest poll (start's, or a cycle's since), else from now */
void pp_begin(pp_sched *s, double now) {
    s->previous = s->has_last ? s->last_poll_at : now;
    s->has_previous = 1;
    s->next_at = s->previous + s->period;
    s->has_grid = 0;
}

/* the cycle's poll: its time is the grid's anchor */
void pp_cycle_mark(pp_sched *s, double now) {
    note_gap(s, now, s->has_last, s->last_poll_at);
    s->anchor = s->last_poll_at = now;
    s->has_anchor = s->has_last = 1;
}

/* the thread woke at now for its poll */
void pp_wake(pp_sched *s, double now) {
    int later = s->has_last && s->last_poll_at > s->previous;
    note_gap(s, now, 1, later ? s->last_poll_at : s->previous);
    if (now - s->next_at > s->period) s->next_at = now;
    s->last_poll_at = s->previous = now;
    s->has_last = 1;
}

/* after the thread's poll at now: when its next turn is */
void pp_plan(pp_sched *s, double now) {
    if (s->k <= 1 || !s->has_anchor) {
        s->next_at += s->period;
        return;
    }
    double period = s->period, interval = s->interval, anchor = s->anchor;
    if (!s->has_grid || py_mod(anchor - s->grid, interval) > period / 2) {
        s->grid = anchor;
        s->has_grid = 1;
    }
    double grid = s->grid;
    double latest_turn = grid + (double)(int64_t)floor((now - grid) / interval) * interval;
    int missed = anchor < latest_turn - period / 2;
    int64_t turn = (int64_t)floor((now - grid) / period + 0.1) + 1;
    int64_t r = turn % s->k;
    if (r < 0) r += s->k;
    if (r == 0 && !missed) turn += 1;
    s->next_at = grid + (double)turn * period;
}

/* -- polls ------------------------------------------------------------------------------------------------ */


#define TS_LIMIT ((int64_t)1 << 52)
#define WRAP ((uint64_t)1 << 32)

/* the raw counter of a row as PcieCounterPoller reads it, or -1 for a value type only Python follows */
static int raw_of(const pp_row *r, uint64_t *raw) {
    switch (r->vtype) {
    case 1: *raw = r->raw & 0xFFFFFFFFu; return 0;
    case 2: case 3: *raw = r->raw; return 0;
    case 6: *raw = r->raw & 0xFFFFu; return 0;
    default: return -1; /* double, signed, unknown: Python's int() of decode_value */
    }
}

/* one poll of every device; 0, or 1 when it was unusual (then no state changed and p->unusual is set) */
static int poll(pp_poller *p) {
    int64_t n = p->ndev * p->nfields;
    int bad = 0;
    for (int64_t d = 0; d < p->ndev; d++) {
        p->rets[d] = p->field_fn(p->handles[d], (int)p->nfields, p->rows + d * p->nfields);
        p->calls++;
        bad |= p->rets[d] != 0;
    }
    for (int64_t j = 0; j < n && !bad; j++) {
        const pp_row *r = &p->rows[j];
        uint64_t raw;
        if (r->rc != 0 || r->ts_us > TS_LIMIT || r->ts_us < -TS_LIMIT || raw_of(r, &raw) != 0) {
            bad = 1;
            break;
        }
        if (!p->has[j]) continue;
        uint64_t last = p->last_raw[j], delta;
        if (raw >= last) {
            delta = raw - last;
        } else {
            if (raw + WRAP < last) { bad = 1; break; } /* Python's total would go down */
            delta = raw + WRAP - last;
        }
        if (p->total[j] + delta < p->total[j]) { bad = 1; break; } /* past 2**64 */
    }
    if (bad) {
        p->unusual = 1;
        return 1;
    }
    for (int64_t j = 0; j < n; j++) {
        const pp_row *r = &p->rows[j];
        uint64_t raw = 0;
        raw_of(r, &raw);
        if (!p->has[j]) {
            p->total[j] = raw;
            p->has[j] = 1;
        } else {
            uint64_t last = p->last_raw[j];
            p->total[j] += raw >= last ? raw - last : raw + WRAP - last;
        }
        p->last_raw[j] = raw;
        p->time_ns[j] = r->ts_us > 0 ? r->ts_us * 1000 : 0;
    }
    p->polls++;
    return 0;
}

static void copy_out(pp_poller *p) {
    size_t n = (size_t)(p->ndev * p->nfields);
    memcpy(p->out_total, p->total, n * sizeof *p->total);
    memcpy(p->out_time, p->time_ns, n * sizeof *p->time_ns);
    memcpy(p->out_has, p->has, n);
}

static void *run(void *arg) {
    pp_poller *p = (pp_poller *)arg;
    mt_runtime *rt = p->rt;
    pthread_mutex_lock(&rt->mu);
    pp_begin(&p->sched, mt_now_s());
    while (!rt->stop && !p->unusual) {
        double now;
        while (!rt->stop && (now = mt_now_s()) < p->sched.next_at) {
            struct timespec until = mt_deadline(p->sched.next_at);
            /* the mutex is free while waiting: the cycle polls then */
            pthread_cond_timedwait(&rt->cv, &rt->mu, &until);
        }
        if (rt->stop) break;
        now = mt_now_s();
        pp_wake(&p->sched, now);
        if (poll(p) != 0) break; /* Python takes over at the cycle's next poll */
        p->thread_polls++;
        pp_plan(&p->sched, now);
    }
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

/* the lock and the wake-up condition (on CLOCK_MONOTONIC); 0, or -1 */
int pp_init(pp_poller *p) {
    mt_runtime *rt = mt_new();
    if (rt == NULL) return -1;
    p->rt = rt;
    return 0;
}

/* start-up's poll, then the thread; 0, 1 when the poll was unusual (no thread), -1 when no thread could start */
int pp_start(pp_poller *p) {
    mt_runtime *rt = p->rt;
    pthread_mutex_lock(&rt->mu);
    p->sched.last_poll_at = mt_now_s();
    p->sched.has_last = 1;
    int rc = poll(p);
    if (rc == 0) {
        copy_out(p);
        if (pthread_create(&rt->thread, NULL, run, p) == 0) rt->started = 1;
        else rc = -1;
    }
    pthread_mutex_unlock(&rt->mu);
    return rc;
}

/* under the lock: a poll and the copy of the totals: 0; 1 when this poll was unusual (Python judges it and takes
 * over); 2 when an earlier poll was (the thread's: nothing polled now, Python takes over and makes this poll) */
static int poll_and_copy(pp_poller *p) {
    int rc = p->unusual ? 2 : poll(p);
    if (rc == 0) copy_out(p);
    return rc;
}

/* the cycle's poll; 0, 1 or 2 as poll_and_copy */
int pp_cycle(pp_poller *p) {
    mt_runtime *rt = p->rt;
    pthread_mutex_lock(&rt->mu);
    pp_cycle_mark(&p->sched, mt_now_s());
    p->cycle_polls++;
    int rc = poll_and_copy(p);
    pthread_mutex_unlock(&rt->mu);
    return rc;
}

/* a poll outside the schedule (PcieCounterPoller.poll_once); 0, 1 or 2 as poll_and_copy */
int pp_poll(pp_poller *p) {
    mt_runtime *rt = p->rt;
    pthread_mutex_lock(&rt->mu);
    int rc = poll_and_copy(p);
    pthread_mutex_unlock(&rt->mu);
    return rc;
}

/* the thread stopped and joined (it polls no more); the state stays readable */
void pp_stop(pp_poller *p) {
    mt_runtime *rt = p->rt;
    if (rt == NULL) return;
    pthread_mutex_lock(&rt->mu);
    rt->stop = 1;
    pthread_cond_signal(&rt->cv);
    int started = rt->started;
    rt->started = 0;
    pthread_mutex_unlock(&rt->mu);
    if (started) pthread_join(rt->thread, NULL);
}

void pp_free(pp_poller *p) {
    mt_runtime *rt = p->rt;
    if (rt == NULL) return;
    pp_stop(p);
    mt_free(rt);
    p->rt = NULL;
}
