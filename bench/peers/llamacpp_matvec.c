// llama.cpp (ggml CPU backend) mat-vec / small-batch mat-mul timing, for bench/kernels.py.
//
// Built by bench/peers/llamacpp_matvec.py against the ggml headers and shared libraries that
// bench/peers/setup_llamacpp.sh leaves in the llama-cpp-python venv. It does what llama.cpp does per
// weight matrix during decode: one ggml graph whose nodes are y_c = ggml_mul_mat(W_c, x) over `copies`
// distinct weight matrices (together >= --min-mb, so the weights stream from DRAM), computed by the
// CPU backend (ggml_backend_graph_compute) with `--threads` threads. llama-cpp-python builds ggml with
// OpenMP (llama.cpp's default): the threads are then OpenMP's, ggml_barrier is `#pragma omp barrier`, and
// OMP_WAIT_POLICY decides whether waiting threads spin (GOMP's default) or sleep. Q4_0 weights can go into the CPU "repack" extra buffer
// type (llama.cpp's default on AVX2/AVX-512 machines: Q4_0 -> interleaved q4_0_8x8 + gemv/gemm
// kernels), or into a plain CPU buffer (ggml_vec_dot_q4_0_q8_0 / llamafile sgemm).
//
// usage: llamacpp_matvec TYPE N K BATCHES [--threads T] [--min-mb MB] [--repeats R] [--repack 0|1]
//                        [--huge 0|1] [--max-seconds S]
//   TYPE: q4_0 | q8_0 | f16 | f32;  N = output features (rows), K = input features;
//   BATCHES: comma-separated batch sizes, e.g. 1,4,16
// prints one JSON object per batch size on stdout:
//   {"type":"q4_0","repack":1,"n":4096,"k":4096,"batch":1,"copies":29,"weight_bytes":9437184,
//    "sec":..., "gbs":..., "rel_err":..., "buffer":"CPU_REPACK", "anon_huge_mb":...}
// sec = median over the timed graph computes of (graph time / copies): up to --repeats of them, fewer
// (at least 3, or 1) once a batch size has taken --max-seconds; gbs = weight_bytes / sec.
//
// --serve 1: the caller decides when each repetition runs, so it can interleave them with its own
// (bench/kernels.py times ours and llama.cpp ABAB, so the shared host's drift hits both alike). Per batch
// size, after the warm sweep, it prints {"ready":BATCH} and then reads commands on stdin, one per line:
//   s   one timed graph compute; prints {"sec":SECONDS_PER_MUL_MAT}
//   n   done with this batch size: checks the result and prints its row (sec = median of the `s` sweeps)
// End of input ends the program.

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// xorshift: cheap reproducible normal-ish numbers (sum of 4 uniforms)
static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float) ((rng_state >> 11) * (1.0 / 9007199254740992.0));
}
static float nrand(void) { return (frand() + frand() + frand() + frand() - 2.0f) * 1.7320508f; }

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

// ask for transparent huge pages on the 2 MiB-aligned interior of [p, p + n) (before first touch)
static void advise_huge(void * p, size_t n) {
    const size_t huge = 2u << 20;
    size_t lo = ((size_t) p + huge - 1) & ~(huge - 1);
    size_t hi = ((size_t) p + n) & ~(huge - 1);
    if (hi > lo) madvise((void *) lo, hi - lo, MADV_HUGEPAGE);
}

