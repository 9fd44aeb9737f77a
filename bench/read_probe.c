// Streaming read-bandwidth probe for bench/hostinfo.py (compiled there with -O3 -march=native, called
// through ctypes).
//
// What it measures: how fast `threads` threads can read a buffer far larger than the last-level cache,
// each thread streaming its own contiguous slice with the widest vector loads the host has. That is the
// ceiling a batch-1 GEMV over DRAM-resident weights can reach, so it is the number a kernel's GB/s is
// compared with. The buffer sits on transparent huge pages (MADV_HUGEPAGE on a 2 MiB-aligned mapping
// before first touch): these hosts run THP in `madvise` mode, and 4 KiB pages cost ~30% of the
// bandwidth through TLB misses (docs/cpu-performance-notes.md), which is what the benches' own weight
// arenas avoid too.
//
// The loads are reduced into 8 independent integer accumulators (an add per 64 bytes, no dependence
// chain longer than 1/8 of the loop), so the loop is bound by the loads, not by arithmetic; the
// result is returned so the compiler cannot drop the loads.

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

// 64 bytes: one zmm load with AVX-512, two ymm loads with AVX2 (the compiler splits it), four xmm otherwise
typedef int64_t vec __attribute__((vector_size(64)));

static volatile int64_t sink;  // where the sums go, so the loads cannot be optimised away

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct probe {
    char * map;
    size_t map_bytes, bytes;
};

struct slice {
    const vec * v;
    size_t n;
    pthread_barrier_t * go;
    int64_t sum;
};

static int64_t read_slice(const vec * v, size_t n) {
    vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += v[i]; a1 += v[i + 1]; a2 += v[i + 2]; a3 += v[i + 3];
        a4 += v[i + 4]; a5 += v[i + 5]; a6 += v[i + 6]; a7 += v[i + 7];
    }
    for (; i < n; i++) a0 += v[i];
    vec s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    int64_t r = 0;
    for (int j = 0; j < 8; j++) r += s[j];
    return r;
}

static void * run_slice(void * arg) {
    struct slice * s = arg;
    pthread_barrier_wait(s->go);
    s->sum = read_slice(s->v, s->n);
    return NULL;
}

static long anon_huge_kb(void) {
    FILE * f = fopen("/proc/self/smaps_rollup", "r");
    if (!f) return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}

// A buffer of `bytes` (rounded down to 4 KiB), 2 MiB-aligned, on huge pages if `huge`, touched. Writes
// how many MiB of it the kernel backed with huge pages to *huge_mb (-1 if unknown). NULL on failure.
void * probe_open(size_t bytes, int huge, double * huge_mb) {
    const size_t align = 2u << 20;
    bytes &= ~(size_t) 4095;
    if (bytes == 0) return NULL;
    struct probe * p = malloc(sizeof *p);
    if (!p) return NULL;
    p->map_bytes = bytes + align;
    p->map = mmap(NULL, p->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p->map == MAP_FAILED) { free(p); return NULL; }
    char * buf = (char *) (((uintptr_t) p->map + align - 1) & ~(uintptr_t) (align - 1));
    // the request must come before the first touch: pages already faulted in stay 4 KiB
    madvise(buf, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    long before_kb = anon_huge_kb();
    memset(buf, 1, bytes);  // non-zero: an untouched or zero page would not be read from DRAM
    long after_kb = anon_huge_kb();
    *huge_mb = (before_kb < 0 || after_kb < 0) ? -1 : (after_kb - before_kb) / 1024.0;
    p->bytes = bytes;
    return p;
}

// One round: `threads` threads (the caller is one) each read a contiguous slice of the buffer; GB/s of
// the whole buffer from the moment all threads are released until the slowest is done. <= 0 on error.
double probe_round(void * handle, int threads) {
    struct probe * p = handle;
    if (threads < 1 || threads > 256) return -1;
    const char * buf = (const char *) (((uintptr_t) p->map + (2u << 20) - 1) & ~(uintptr_t) ((2u << 20) - 1));
    const size_t vecs = p->bytes / sizeof(vec), per = vecs / threads;
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, threads);
    struct slice sl[256];
    pthread_t tids[256];
    for (int t = 0; t < threads; t++) {
        sl[t].v = (const vec *) buf + t * per;
        sl[t].n = t == threads - 1 ? vecs - t * per : per;
        sl[t].go = &go;
        sl[t].sum = 0;
        if (t > 0 && pthread_create(&tids[t], NULL, run_slice, &sl[t]) != 0) return -1;
    }
    pthread_barrier_wait(&go);
    const double t0 = now_s();
    sl[0].sum = read_slice(sl[0].v, sl[0].n);
    for (int t = 1; t < threads; t++) pthread_join(tids[t], NULL);
    const double sec = now_s() - t0;
    pthread_barrier_destroy(&go);
    int64_t total = 0;
    for (int t = 0; t < threads; t++) total += sl[t].sum;
    sink += total;
    return (double) (vecs * sizeof(vec)) / sec / 1e9;
}

void probe_close(void * handle) {
    struct probe * p = handle;
    munmap(p->map, p->map_bytes);
    free(p);
}
