/* Times hf_to/native.c's to_step on 8 x 2M float32 parameters, without Python (best of 9).
 *
 *   gcc -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math scripts/native_harness.c -o /tmp/harness -lm
 *   /tmp/harness ESTIMATOR ADAM BF16_STATE [NORMALIZE [NESTEROV [STAGGER]]]
 *       # ESTIMATOR: 0 diagonal, 1 rank-one, 2 none, 3 folded; NESTEROV 1: look-ahead weight 0.55
 *       # STAGGER 1: each stream at its own offset within a 4 KiB page (else all at the same
 *       # offset, as PyTorch's page-aligned large tensors are), to time 4K aliasing
 *   /tmp/harness 3 1 0 1 1; /tmp/harness 3 1 1 1 1  # the default form, fp32 and bf16 state
 *   /tmp/harness 0 0 0 0                       # the paper diagonal (no Adam, raw rate)
 *
 * Add -DHF_TO_CONSTANT_ROUNDING_NOISE to replace the stochastic-rounding hash by a constant
 * (what docs/speed.md uses to show that the hash is not what bf16 state costs), and
 * -DHF_TO_PREFETCH=1 (with -DPF_CHUNK=... -DPF_AHEAD=... to tune it) for the software prefetch
 * that hf_to.native compiles in on Zen 5 only.  One thread; every array starts on a page (PyTorch's
 * large CPU tensors do: they are mmap'd), or with STAGGER at its own offset within one.
 */
#include <stdio.h>
#include <time.h>

#include "../hf_to/native.c"

/* Page-aligned plus `offset` bytes (a multiple of 64), zeroed; never freed. */
static void *zalloc_at(size_t bytes, size_t offset) {
    char *p = aligned_alloc(4096, bytes + 4096);
    memset(p, 0, bytes + 4096);
    return p + offset;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s ESTIMATOR ADAM BF16_STATE\n", argv[0]); return 2; }
    int est = atoi(argv[1]), adam = atoi(argv[2]), bf16 = atoi(argv[3]), norm = argc > 4 ? atoi(argv[4]) : 1;
    int nest = argc > 5 ? atoi(argv[5]) : 0, stagger = argc > 6 ? atoi(argv[6]) : 0;
    enum { K = 8 };
    const int64_t n = 2048 * 1024;
    static double scratch[1 << 20];
    static float steps[K];
    to_tensor ts[K];
    const void *grads[K];
    memset(ts, 0, sizeof ts);
    size_t es = bf16 ? 2 : 4;
    for (int t = 0; t < K; ++t) {
        const size_t off = stagger ? 576 : 0; /* stream k at k * off bytes into its page */
        float *w = zalloc_at(n * 4, 0), *g = zalloc_at(n * 4, off);
        for (int64_t i = 0; i < n; ++i) { w[i] = (i % 97) * 0.001f; g[i] = (i % 13) * 0.0001f; }
        steps[t] = 3;
        ts[t] = (to_tensor){.w = w, .g = g, .b = zalloc_at(n * es, 2 * off), .s1 = zalloc_at(n * es, 3 * off),
                            .s2 = zalloc_at(n * es, 4 * off), .v2 = adam ? zalloc_at(n * es, 5 * off) : NULL,
                            .n = n, .ntotal = n, .step = &steps[t], .ww = 1.0};
        grads[t] = g;
    }
    to_config cfg = {.lr = 1e-3, .decay = 1.0, .alpha = 0.1, .beta = 0.1, .beta2 = 0.999, .eps = 1e-8,
                     .floor = 1e-3, .warmup = 1, .adam = adam, .normalize = norm, .diagnostics = 0,
                     .pdtype = F32, .sdtype = bf16 ? BF16 : F32, .estimator = est, .nthreads = 1,
                     .nesterov = nest, .lookahead = 0.55};
    for (int r = 0; r < 3; ++r)
        if (to_step(ts, K, &cfg, scratch, 1 << 20, grads)) { fprintf(stderr, "to_step refused the call\n"); return 1; }
    double best = 1e9;
    for (int r = 0; r < 9; ++r) {
        double t0 = now();
        to_step(ts, K, &cfg, scratch, 1 << 20, grads);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    if (argc > 6) printf("estimator %d adam %d bf16 state %d normalize %d nesterov %d stagger %d: %.2f ms\n", est, adam, bf16, norm, nest, stagger, best * 1e3);
    else if (argc > 5) printf("estimator %d adam %d bf16 state %d normalize %d nesterov %d: %.2f ms\n", est, adam, bf16, norm, nest, best * 1e3);
    else if (argc > 4) printf("estimator %d adam %d bf16 state %d normalize %d: %.2f ms\n", est, adam, bf16, norm, best * 1e3);
    else printf("estimator %d adam %d bf16 state %d: %.2f ms\n", est, adam, bf16, best * 1e3);
    return 0;
}
