/* One-pass CPU kernels of the Trainable Optimizer (hf_to.native builds and loads this file).
 *
 * A step over a param group is ONE call: OpenMP threads share fixed-size blocks of all the
 * group's tensors, and every block streams each array through memory once (read w, g and the
 * k state tensors, write w and the k states: the 2k + 3 streams of an in-place elementwise
 * step).  The math is that of hf_to.optimizer._single_tensor_trainable_to (the readable path),
 * which the tests pin to the paper-literal reference hf_to.reference:
 *
 *   r  = A w + b - g                       (residual of the estimator G(w) = A w + b)
 *   A <- A - alpha_t * dA(r, w)            (diagonal: a -= alpha r w / (w^2 + mean(w^2) + floor);
 *                                           folded: A = 0 and b takes alpha w^2 / (...) r more)
 *   b <- b - beta_t r                      (beta_t: beta / (1 - (1 - beta)^t) with beta_warmup='adam',
 *                                           the default; max(beta, 1/t) with True; beta with False)
 *   G  = A w + b                           (the estimate, after the estimator step)
 *   d  = G, or G + la (g - G)              (nesterov: la = beta_t, one more intercept step on the
 *                                           same g; or a fixed look-ahead weight la)
 *   v2 <- beta2 v2 + (1 - beta2) g^2       (Adam preconditioner, optional)
 *   w <- (1 - lr wd) w - lr d / (sqrt(v2 / (1 - beta2^t)) + eps)
 *
 * Whole-tensor sums that the step needs *before* it writes (w'w for the normalised rate;
 * v'w, u'u, u'b for rank-one) are sums of values the previous step wrote, so the previous
 * step forms them as it writes each block (w'w of the diagonal and folded forms with float32
 * weights and state inside its loop, by lanes; otherwise by a pass over the block just
 * written, still in cache) and the caller
 * carries them to the next step (hf_to.native checks they are still current and calls
 * to_sums otherwise).  Every such sum is formed per block of BLOCK elements, to_sums() by the
 * same code or in the same lane order as the step (block_sums, lanes_shape), and the block
 * sums are added in block order in double: the result does not depend on the thread count,
 * and to_sums() reproduces the carried value bit for bit (so a resumed run continues
 * exactly).  Only rank-one needs
 * a sum of the new gradient (u'g), which costs it a pre-pass over u and g.
 *
 * A tensor's first step (its step count 0) runs here too, by one generic compiled copy of the
 * step (first_block): with intercept_init='gradient' the intercept starts at b_0 = g_0 (zero
 * residual, the slope stays 0, the estimate is g_0); rank-one's v_0 = w_0 / ||w_0|| from the
 * blockwise w'w of to_sums.  So no sum of any step depends on the thread count.
 *
 * Sharded tensors (FSDP2 shards; hf_to.native passes cfg->reduced): the carried sums are the
 * local shard's, to_partials() adds the new gradient's non-finite count (and rank-one's u'g),
 * the caller sums them over the shards (one all-reduce per group) and to_step() runs with the
 * totals, the whole tensor's element count ntotal, and no pre-pass of its own.
 *
 * Non-finite gradients: the diagonal, folded and none estimators leave an entry whose gradient is
 * inf/nan untouched (weight and state keep their bits) in the same pass; rank-one skips the
 * tensor (its pre-pass counts the non-finite entries).
 *
 * Storage types: parameters/gradients float32, bfloat16 (round-to-nearest-even) or float16;
 * state float32 or bfloat16 with stochastic rounding (the hash of hf_to.rounding._round_bf16,
 * so every path draws the same rounding noise).  All arithmetic is float32.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048
/* Rank-one's chunk (elements): its pre-pass and step run chunk by chunk so that u and g of the
 * pre-pass are still in the L2 when the step reads them again (fp32 u and g of 2^17 elements:
 * 1 MiB; 2^17 rather than 2^20 measured to_rank_one 1.70x/1.78x/1.87x fused AdamW instead of
 * 2.00x/1.85x/1.96x on 256 x 62.5 K / 64 x 250 K / SmolLM2-135M fp32 on a 2 MiB-L2 Xeon, and the
 * same 1.90x on 8 x 2 M, where one tensor outgrows any chunk). */
#ifndef CHUNK
#define CHUNK (1 << 17)
#endif
#define TINY 1e-30

enum { F32 = 0, BF16 = 1, F16 = 2 };

/* float16 parameters need the compiler's _Float16 (GCC >= 12, clang >= 15 on x86-64 and
 * arm64); without it the kernel is built for float32/bfloat16 and float16 groups take the
 * PyTorch paths (to_has_float16 tells hf_to.native). */
#if defined(__FLT16_MAX__)
#define HAS_F16 1
typedef _Float16 f16_t;
#else
#define HAS_F16 0
typedef uint16_t f16_t; /* placeholder: never loaded or stored */
#endif
enum { EST_DIAGONAL = 0, EST_RANK_ONE = 1, EST_NONE = 2, EST_FOLDED = 3 };
/* The estimators with a slope-state tensor s1 (none and folded keep only b). */
#define HAS_SLOPE(est) ((est) == EST_DIAGONAL || (est) == EST_RANK_ONE)
/* Per-block partial sums: carried sums first, then the counts and diagnostics. */
enum { S_WW = 0, S_VW, S_UU, S_UB, S_BAD, S_RR, S_GG, S_HH, NSUMS };