// keep warnings and errors, drop the per-tensor "repack: repack tensor ..." info lines
static void log_quiet(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static enum ggml_type parse_type(const char * s) {
    if (!strcmp(s, "q4_0")) return GGML_TYPE_Q4_0;
    if (!strcmp(s, "q8_0")) return GGML_TYPE_Q8_0;
    if (!strcmp(s, "f16")) return GGML_TYPE_F16;
    if (!strcmp(s, "f32")) return GGML_TYPE_F32;
    fprintf(stderr, "unknown type %s\n", s);
    exit(2);
}

static ggml_backend_buffer_type_t repack_buft(void) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) return NULL;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get_extra =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return NULL;
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; b++) {
        if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) return *b;
    }
    return NULL;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s TYPE N K BATCHES [--threads T] [--min-mb MB] [--repeats R] [--repack 0|1] "
                        "[--huge 0|1] [--max-seconds S]\n", argv[0]);
        return 2;
    }
    enum ggml_type type = parse_type(argv[1]);
    const int64_t n = atoll(argv[2]), k = atoll(argv[3]);
    int batches[32], n_batches = 0;
    for (char * tok = strtok(argv[4], ","); tok && n_batches < 32; tok = strtok(NULL, ",")) batches[n_batches++] = atoi(tok);
    int threads = 2, repeats = 7, repack = 1, huge = 1, serve = 0;
    double min_mb = 256, max_seconds = 5;
    for (int i = 5; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-mb")) min_mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--repeats")) repeats = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--repack")) repack = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--huge")) huge = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-seconds")) max_seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--serve")) serve = atoi(argv[i + 1]);
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    if (repeats > 64) repeats = 64;

    ggml_log_set(log_quiet, NULL);
    ggml_backend_t backend = ggml_backend_cpu_init();
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    ggml_backend_cpu_set_n_threads(backend, threads);
    ggml_backend_cpu_set_threadpool(backend, tp);

    const size_t wbytes = ggml_row_size(type, k) * n;
    const int copies = (int) fmax(2, ceil(min_mb * 1048576.0 / wbytes) + 1);

    // weights: `copies` tensors in one buffer (repack buffer type or plain CPU)
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (repack && type == GGML_TYPE_Q4_0) {
        ggml_backend_buffer_type_t rb = repack_buft();
        if (rb) buft = rb;
    }
    struct ggml_init_params wp = { ggml_tensor_overhead() * (copies + 1), NULL, true };
    struct ggml_context * wctx = ggml_init(wp);
    struct ggml_tensor ** w = malloc(sizeof *w * copies);
    for (int c = 0; c < copies; c++) w[c] = ggml_new_tensor_2d(wctx, type, k, n);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    if (!wbuf) { fprintf(stderr, "weight allocation failed\n"); return 1; }
    if (huge) advise_huge(ggml_backend_buffer_get_base(wbuf), ggml_backend_buffer_get_size(wbuf));

    // distinct random contents in every copy (identical copies could be deduplicated by the host, or
    // partly served from cache): random bytes are valid Q4_0 / Q8_0 codes; each block's fp16 scale is then
    // set to a random finite value; f16 / f32 weights are random normal numbers
    void * wq = malloc(wbytes);
    float * tmp = malloc(sizeof(float) * k);
    void * w_first = malloc(wbytes), * w_last = malloc(wbytes);
    const size_t bsize = ggml_type_size(type);
    for (int c = 0; c < copies; c++) {
        if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16) {
            for (int64_t r = 0; r < n; r++) {
                for (int64_t i = 0; i < k; i++) tmp[i] = nrand() * 0.02f;
                if (type == GGML_TYPE_F32) memcpy((char *) wq + r * k * 4, tmp, k * 4);
                else ggml_fp32_to_fp16_row(tmp, (ggml_fp16_t *) wq + r * k, k);
            }
        } else {
            unsigned long long * words = wq;
            for (size_t i = 0; i < wbytes / 8; i++) {
                rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
                words[i] = rng_state;
            }
            for (size_t b = 0; b < wbytes / bsize; b++) {  // block = {ggml_half d; codes}
                ggml_fp16_t d = ggml_fp32_to_fp16((0.5f + frand()) * 0.003f);
                memcpy((char *) wq + b * bsize, &d, sizeof d);
            }
        }
        ggml_backend_tensor_set(w[c], wq, 0, wbytes);
        if (c == 0) memcpy(w_first, wq, wbytes);
        if (c == copies - 1) memcpy(w_last, wq, wbytes);
    }
    const long huge_kb = anon_huge_kb();
    float * wf = malloc(sizeof(float) * n * k);
    for (int bi = 0; bi < n_batches; bi++) {
        const int b = batches[bi];
        const size_t gsize = 2 * (size_t) copies + 16;
        struct ggml_init_params gp = { ggml_tensor_overhead() * (copies + 2) + ggml_graph_overhead_custom(gsize, false), NULL, true };
        struct ggml_context * gctx = ggml_init(gp);
        struct ggml_tensor * x = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, k, b);
        struct ggml_cgraph * graph = ggml_new_graph_custom(gctx, gsize, false);
        struct ggml_tensor ** y = malloc(sizeof *y * copies);
        for (int c = 0; c < copies; c++) {
            y[c] = ggml_mul_mat(gctx, w[c], x);
            ggml_build_forward_expand(graph, y[c]);
        }
        ggml_backend_buffer_t gbuf = ggml_backend_alloc_ctx_tensors(gctx, backend);
        float * xf = malloc(sizeof(float) * k * b);
        for (int64_t i = 0; i < k * b; i++) xf[i] = nrand();
        ggml_backend_tensor_set(x, xf, 0, sizeof(float) * k * b);

        const double start = now_s();
        ggml_backend_graph_compute(backend, graph);  // warm sweep
        double t[64];
        int done = 0;
        // at least 3 timed sweeps (1 if the warm sweep alone took --max-seconds), more until --max-seconds
        if (serve) {
            printf("{\"ready\":%d}\n", b);
            fflush(stdout);
            char cmd[64];
            while (fgets(cmd, sizeof cmd, stdin) && cmd[0] != 'n') {
                if (cmd[0] != 's') { fprintf(stderr, "unknown command %s", cmd); return 2; }
                double t0 = now_s();
                ggml_backend_graph_compute(backend, graph);
                const double sec = (now_s() - t0) / copies;
                if (done < 64) t[done++] = sec;
                printf("{\"sec\":%.9g}\n", sec);
                fflush(stdout);
            }
            if (feof(stdin)) return 0;
            if (done == 0) {  // no sweep asked for: time one, so the row has a time
                double t0 = now_s();
                ggml_backend_graph_compute(backend, graph);
                t[done++] = (now_s() - t0) / copies;
            }
        }
        while (!serve && done < repeats && (done < 1 || (done < 3 && now_s() - start < 2 * max_seconds) ||
                                            now_s() - start < max_seconds)) {
            double t0 = now_s();
            ggml_backend_graph_compute(backend, graph);
            t[done++] = (now_s() - t0) / copies;
        }
        qsort(t, done, sizeof(double), cmp_double);
        const double sec = t[done / 2];

        // check the first and last copy against a double-precision reference
        float * yf = malloc(sizeof(float) * n * b);
        double max_err = 0, max_ref = 0;
        for (int c = 0; c < copies; c += copies - 1) {
            // reference weights as the kernel sees them (dequantized)
            const void * raw = c == 0 ? w_first : w_last;
            if (type == GGML_TYPE_F32) memcpy(wf, raw, wbytes);
            else ggml_get_type_traits(type)->to_float(raw, wf, n * k);
            ggml_backend_tensor_get(y[c], yf, 0, sizeof(float) * n * b);
            for (int j = 0; j < b; j++) {
                for (int64_t i = 0; i < n; i++) {
                    double ref = 0;
                    for (int64_t l = 0; l < k; l++) ref += (double) wf[i * k + l] * xf[j * k + l];
                    max_err = fmax(max_err, fabs(ref - yf[j * n + i]));
                    max_ref = fmax(max_ref, fabs(ref));
                }
            }
        }
        printf("{\"type\":\"%s\",\"repack\":%d,\"n\":%lld,\"k\":%lld,\"batch\":%d,\"threads\":%d,\"copies\":%d,"
               "\"weight_bytes\":%zu,\"repeats\":%d,\"sec\":%.9g,\"gbs\":%.4f,\"rel_err\":%.3g,\"buffer\":\"%s\",\"anon_huge_mb\":%ld}\n",
               argv[1], buft != ggml_backend_cpu_buffer_type(), (long long) n, (long long) k, b, threads, copies,
               wbytes, done, sec, wbytes / sec / 1e9, max_err / (max_ref > 0 ? max_ref : 1), ggml_backend_buft_name(buft),
               huge_kb < 0 ? -1 : huge_kb / 1024);
        fflush(stdout);
        free(yf); free(xf); free(y);
        ggml_backend_buffer_free(gbuf);
        ggml_free(gctx);
    }
    free(wq); free(wf); free(w); free(tmp); free(w_first); free(w_last);
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    ggml_threadpool_free(tp);
    ggml_backend_free(backend);
    return 0;
}
