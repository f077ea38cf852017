/* What the agent's two compiled threads share (_fastfields.c's sampler ring, _pcie_poller.c's PCIe counter
 * poller): a lock with a wake-up condition timed on CLOCK_MONOTONIC, which is Python's time.monotonic, so both
 * keep the agent loop's grid. Static functions: each library gets its own copy. The includer defines
 * _POSIX_C_SOURCE 200809L first. */

#ifndef STACKLENS_MONOTONIC_THREAD_H
#define STACKLENS_MONOTONIC_THREAD_H

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* timed waits on CLOCK_MONOTONIC */
    pthread_t thread;
    int started, stop;
} mt_runtime;

/* a new lock and condition (no thread yet), or NULL */
static mt_runtime *mt_new(void) {
    mt_runtime *rt = calloc(1, sizeof *rt);
    if (rt == NULL) return NULL;
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        free(rt);
        return NULL;
    }
    int ok = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) == 0 && pthread_cond_init(&rt->cv, &attr) == 0;
    pthread_condattr_destroy(&attr);
    if (!ok) {
        free(rt);
        return NULL;
    }
    if (pthread_mutex_init(&rt->mu, NULL) != 0) {
        pthread_cond_destroy(&rt->cv);
        free(rt);
        return NULL;
    }
    return rt;
}

/* the lock and condition freed (the thread, if any, joined before) */
static void mt_free(mt_runtime *rt) {
    pthread_mutex_destroy(&rt->mu);
    pthread_cond_destroy(&rt->cv);
    free(rt);
}

/* CLOCK_MONOTONIC in seconds */
static double mt_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* a time in CLOCK_MONOTONIC seconds as pthread_cond_timedwait's deadline */
static struct timespec mt_deadline(double at) {
    struct timespec ts;
    if (at < 0.0) at = 0.0;
    ts.tv_sec = (time_t)at;
    ts.tv_nsec = (long)((at - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    if (ts.tv_nsec < 0) ts.tv_nsec = 0;
    return ts;
}

#endif