typedef struct {
    void *w;             /* parameter, flat and contiguous (pdtype) */
    const void *g;       /* gradient (pdtype) */
    void *b;             /* intercept (sdtype) */
    void *s1;            /* a (diagonal) or u (rank-one) */
    void *s2;            /* v (rank-one) */
    void *v2;            /* exp_avg_sq (Adam) */
    int64_t n;           /* elements (of the local shard, when sharded) */
    int64_t ntotal;      /* elements of the whole tensor (n unless sharded) */
    float *step;         /* the tensor's step count (0-d float32), incremented when it moves */
    double ww, vw, uu, ub; /* in: sums of the current values; out: of the new values */
    double ug;           /* out (rank-one pre-pass) */
    double nbad;         /* out: non-finite gradient entries (in, summed over shards, with cfg->reduced) */
    double rr, gg, hh;   /* out: diagnostics over the finite entries */
} to_tensor;

typedef struct {
    double lr, decay, alpha, beta, beta2, eps, floor;
    double lookahead;    /* the look-ahead weight with nesterov, or < 0 for beta_t */
    int32_t warmup, adam, normalize, diagnostics;
    int32_t pdtype, sdtype, estimator, nthreads;
    int32_t nesterov;    /* step along gh + lookahead (g - gh) instead of gh */
    int32_t init;        /* a tensor's first step starts the intercept at b_0 = g_0 - A_0 w_0 = g_0 */
    int32_t reduced;     /* sharded: ww, vw, uu, ub, ug and nbad come summed over the shards (to_partials) */
} to_config;

/* -- storage conversions ------------------------------------------------------------- */

typedef union { uint32_t u; float f; } bits32;

static inline float from_bf16(uint16_t h) { bits32 x; x.u = (uint32_t)h << 16; return x.f; }

static inline uint16_t to_bf16_rne(float f) {
    bits32 x; x.f = f;
    uint32_t u = x.u + 0x7fffu + ((x.u >> 16) & 1u);
    return (x.u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((x.u >> 16) | 0x40u) : (uint16_t)(u >> 16);
}

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16; x *= 0x45D9F3Bu; x ^= x >> 16; x *= 0x45D9F3Bu; return x ^ (x >> 16);
}

static inline uint32_t seed_of(double step, uint32_t salt) {
    return (uint32_t)((uint64_t)step * 0x9E3779B1ull + (uint64_t)salt * 0x7F4A7C15ull);
}

/* Stochastic rounding: add 16 random bits to the pattern, truncate (E[result] = f). */
static inline uint16_t to_bf16_sr(float f, uint32_t i, uint32_t seed) {
    bits32 x; x.f = f;
#ifdef HF_TO_CONSTANT_ROUNDING_NOISE /* a benchmark switch (scripts/native_harness.c), never set by hf_to */
    (void)i; (void)seed;
    return (uint16_t)((x.u + 0x8000u) >> 16);
#else
    return (uint16_t)((x.u + (hash32(i + seed) & 0xffffu)) >> 16);
#endif
}

static inline float load(const void *p, int64_t i, const int dt) {
    if (dt == BF16) return from_bf16(((const uint16_t *)p)[i]);
#if HAS_F16
    if (dt == F16) return (float)((const f16_t *)p)[i];
#endif
    return ((const float *)p)[i];
}

/* Parameters: round-to-nearest-even; returns the value as stored (for the carried sums).
 * Where !ok the old bits stay. */
static inline float store_param(void *p, int64_t i, float x, int ok, const int dt) {
    if (dt == BF16) {
        uint16_t *q = (uint16_t *)p; uint16_t old = q[i], nw = to_bf16_rne(x);
        uint16_t s = ok ? nw : old; q[i] = s; return from_bf16(s);
    }
#if HAS_F16
    if (dt == F16) {
        f16_t *q = (f16_t *)p; f16_t s = ok ? (f16_t)x : q[i]; q[i] = s; return (float)s;
    }
#endif
    float *q = (float *)p; float s = ok ? x : q[i]; q[i] = s; return s;
}

/* State: float32, or bfloat16 with stochastic rounding (salt tells the state tensors apart). */
static inline float store_state(void *p, int64_t i, float x, int ok, const int dt, uint32_t seed) {
    if (dt == BF16) {
        uint16_t *q = (uint16_t *)p; uint16_t s = ok ? to_bf16_sr(x, (uint32_t)i, seed) : q[i];
        q[i] = s; return from_bf16(s);
    }
    float *q = (float *)p; float s = ok ? x : q[i]; q[i] = s; return s;
}

/* Software prefetch of the step's streams (hf_to.native's step loop; see step_block), on the
 * hosts where it was measured to pay: built with -DHF_TO_PREFETCH=1 (hf_to.native passes it on
 * AMD family 1Ah, Zen 5).  There a single thread kept too few cache misses in flight for the
 * 5-11 streams of a step (the hardware prefetchers alone: half the memory bandwidth that fused
 * AdamW reaches); prefetching PF_AHEAD elements ahead, PF_CHUNK elements at a time, brought the
 * float32 forms to the bandwidth bound (larger chunks or distances were slower: the prefetched
 * lines of 5+ streams then compete for the L1).  On a Zen 4 host the chunked loop cost a
 * quarter of the step instead (docs/speed.md), so elsewhere a block is one loop, unprefetched.
 * A prefetch is a hint, never a load: it cannot fault or change a result, and prefetch_range
 * stays inside the tensor. */
#ifndef HF_TO_PREFETCH
#define HF_TO_PREFETCH 0
#endif
#ifndef PF_CHUNK
#define PF_CHUNK (HF_TO_PREFETCH ? 128 : BLOCK)
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 512
#endif
static inline void prefetch_range(const void *p, int64_t i0, int64_t i1, const int dt, const int write) {
    const int64_t size = dt == F32 ? 4 : 2, stride = 64 / size; /* one prefetch per 64-byte line */
    const char *q = (const char *)p;
    for (int64_t i = i0; i < i1; i += stride) {
        if (write) __builtin_prefetch(q + i * size, 1, 3);
        else __builtin_prefetch(q + i * size, 0, 3);
    }
}

static inline int is_finite(float g) { return fabsf(g) <= FLT_MAX; }

/* -- blocks of a group ------------------------------------------------------------------ */

typedef struct {
    int64_t *first;   /* first block of each tensor, and the total at [k] */
    double *part;     /* NSUMS partial sums per block */
    int own;          /* part was allocated here */
} layout;

/* part: the caller's scratch of cap doubles when large enough (a buffer kept between calls
 * saves page faults), else allocated here. */
static int layout_init(layout *L, const to_tensor *ts, int64_t k, double *scratch, int64_t cap) {
    if (cap < 0) cap = 0;
    L->first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k + 1));
    if (!L->first) return -1;
    L->first[0] = 0;
    for (int64_t t = 0; t < k; ++t) L->first[t + 1] = L->first[t] + (ts[t].n + BLOCK - 1) / BLOCK;
    L->own = L->first[k] * NSUMS > cap;
    L->part = L->own ? (double *)malloc(sizeof(double) * (size_t)(L->first[k] * NSUMS + 1)) : scratch;
    if (!L->part) { free(L->first); return -1; }
    return 0;
}

/* hf_to.native checks every tensor before a call; this is the last line of defence against
 * a descriptor that would send a loop through a null pointer (or a negative count). */
static int descriptors_ok(const to_tensor *ts, int64_t k, const to_config *cfg, int with_grads) {
    for (int64_t t = 0; t < k; ++t) {
        const to_tensor *T = &ts[t];
        if (T->n < 0 || T->ntotal < T->n || !T->step || (uint32_t)cfg->estimator > EST_FOLDED) return 0;
        if (T->n > 0 && (!T->w || !T->b || (with_grads && !T->g) || (HAS_SLOPE(cfg->estimator) && !T->s1) ||
                         (cfg->estimator == EST_RANK_ONE && !T->s2) || (cfg->adam && !T->v2)))
            return 0;
    }
    return 1;
}

static void layout_free(layout *L) {
    free(L->first);
    if (L->own) free(L->part);
}

static inline int64_t tensor_of(const layout *L, int64_t k, int64_t blk) {
    int64_t lo = 0, hi = k - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (L->first[mid] <= blk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static double total(const layout *L, int64_t t, int s) {
    double acc = 0.0;
    for (int64_t j = L->first[t]; j < L->first[t + 1]; ++j) acc += L->part[j * NSUMS + s];
    return acc;
}

/* -- carried sums from the current values ----------------------------------------------- */

#if HAS_F16
#define F16_CASES(CALL)                                                                       \
    case F16 * 2 + F32: CALL(F16, F32); break;                                                \
    case F16 * 2 + BF16: CALL(F16, BF16); break;
#else
#define F16_CASES(CALL)
#endif
#define DISPATCH_TYPES(CALL)                                                                  \
    switch (cfg->pdtype * 2 + cfg->sdtype) {                                                  \
    case F32 * 2 + F32: CALL(F32, F32); break;                                                \
    case F32 * 2 + BF16: CALL(F32, BF16); break;                                              \
    case BF16 * 2 + F32: CALL(BF16, F32); break;                                              \
    case BF16 * 2 + BF16: CALL(BF16, BF16); break;                                            \
    F16_CASES(CALL)                                                                           \
    default: rc = -2;                                                                         \
    }

/* Lanes (the lanes loop of step_block, and block_sums for the same variants): element lo + k
 * of a block adds to lane k % LANES of its sum, and lanes_total adds the lanes in a fixed
 * tree.  The step loop (w'w of the weights it stores) and to_sums (w'w of the weights as they
 * are) use this same order, so a recomputed sum equals the carried one bit for bit whatever
 * vector width the compiler picked for either loop. */
#define LANES 16
typedef float lanes_v __attribute__((vector_size(LANES * sizeof(float))));
_Static_assert(PF_CHUNK % LANES == 0, "a prefetch chunk must hold whole lanes");
static inline float lanes_total(const lanes_v acc) {
    float a[LANES];
    memcpy(a, &acc, sizeof a);
    for (int h = LANES / 2; h > 0; h /= 2)
        for (int j = 0; j < h; ++j) a[j] += a[j + h];
    return a[0];
}

/* acc += q, lane by lane (memcpy: a float array read as a vector without breaking aliasing
 * rules).  The callers zero only the lanes a short group leaves: zeroing q for every group cost
 * more than the sums.  (Zeroing them in here instead, with the group's length as an argument,
 * measured the diagonal form's step 7 % slower in the harness: GCC's code for the caller's loop
 * changed.) */
static inline void lanes_add(lanes_v *acc, const float q[LANES]) {
    lanes_v x;
    memcpy(&x, q, sizeof x);
    *acc += x;
}

/* Whether a form carries whole-tensor sums from one step to the next (w'w for the normalised
 * rate; rank-one's four). */
static inline int carries_sums(const int est, const int norm) {
    return est == EST_RANK_ONE || ((est == EST_DIAGONAL || est == EST_FOLDED) && norm);
}

/* Which block loop a step variant runs (step_block): the lanes loop where the step carries w'w
 * alone (the normalised diagonal and folded forms) with float32 weights and state; the flat
 * loop otherwise.  block_sums forms w'w in the same order as the variant's step, so to_sums
 * reproduces the carried sum bit for bit. */
static inline int lanes_shape(const int pt, const int st, const int est, const int norm) {
    return pt == F32 && st == F32 && est != EST_RANK_ONE && carries_sums(est, norm);
}

__attribute__((always_inline)) static inline void sums_block(const to_tensor *T, int64_t lo, int64_t hi, double *out,
                                                             const int pt, const int st, const int est, const int norm) {
    const void *const W = T->w, *const B = T->b, *const U = T->s1, *const V = T->s2;
    out[S_VW] = out[S_UU] = out[S_UB] = 0.0;
    if (lanes_shape(pt, st, est, norm)) {
        /* each group of LANES weights through a small array q into the vector accumulator,
         * as in step_lanes (q is not zeroed but for the lanes a short group leaves) */
        lanes_v acc = {0};
        float q[LANES] __attribute__((aligned(64)));
        for (int64_t l0 = lo; l0 < hi; l0 += LANES) {
            const int m = hi - l0 < LANES ? (int)(hi - l0) : LANES;
#pragma omp simd
            for (int j = 0; j < m; ++j) { float w = ((const float *)W)[l0 + j]; q[j] = w * w; }
            for (int j = m; j < LANES; ++j) q[j] = 0.0f;
            lanes_add(&acc, q);
        }
        out[S_WW] = lanes_total(acc);
    } else if (est != EST_RANK_ONE) {
        float ww = 0.0f;
#pragma omp simd reduction(+ : ww)
        for (int64_t i = lo; i < hi; ++i) { float w = load(W, i, pt); ww += w * w; }
        out[S_WW] = ww;
    } else {
        float ww = 0.0f, vw = 0.0f, uu = 0.0f, ub = 0.0f;
#pragma omp simd reduction(+ : ww, vw, uu, ub)
        for (int64_t i = lo; i < hi; ++i) {
            float w = load(W, i, pt), u = load(U, i, st);
            ww += w * w;
            vw += load(V, i, st) * w;
            uu += u * u;
            ub += u * load(B, i, st);
        }
        out[S_WW] = ww; out[S_VW] = vw; out[S_UU] = uu; out[S_UB] = ub;
    }
}

/* One compiled copy of the block sums for both callers, to_step and to_sums (and kept out
 * of the step loop's function: inlined there, it slowed the step down threefold). */
__attribute__((noinline)) static int block_sums(const to_tensor *T, int64_t lo, int64_t hi, double *out,
                                                const to_config *cfg) {
    int rc = 0;
#define SB(PT, ST) sums_block(T, lo, hi, out, PT, ST, cfg->estimator, cfg->normalize)
    DISPATCH_TYPES(SB)
#undef SB
    return rc;
}

/* Recompute the carried sums (w'w; rank-one also v'w, u'u, u'b) of every tensor. */
int to_sums(to_tensor *ts, int64_t k, const to_config *cfg, double *scratch, int64_t cap) {
    layout L;
    int rc = 0;
    if (k <= 0) return 0;
    if (!descriptors_ok(ts, k, cfg, 0)) return -3;
    if (layout_init(&L, ts, k, scratch, cap)) return -1;
    int64_t nblocks = L.first[k];
#pragma omp parallel for schedule(static) num_threads(cfg->nthreads) reduction(| : rc)
    for (int64_t j = 0; j < nblocks; ++j) {
        int64_t t = tensor_of(&L, k, j), lo = (j - L.first[t]) * BLOCK;
        int64_t hi = lo + BLOCK < ts[t].n ? lo + BLOCK : ts[t].n;
        rc |= block_sums(&ts[t], lo, hi, &L.part[j * NSUMS], cfg);
    }
    for (int64_t t = 0; t < k && rc == 0; ++t) {
        ts[t].ww = total(&L, t, S_WW);
        ts[t].vw = total(&L, t, S_VW);
        ts[t].uu = total(&L, t, S_UU);
        ts[t].ub = total(&L, t, S_UB);
    }
    layout_free(&L);
    return rc;
}

/* -- the step ------------------------------------------------------------------------------ */

typedef struct {  /* per-tensor scalars of one step, float32 as in the readable path */
    float beta, la, bc2, c, cu, cv, vw, vwn;  /* la: the look-ahead weight */
    int first;         /* the tensor's first step (its step count is 0) */
    float norm, unit;  /* rank-one's first step: v_0 = w_0 / norm, or unit where norm = 0 */
    uint32_t seed_b, seed_1, seed_2, seed_v2;
} scalars;

/* The step's constants, copied out of the descriptor, the config and the scalars once per
 * block: stores through the data pointers cannot then alias them (with the loads inside the
 * loop, GCC reloaded them at every element). */
typedef struct {
    float lr, decay, alpha, beta2, eps, beta, la, bc2, one_minus_beta2;
    float c, cu, cv, vw, vwn, vnorm, vunit;
    uint32_t seed_b, seed_1, seed_2, seed_v2;
    void *W, *B, *S1, *S2, *V2;
    const void *G;
    int init;
} step_consts;

static inline step_consts consts_of(const to_tensor *T, const scalars *S, const to_config *cfg, const int first) {
    step_consts K = {
        .lr = (float)cfg->lr, .decay = (float)cfg->decay, .alpha = (float)cfg->alpha, .beta2 = (float)cfg->beta2,
        .eps = (float)cfg->eps, .beta = S->beta, .la = S->la, .bc2 = S->bc2,
        /* 1 - beta2 in double, then rounded: the readable path's addcmul value (1 - 0.999f in
         * float is 1.3e-5 away from 0.001f, which moves v near the overflow of v / bc2). */
        .one_minus_beta2 = (float)(1.0 - cfg->beta2),
        .c = S->c, .cu = S->cu, .cv = S->cv, .vw = S->vw, .vwn = S->vwn, .vnorm = S->norm, .vunit = S->unit,
        .seed_b = S->seed_b, .seed_1 = S->seed_1, .seed_2 = S->seed_2, .seed_v2 = S->seed_v2,
        .W = T->w, .B = T->b, .S1 = T->s1, .S2 = T->s2, .V2 = T->v2, .G = T->g, .init = first && cfg->init};
    return K;
}

/* What one element's step leaves for the block's sums. */
typedef struct { float ws, r, g, gh, ok; } elem;

/* Element i's step (the math of the header comment); ws is the weight as stored. */
__attribute__((always_inline)) static inline elem step_elem(const step_consts *K, const int64_t i, const int pt,
                                                            const int st, const int est, const int nest,
                                                            const int adam, const int norm, const int first) {
    float w = load(K->W, i, pt), g0 = load(K->G, i, pt);
    /* rank-one runs only on all-finite gradients (its pre-pass counted them) */
    int ok = est == EST_RANK_ONE ? 1 : is_finite(g0);
    float g = ok ? g0 : 0.0f, b = load(K->B, i, st), r, gh, bn;
    /* rank-one's first step sets v_0 = w_0 / ||w_0|| (the readable path's RankOneEstimator.step) */
    float v = est != EST_RANK_ONE ? 0.0f : !first ? load(K->S2, i, st) : K->vnorm > 0.0f ? w / K->vnorm : K->vunit;
    if (K->init) {
        /* b_0 = g_0: the residual is 0, the slope stays, and the estimate is g_0 */
        r = 0.0f;
        bn = g;
        gh = g;
        if (est == EST_RANK_ONE) store_state(K->S2, i, v, ok, st, K->seed_2);
    } else if (est == EST_DIAGONAL) {
        float a = load(K->S1, i, st);
        r = (b - g) + a * w;
        float an = norm ? a - K->alpha * r * w / (w * w + K->c) : a - K->alpha * (r * w);
        bn = b - K->beta * r;
        store_state(K->S1, i, an, ok, st, K->seed_1);
        gh = bn + an * w;
    } else if (est == EST_RANK_ONE) {
        float u = load(K->S1, i, st);
        r = (b - g) + u * K->vw;
        float un = u - r * K->cu;
        store_state(K->S1, i, un, ok, st, K->seed_1);
        store_state(K->S2, i, v - w * K->cv, ok, st, K->seed_2);
        bn = b - K->beta * r;
        gh = bn + un * K->vwn;
    } else if (est == EST_FOLDED) {
        /* the diagonal's slope step at unmoved weights, as a per-coordinate intercept rate */
        r = b - g;
        float rate = norm ? K->beta + K->alpha * (w * w) / (w * w + K->c) : K->beta + K->alpha * (w * w);
        bn = b - rate * r;
        gh = bn;
    } else {
        r = b - g;
        bn = b - K->beta * r;
        gh = bn;
    }
    store_state(K->B, i, bn, ok, st, K->seed_b);
    /* Nesterov: one more intercept step on the same gradient, or a fixed weight (the readable path's add_) */
    float d = nest ? gh + K->la * (g - gh) : gh;
    if (adam) {
        float v2 = load(K->V2, i, st);
        /* (1 - beta2) g, then times g, as the readable path: g*g alone overflows for |g| > 1.8e19 */
        float v2n = v2 * K->beta2 + (K->one_minus_beta2 * g) * g;
        store_state(K->V2, i, v2n, ok, st, K->seed_v2);
        d = d / (sqrtf(v2n / K->bc2) + K->eps);
    }
    elem e = {store_param(K->W, i, w * K->decay - K->lr * d, ok, pt), r, g, gh, ok ? 1.0f : 0.0f};
    return e;
}

/* Elements l0 .. l0 + m - 1 (m <= LANES), element l0 + j adding to lane j of each sum in acc:
 * w'w of the weights as stored (what to_sums reads), and the health sums. */
__attribute__((always_inline)) static inline void step_lanes(const step_consts *K, const int64_t l0, const int m,
                                                             lanes_v acc[NSUMS], const int pt, const int st,
                                                             const int est, const int nest, const int adam,
                                                             const int norm, const int first) {
    float q[NSUMS][LANES] __attribute__((aligned(64)));  /* q[S_VW .. S_UB] unused */
#pragma omp simd
    for (int j = 0; j < m; ++j) {
        const elem e = step_elem(K, l0 + j, pt, st, est, nest, adam, norm, first);
        q[S_WW][j] = e.ws * e.ws;
        q[S_BAD][j] = 1.0f - e.ok;
        q[S_RR][j] = e.ok != 0.0f ? e.r * e.r : 0.0f;
        q[S_GG][j] = e.g * e.g;
        q[S_HH][j] = e.ok != 0.0f ? e.gh * e.gh : 0.0f;
    }
    for (int s = 0; s < NSUMS; ++s) {
        if (s != S_WW && s < S_BAD) continue;
        for (int j = m; j < LANES; ++j) q[s][j] = 0.0f;  /* a short group's other lanes */
        lanes_add(&acc[s], q[s]);
    }
}

/* A block's last short group (fewer than LANES elements: only a tensor's last block has one),
 * once per tensor: one compiled copy with the flags as run-time values, as first_block (a copy
 * per variant made the build a seventh longer). */
__attribute__((noinline)) static void tail_lanes(const to_tensor *T, const scalars *S, const to_config *cfg,
                                                 const int64_t l0, const int m, lanes_v acc[NSUMS], const int first) {
    const step_consts K = consts_of(T, S, cfg, first);
    step_lanes(&K, l0, m, acc, cfg->pdtype, cfg->sdtype, cfg->estimator, cfg->nesterov, cfg->adam, cfg->normalize,
               first);
}

/* The step of the block's elements lo .. hi - 1, and its sums in out.  Two loop shapes, chosen
 * at compile time by lanes_shape (every flag here is a compile-time constant: with a run-time
 * flag inside the loop, GCC kept a scalar copy of it and ran that):
 *   - the normalised diagonal and folded forms (the default) with float32 weights and state:
 *     groups of LANES elements (step_lanes) whose sums go to vector accumulators lane by lane,
 *     w'w among them, from the weights as stored, in the order to_sums reproduces bit for bit.
 *     The pass over the block's weights after the loop that this replaces cost the default
 *     about a seventh of its step (docs/speed.md);
 *   - everything else: one flat loop with the health sums as its reductions, and the carried
 *     sums, where the form has them, after it by the code to_sums runs (block_sums, on the
 *     values just stored, still in cache).  With 16-bit weights or state the lanes loop
 *     measured up to 1.8x slower (a group of 16 is short for GCC's 16-bit vectors); rank-one
 *     needs four sums of three new tensors; the forms without sums gain nothing from it.
 * Health sums are float: double accumulators halve the loop's speed. */
__attribute__((always_inline)) static inline void step_block(const to_tensor *T, const scalars *S, const to_config *cfg, int64_t lo,
                              int64_t hi, double *out, const int pt, const int st, const int est,
                              const int nest, const int adam, const int norm, const int first) {
    const step_consts K = consts_of(T, S, cfg, first);
    const int in_loop = lanes_shape(pt, st, est, norm);
    lanes_v acc[NSUMS] = {0};
    float bad = 0.0f, rr = 0.0f, gg = 0.0f, hh = 0.0f;
    const int64_t n = T->n;
    /* With HF_TO_PREFETCH (Zen 5) the block in chunks of PF_CHUNK elements, each first
     * prefetching the chunk PF_AHEAD elements on (within the tensor: into the next block too);
     * elsewhere PF_CHUNK is the block.  PF_CHUNK is a multiple of LANES, so element i adds to
     * lane (i - lo) % LANES either way: the same values and w'w, bit for bit. */
    for (int64_t c0 = lo; c0 < hi; c0 += PF_CHUNK) {
        const int64_t c1 = c0 + PF_CHUNK < hi ? c0 + PF_CHUNK : hi;
        if (HF_TO_PREFETCH) {
            const int64_t p0 = c0 + PF_AHEAD, p1 = c1 + PF_AHEAD < n ? c1 + PF_AHEAD : n;
            prefetch_range(K.G, p0, p1, pt, 0);
            prefetch_range(K.W, p0, p1, pt, 1);
            prefetch_range(K.B, p0, p1, st, 1);
            if (HAS_SLOPE(est)) prefetch_range(K.S1, p0, p1, st, 1);
            if (est == EST_RANK_ONE) prefetch_range(K.S2, p0, p1, st, 1);
            if (adam) prefetch_range(K.V2, p0, p1, st, 1);
        }
        if (in_loop) {
            int64_t l0 = c0;
            for (; l0 + LANES <= c1; l0 += LANES) step_lanes(&K, l0, LANES, acc, pt, st, est, nest, adam, norm, first);
            if (l0 < c1) tail_lanes(T, S, cfg, l0, (int)(c1 - l0), acc, first);
        } else {
#pragma omp simd reduction(+ : bad, rr, gg, hh)
            for (int64_t i = c0; i < c1; ++i) {
                const elem e = step_elem(&K, i, pt, st, est, nest, adam, norm, first);
                bad += 1.0f - e.ok;
                rr += e.ok != 0.0f ? e.r * e.r : 0.0f;
                gg += e.g * e.g;
                hh += e.ok != 0.0f ? e.gh * e.gh : 0.0f;
            }
        }
    }
    if (in_loop) {
        out[S_WW] = lanes_total(acc[S_WW]);
        out[S_VW] = out[S_UU] = out[S_UB] = 0.0;
        out[S_BAD] = lanes_total(acc[S_BAD]);
        out[S_RR] = lanes_total(acc[S_RR]);
        out[S_GG] = lanes_total(acc[S_GG]);
        out[S_HH] = lanes_total(acc[S_HH]);
    } else {
        if (carries_sums(est, norm)) block_sums(T, lo, hi, out, cfg);
        else out[S_WW] = out[S_VW] = out[S_UU] = out[S_UB] = 0.0;  /* w'w is not used */
        out[S_BAD] = bad; out[S_RR] = rr; out[S_GG] = gg; out[S_HH] = hh;
    }
}

/* Rank-one pre-pass: u'g of the new gradient, and whether it is finite: u*g is inf or NaN
 * wherever g is (0*inf is NaN), so the sum is non-finite exactly when an entry is (barring
 * an overflow of u'g itself, which would skip the tensor).  No masks in the loop: with them
 * GCC kept the accumulator on the stack or gave up vectorising. */
__attribute__((always_inline)) static inline void pre_block(const to_tensor *T, int64_t lo, int64_t hi, double *out,
                                                            const int pt, const int st) {
    float ug = 0.0f;
    const void *const G = T->g, *const U = T->s1;
#pragma omp simd reduction(+ : ug)
    for (int64_t i = lo; i < hi; ++i) ug += load(U, i, st) * load(G, i, pt);
    out[S_UU] = ug;
    out[S_BAD] = isfinite(ug) ? 0.0 : 1.0;
}

static void prepare(const to_tensor *T, const to_config *cfg, scalars *S) {
    double t = (double)*T->step + 1.0, n = (double)T->ntotal;
    /* beta_warmup: 1 running mean, max(beta, 1/t); 2 Adam's bias correction as a rate,
       beta / (1 - (1 - beta)^t) (the readable path's formula, same libm calls); 0 constant. */
    double beta = cfg->warmup == 2   ? (cfg->beta < 1.0 ? cfg->beta / -expm1(t * log1p(-cfg->beta)) : 1.0)
                  : cfg->warmup == 1 ? fmax(cfg->beta, 1.0 / t)
                                     : cfg->beta;
    S->beta = (float)beta;
    S->la = cfg->lookahead < 0.0 ? S->beta : (float)cfg->lookahead;
    S->bc2 = (float)(1.0 - pow(cfg->beta2, t));
    S->c = (float)(T->ww / n + cfg->floor + TINY);
    S->first = *T->step == 0.0f;
    if (cfg->estimator == EST_RANK_ONE) {
        float vw = (float)T->vw, uu = (float)T->uu, ww = (float)T->ww;
        if (S->first) { /* v_0 = w_0 / ||w_0||, so v_0'w_0 = ||w_0|| */
            S->norm = sqrtf(ww);
            S->unit = (float)pow(fmax(n, 1.0), -0.5);
            vw = S->norm;
        }
        float ur = uu * vw + (float)T->ub - (float)T->ug;
        float rate = cfg->normalize ? (float)cfg->alpha / (vw * vw + uu * ww + (float)(n * cfg->floor + TINY))
                                    : (float)cfg->alpha;
        S->vw = vw; S->cu = rate * vw; S->cv = rate * ur; S->vwn = vw - rate * ur * ww;
    }
    S->seed_b = seed_of(*T->step, 1);
    S->seed_1 = seed_of(*T->step, cfg->estimator == EST_RANK_ONE ? 3 : 2);
    S->seed_2 = seed_of(*T->step, 4);
    S->seed_v2 = seed_of(*T->step, 5);
}

/* A tensor's first step, once per tensor: one compiled copy with the flags as run-time values
 * (the step loop's variants stay free of the first step's branches). */
__attribute__((noinline)) static void first_block(const to_tensor *T, const scalars *S, const to_config *cfg,
                                                  int64_t lo, int64_t hi, double *out) {
    step_block(T, S, cfg, lo, hi, out, cfg->pdtype, cfg->sdtype, cfg->estimator, cfg->nesterov, cfg->adam,
               cfg->normalize, 1);
}

#define STEP_CASE(PT, ST, EST, NEST, ADAM, NORM)                                              \
    case EST * 8 + NEST * 4 + ADAM * 2 + NORM:                                                \
        step_block(&ts[t], &S[t], cfg, lo, hi, out, PT, ST, EST, NEST, ADAM, NORM, 0);        \
        break;
#define STEP_CASES(PT, ST, EST)                                                               \
    STEP_CASE(PT, ST, EST, 0, 0, 0) STEP_CASE(PT, ST, EST, 0, 0, 1)                            \
    STEP_CASE(PT, ST, EST, 0, 1, 0) STEP_CASE(PT, ST, EST, 0, 1, 1)                            \
    STEP_CASE(PT, ST, EST, 1, 0, 0) STEP_CASE(PT, ST, EST, 1, 0, 1)                            \
    STEP_CASE(PT, ST, EST, 1, 1, 0) STEP_CASE(PT, ST, EST, 1, 1, 1)

/* Sharded tensors: per block, the non-finite gradient entries (an exact count) and rank-one's
 * u'g, the sums of the new gradient that the caller adds over the shards with the carried
 * ones before the step (one all-reduce for the group). */
__attribute__((always_inline)) static inline void partial_block(const to_tensor *T, int64_t lo, int64_t hi, double *out,
                                                                const int pt, const int st, const int est) {
    float ug = 0.0f, bad = 0.0f;
    const void *const G = T->g, *const U = T->s1;
    if (est == EST_RANK_ONE) {
#pragma omp simd reduction(+ : ug, bad)
        for (int64_t i = lo; i < hi; ++i) {
            float g = load(G, i, pt);
            ug += load(U, i, st) * g;
            bad += is_finite(g) ? 0.0f : 1.0f;
        }
    } else {
        /* g*0 is 0 where g is finite and NaN where not: a sum without compares that runs at the
         * memory's speed; only a block with a non-finite entry is counted exactly (rare). */
        float z = 0.0f;
        prefetch_range(G, lo + BLOCK, lo + 2 * BLOCK < T->n ? lo + 2 * BLOCK : T->n, pt, 0);
#pragma omp simd reduction(+ : z)
        for (int64_t i = lo; i < hi; ++i) z += load(G, i, pt) * 0.0f;
        if (z != 0.0f)
            for (int64_t i = lo; i < hi; ++i) bad += is_finite(load(G, i, pt)) ? 0.0f : 1.0f;
    }
    out[S_UU] = ug;
    out[S_BAD] = bad;
}

int to_partials(to_tensor *ts, int64_t k, const to_config *cfg, double *scratch, int64_t cap,
                const void *const *grads) {
    layout L;
    int rc = 0;
    if (k <= 0) return 0;
    for (int64_t t = 0; t < k; ++t) ts[t].g = grads[t];
    if (!descriptors_ok(ts, k, cfg, 1)) return -3;
    if (layout_init(&L, ts, k, scratch, cap)) return -1;
    const int64_t nblocks = L.first[k];
#define PARTIAL(PT, ST)                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(cfg->nthreads)")                    \
    for (int64_t j = 0; j < nblocks; ++j) {                                                   \
        int64_t t = tensor_of(&L, k, j), lo = (j - L.first[t]) * BLOCK;                      \
        int64_t hi = lo + BLOCK < ts[t].n ? lo + BLOCK : ts[t].n;                              \
        partial_block(&ts[t], lo, hi, &L.part[j * NSUMS], PT, ST, cfg->estimator);            \
    }
    DISPATCH_TYPES(PARTIAL)
#undef PARTIAL
    for (int64_t t = 0; t < k && rc == 0; ++t) {
        ts[t].ug = total(&L, t, S_UU);
        ts[t].nbad = total(&L, t, S_BAD);
    }
    layout_free(&L);
    return rc;
}

/* One step of every tensor, grads[t] the gradient of ts[t] (a tensor whose step count is 0 takes its first step).  A rank-one tensor with a
 * non-finite gradient entry is left alone (nbad > 0 and its sums unchanged). */
int to_step(to_tensor *ts, int64_t k, const to_config *cfg, double *scratch, int64_t cap, const void *const *grads) {
    layout L;
    int rc = 0;
    const int est = cfg->estimator;
    if (k <= 0) return 0;
    /* Flags select the compiled variant: anything but 0/1 would match none of them. */
    if ((uint32_t)cfg->nesterov > 1u || (uint32_t)cfg->adam > 1u || (uint32_t)cfg->normalize > 1u ||
        (uint32_t)cfg->init > 1u || (uint32_t)cfg->reduced > 1u)
        return -3;
    const int pre = est == EST_RANK_ONE && !cfg->reduced; /* else u'g and the count come from to_partials */
    /* The gradients are new tensors at most steps: their pointers come as one array. */
    for (int64_t t = 0; t < k; ++t) ts[t].g = grads[t];
    if (!descriptors_ok(ts, k, cfg, 1)) return -3;
    if (layout_init(&L, ts, k, scratch, cap)) return -1;
    scalars *S = (scalars *)calloc((size_t)k, sizeof(scalars));
    char *run = (char *)malloc((size_t)k);
    if (!S || !run) { free(S); free(run); layout_free(&L); return -1; }
    memset(run, 1, (size_t)k);
    if (est == EST_RANK_ONE && cfg->reduced)
        for (int64_t t = 0; t < k; ++t) run[t] = ts[t].nbad == 0.0;
    /* Rank-one reads u and g twice (the pre-pass for u'g, then the step): chunks of about
     * CHUNK elements keep them in cache between the two.  The other estimators: one chunk. */
    for (int64_t t0 = 0, t1; t0 < k && rc == 0; t0 = t1) {
        t1 = t0 + 1;
        if (!pre) t1 = k;
        else while (t1 < k && (L.first[t1 + 1] - L.first[t0]) * BLOCK <= CHUNK) ++t1;
        const int64_t jlo = L.first[t0], jhi = L.first[t1];
        if (pre) {
#define PRE(PT, ST)                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(cfg->nthreads)")                    \
    for (int64_t j = jlo; j < jhi; ++j) {                                                     \
        int64_t t = tensor_of(&L, k, j), lo = (j - L.first[t]) * BLOCK;                      \
        int64_t hi = lo + BLOCK < ts[t].n ? lo + BLOCK : ts[t].n;                              \
        pre_block(&ts[t], lo, hi, &L.part[j * NSUMS], PT, ST);                                \
    }
            DISPATCH_TYPES(PRE)
#undef PRE
            for (int64_t t = t0; t < t1; ++t) {
                ts[t].ug = total(&L, t, S_UU);
                ts[t].nbad = total(&L, t, S_BAD);
                run[t] = ts[t].nbad == 0.0;
            }
        }
        for (int64_t t = t0; t < t1; ++t) prepare(&ts[t], cfg, &S[t]);
#define STEP(PT, ST)                                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(cfg->nthreads)")                    \
    for (int64_t j = jlo; j < jhi; ++j) {                                                     \
        int64_t t = tensor_of(&L, k, j), lo = (j - L.first[t]) * BLOCK;                      \
        int64_t hi = lo + BLOCK < ts[t].n ? lo + BLOCK : ts[t].n;                              \
        if (!run[t]) continue;                                                                \
        double *out = &L.part[j * NSUMS];                                                     \
        if (S[t].first) { first_block(&ts[t], &S[t], cfg, lo, hi, out); continue; }           \
        switch (est * 8 + cfg->nesterov * 4 + cfg->adam * 2 + cfg->normalize) {               \
        STEP_CASES(PT, ST, EST_DIAGONAL)                                                      \
        STEP_CASES(PT, ST, EST_RANK_ONE)                                                      \
        STEP_CASES(PT, ST, EST_NONE)                                                          \
        STEP_CASES(PT, ST, EST_FOLDED)                                                        \
        }                                                                                     \
    }
        DISPATCH_TYPES(STEP)
#undef STEP
    }
    for (int64_t t = 0; t < k && rc == 0; ++t) {
        if (!run[t]) continue;
        ts[t].ww = total(&L, t, S_WW);
        if (est == EST_RANK_ONE) {
            ts[t].vw = total(&L, t, S_VW);
            ts[t].uu = total(&L, t, S_UU);
            ts[t].ub = total(&L, t, S_UB);
        } else if (!cfg->reduced) {
            ts[t].nbad = total(&L, t, S_BAD);
        }
        /* Every entry non-finite: nothing moved, the step count stays. */
        if (ts[t].nbad == 0.0 || ts[t].nbad < (double)ts[t].ntotal) *ts[t].step += 1.0f;
        ts[t].rr = total(&L, t, S_RR);
        ts[t].gg = total(&L, t, S_GG);
        ts[t].hh = total(&L, t, S_HH);
    }
    free(S); free(run); layout_free(&L);
    return rc;
}

int to_abi_version(void) { return 9; }
int to_has_float16(void) { return HAS_F16; }
