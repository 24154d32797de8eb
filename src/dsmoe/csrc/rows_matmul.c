/* A weight matrix times a few activation rows, for decoding on CPU.
 *
 *   int8:  out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *          x fp32 [M, K], q int8 [N, K], scale bf16 [N], out fp32 [M, N] (all row-major)
 *   float: out[m, n] = sum_k x[m, k] * w[n, k]
 *          x fp32 [M, K], w fp32 or bf16 [N, K], out fp32 [M, N]
 *
 * Why kernels of our own: a decode step multiplies every weight by one row per sequence, so
 * it should be bound by how fast the weights stream from memory. On one core of the
 * machine in benchmarks/ torch's CPU kernels do not get there for int8 and bf16 weights:
 * _weight_int8pack_mm and a float multiply-add loop spend ~3 vector instructions per 16
 * int8 weights (sign-extend, convert, FMA) and reach ~8-10 GB/s; bf16 GEMV ~10 GB/s.
 *
 * int8: each activation row is first written as 16-bit fixed point with one scale per row
 * (x ~ sx[m] * xi[m, k], |xi| <= 32767) and the dot products run in integers: sign-extend
 * 32 weights to int16 and multiply-add pairs into int32 (vpmaddwd), 2 instructions per 32
 * weights. Precision: the activation rounding error is at most max|x[m]| / 65534 per
 * element, no worse than the bf16 activations torch's int8 kernels use for every element
 * within 128x of the row's largest, and the integer sums are exact.
 * Overflow: a product is at most 32767 * 127 < 2^22 and an int32 lane adds two of them per
 * 64 weights (avx512; per 32 with avx2), so a lane stays below 2^31 for CHUNK weights; lanes
 * are summed in int64 and chunks in float.
 *
 * float: fp32 FMAs (bf16 weights widened by a shift, or bf16 pairs by vdpbf16ps); exact
 * fp32 products, summation order aside.
 *
 * The AVX-512 kernels stream two weight rows at a time through passes of up to 8
 * activation rows (see "two weight rows" below); the AVX2 and portable ones one weight row,
 * kept in L1 across the M activation rows. Built at run time by dsmoe/native.py (cc -O3
 * -shared, no torch headers); the ISA is picked once from __builtin_cpu_supports, so one
 * binary runs on any x86-64, and other CPUs get the portable loops. With -fopenmp,
 * `threads` > 1 splits the output rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "dsmoe_kernels.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bytes ahead of the weight row that FDOT4 (the AVX2 kernel of 3-4 rows) asks for: its
 * loop issues loads too slowly for the hardware prefetcher to run ahead (1.1-1.2x). */
#define PREFETCH 2048
/* Bytes ahead of the weight rows that the AVX-512 kernels (ROWS_PASS, int8_pass) ask to
 * have in L2 (prefetcht1), one stream over the rows they read. Why: with 8 activation rows
 * a 64-byte weight line costs ~9 loads and 8 multiply-adds, so few weight lines are in
 * flight and the loop stalls on memory; with the hardware prefetcher alone (or a near
 * prefetcht0) 8 rows of 1280 drew 7-10 GB/s on one Zen 4 core, with this 17-21 GB/s, the
 * rate of a plain read (measured in C: 4 KB ahead was slower, 16 KB the same). */
#define PREFETCH_FAR 8192
/* Vector steps each output sums on its own before the sum is folded into a running total:
 * fp32 chains of 16 (256 weights) instead of K / 16, so the rounding error grows with
 * 16 + K / 256 additions, not K / 16 (K = 1280: within that of the four-accumulator dots
 * these kernels replaced; torch's is ~2x larger). */
#define FOLD 16
#define CHUNK 4096 /* weights per int32 accumulation (see Overflow above) */
#define XMAX 32767.f

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef int64_t (*dot_fn)(const int16_t *x, const int8_t *w, int64_t K);

/* Exact integer dot product of K int16 x int8 values (|sum| < 2^31 within a CHUNK). */
static int64_t dot_generic(const int16_t *x, const int8_t *w, int64_t K) {
    int64_t acc = 0;
    for (int64_t k = 0; k < K; k++) acc += (int32_t)x[k] * (int32_t)w[k];
    return acc;
}

#if defined(__x86_64__)
__attribute__((target("avx2")))
static int64_t dot_avx2(const int16_t *x, const int8_t *w, int64_t K) {
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16)));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(x + k))));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + k + 16))));
    }
    /* Lanes are < 2^31 by CHUNK; their sum need not be, so it is taken in int64. */
    __m256i wide = _mm256_add_epi64(
        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a0)),
                         _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a0, 1))),
        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a1)),
                         _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a1, 1))));
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1) + dot_generic(x + k, w + k, K - k);
}
#endif

/* --- float weights: dot(x fp32, w fp32 or bf16) ------------------------------------ */
typedef float (*fdot_fn)(const float *x, const void *w, int64_t K);

static float fdot_generic_f32(const float *x, const void *w, int64_t K) {
    const float *v = w;
    float acc = 0.f;
    for (int64_t k = 0; k < K; k++) acc += x[k] * v[k];
    return acc;
}

static float fdot_generic_bf16(const float *x, const void *w, int64_t K) {
    const uint16_t *v = w;
    float acc = 0.f;
    for (int64_t k = 0; k < K; k++) acc += x[k] * bf16_to_float(v[k]);
    return acc;
}

typedef void (*fdot4_fn)(const float *x, const void *w, int64_t K, float *out);

static void fdot4_generic_f32(const float *x, const void *w, int64_t K, float *out) {
    for (int i = 0; i < 4; i++) out[i] = fdot_generic_f32(x + i * K, w, K);
}

static void fdot4_generic_bf16(const float *x, const void *w, int64_t K, float *out) {
    for (int i = 0; i < 4; i++) out[i] = fdot_generic_bf16(x + i * K, w, K);
}

#if defined(__x86_64__)
__attribute__((target("avx512f")))
static inline __m512 bf16x16_avx512(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma")))
static inline __m256 bf16x8_avx2(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma")))
static inline float hsum256(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* Weight vectors at w[k...] (fp32 loaded, bf16 widened by a shift) and the scalar tails. */
#define W_F32_512(w, k) _mm512_loadu_ps((const float *)(w) + (k))
#define W_BF16_512(w, k) bf16x16_avx512((const uint16_t *)(w) + (k))
#define W_F32_256(w, k) _mm256_loadu_ps((const float *)(w) + (k))
#define W_BF16_256(w, k) bf16x8_avx2((const uint16_t *)(w) + (k))
#define TAIL_F32(xk, w, k, K) fdot_generic_f32(xk, (const float *)(w) + (k), (K) - (k))
#define TAIL_BF16(xk, w, k, K) fdot_generic_bf16(xk, (const uint16_t *)(w) + (k), (K) - (k))

/* One activation row against one weight row, with four accumulators over consecutive
 * vectors so that the FMAs' latency overlaps. */
#define FDOT1(NAME, TARGET, VEC, ZERO, LOADX, LOADW, FMA, ADD, HSUM, STEP, TAIL)              \
    __attribute__((target(TARGET)))                                                           \
    static float NAME(const float *x, const void *w, int64_t K) {                             \
        VEC a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();                               \
        int64_t k = 0;                                                                        \
        for (; k + 4 * STEP <= K; k += 4 * STEP) {                                            \
            a0 = FMA(LOADX(x + k), LOADW(w, k), a0);                                          \
            a1 = FMA(LOADX(x + k + STEP), LOADW(w, k + STEP), a1);                            \
            a2 = FMA(LOADX(x + k + 2 * STEP), LOADW(w, k + 2 * STEP), a2);                    \
            a3 = FMA(LOADX(x + k + 3 * STEP), LOADW(w, k + 3 * STEP), a3);                    \
        }                                                                                     \
        return HSUM(ADD(ADD(a0, a1), ADD(a2, a3))) + TAIL(x + k, w, k, K);                    \
    }

FDOT1(fdot_avx512_f32, "avx512f", __m512, _mm512_setzero_ps, _mm512_loadu_ps, W_F32_512,
      _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps, 16, TAIL_F32)
FDOT1(fdot_avx512_bf16, "avx512f", __m512, _mm512_setzero_ps, _mm512_loadu_ps, W_BF16_512,
      _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps, 16, TAIL_BF16)
FDOT1(fdot_avx2_f32, "avx2,fma", __m256, _mm256_setzero_ps, _mm256_loadu_ps, W_F32_256,
      _mm256_fmadd_ps, _mm256_add_ps, hsum256, 8, TAIL_F32)
FDOT1(fdot_avx2_bf16, "avx2,fma", __m256, _mm256_setzero_ps, _mm256_loadu_ps, W_BF16_256,
      _mm256_fmadd_ps, _mm256_add_ps, hsum256, 8, TAIL_BF16)

/* Four activation rows (x, x + K, x + 2K, x + 3K) against one weight row: each weight
 * vector is loaded (and widened) once for four FMAs, so a decode step of a few sequences
 * costs little more memory traffic than one. */
#define FDOT4(NAME, TARGET, VEC, ZERO, LOADX, LOADW, FMA, HSUM, STEP, TAIL, ES)              \
    __attribute__((target(TARGET)))                                                           \
    static void NAME(const float *x, const void *w, int64_t K, float *out) {                  \
        const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;                   \
        VEC a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();                               \
        int64_t k = 0;                                                                        \
        for (; k + STEP <= K; k += STEP) {                                                    \
            _mm_prefetch((const char *)(w) + k * ES + PREFETCH, _MM_HINT_T0); /* see PREFETCH */\
            VEC v = LOADW(w, k);                                                              \
            a0 = FMA(LOADX(x0 + k), v, a0);                                                   \
            a1 = FMA(LOADX(x1 + k), v, a1);                                                   \
            a2 = FMA(LOADX(x2 + k), v, a2);                                                   \
            a3 = FMA(LOADX(x3 + k), v, a3);                                                   \
        }                                                                                     \
        out[0] = HSUM(a0) + TAIL(x0 + k, w, k, K);                                            \
        out[1] = HSUM(a1) + TAIL(x1 + k, w, k, K);                                            \
        out[2] = HSUM(a2) + TAIL(x2 + k, w, k, K);                                            \
        out[3] = HSUM(a3) + TAIL(x3 + k, w, k, K);                                            \
    }

FDOT4(fdot4_avx2_f32, "avx2,fma", __m256, _mm256_setzero_ps, _mm256_loadu_ps, W_F32_256,
      _mm256_fmadd_ps, hsum256, 8, TAIL_F32, 4)
FDOT4(fdot4_avx2_bf16, "avx2,fma", __m256, _mm256_setzero_ps, _mm256_loadu_ps, W_BF16_256,
      _mm256_fmadd_ps, hsum256, 8, TAIL_BF16, 2)

/* --- AVX-512: two weight rows x 1-8 activation rows per pass ------------------------------
 *
 * Why two weight rows: each activation vector loaded then serves both, so 8 activation rows
 * cost 5 loads per two weight vectors instead of 9 per one (fp32 rows of 1280, 40 KB, do not
 * fit in L1: they come from L2), and the far prefetch (PREFETCH_FAR) keeps the weights
 * streaming while the core multiplies. One accumulator per output, k ascending, folded into
 * a running sum every FOLD steps: a pass has 2-16 independent sums, and an output's sum
 * depends neither on how many activation rows share the pass nor on which weight row is its
 * partner, so a sequence decodes to the same bits alone or in a batch (within one path: a
 * call whose rows are not all bf16 numbers takes the widened path for all, see bf16_exact).
 * The last partial vector is read with masked loads (zeros past K, on both sides). M > 8
 * rows take passes of 8 over the two weight rows, which stay in L1. */
#define ROWS_PASS(NAME, TARGET, STEP, XT, LOADX, MASKX, LOADW, MASKW, MUL_ADD, ES)          \
    __attribute__((target(TARGET), always_inline))                                            \
    static inline void NAME(const XT *x, const char *w, int64_t K, float *out, int64_t N,      \
                            const int R, const int M) {                                       \
        __m512 a[2][8], sum[2][8];                                                            \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < M; m++) sum[r][m] = _mm512_setzero_ps();                      \
        const char *ahead = w + PREFETCH_FAR; /* one stream over the R rows (see PREFETCH_FAR) */\
        int64_t k = 0;                                                                        \
        do { /* FOLD steps into a, then a into sum */                                         \
            for (int r = 0; r < R; r++)                                                       \
                for (int m = 0; m < M; m++) a[r][m] = _mm512_setzero_ps();                    \
            for (const int64_t end = k + FOLD * STEP; k + STEP <= K && k < end; k += STEP) {  \
                for (int i = 0; i < R * STEP * ES; i += 64)                                   \
                    _mm_prefetch(ahead + R * k * ES + i, _MM_HINT_T1);                        \
                __m512 v[2];                                                                  \
                for (int r = 0; r < R; r++) v[r] = LOADW(w + r * K * ES, k);                  \
                for (int m = 0; m < M; m++) {                                                 \
                    __m512 xv = LOADX(x + m * K + k);                                         \
                    for (int r = 0; r < R; r++) a[r][m] = MUL_ADD(a[r][m], xv, v[r]);         \
                }                                                                             \
            }                                                                                 \
            if (k + STEP > K && k < K) { /* the last partial vector */                        \
                const uint32_t live = (1u << (K - k)) - 1u;                                   \
                __m512 v[2];                                                                  \
                for (int r = 0; r < R; r++) v[r] = MASKW(live, w + r * K * ES, k);            \
                for (int m = 0; m < M; m++) {                                                 \
                    __m512 xv = MASKX(live, x + m * K + k);                                   \
                    for (int r = 0; r < R; r++) a[r][m] = MUL_ADD(a[r][m], xv, v[r]);         \
                }                                                                             \
                k = K;                                                                        \
            }                                                                                 \
            for (int r = 0; r < R; r++)                                                       \
                for (int m = 0; m < M; m++) sum[r][m] = _mm512_add_ps(sum[r][m], a[r][m]);    \
        } while (k < K);                                                                      \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < M; m++) out[m * N + r] = _mm512_reduce_add_ps(sum[r][m]);     \
    }

/* PASS(..., R, M) for a selector (M - 1) * 2 + (R - 1), M 1-8 activation rows, R 1-2 weight
 * rows: constants, so that each pass keeps its sums in registers. */
#define RM_SWITCH(sel, PASS, ...)                                                              \
    switch (sel) {                                                                             \
    case 0: PASS(__VA_ARGS__, 1, 1); break;                                                    \
    case 1: PASS(__VA_ARGS__, 2, 1); break;                                                    \
    case 2: PASS(__VA_ARGS__, 1, 2); break;                                                    \
    case 3: PASS(__VA_ARGS__, 2, 2); break;                                                    \
    case 4: PASS(__VA_ARGS__, 1, 3); break;                                                    \
    case 5: PASS(__VA_ARGS__, 2, 3); break;                                                    \
    case 6: PASS(__VA_ARGS__, 1, 4); break;                                                    \
    case 7: PASS(__VA_ARGS__, 2, 4); break;                                                    \
    case 8: PASS(__VA_ARGS__, 1, 5); break;                                                    \
    case 9: PASS(__VA_ARGS__, 2, 5); break;                                                    \
    case 10: PASS(__VA_ARGS__, 1, 6); break;                                                   \
    case 11: PASS(__VA_ARGS__, 2, 6); break;                                                   \
    case 12: PASS(__VA_ARGS__, 1, 7); break;                                                   \
    case 13: PASS(__VA_ARGS__, 2, 7); break;                                                   \
    case 14: PASS(__VA_ARGS__, 1, 8); break;                                                   \
    default: PASS(__VA_ARGS__, 2, 8); break;                                                   \
    }

/* outputs [n0, n1) of out [M, N] = x [M, K] @ w [N, K].T: pairs of weight rows, passes of up
 * to 8 activation rows (a constant count keeps the sums in registers). */
#define ROWS_DRIVER(NAME, PASS, TARGET, XT, ES)                                               \
    __attribute__((target(TARGET))) static void NAME(const void *xv, const void *wv, float *out,\
                                                     int64_t M, int64_t N, int64_t K,         \
                                                     int64_t n0, int64_t n1) {                \
        const XT *x = xv;                                                                     \
        for (int64_t n = n0; n < n1; n += 2) {                                                \
            const char *w = (const char *)wv + n * K * ES;                                    \
            const int two = n + 1 < n1;                                                       \
            for (int64_t m = 0; m < M; m += 8) {                                              \
                const XT *xm = x + m * K;                                                     \
                float *o = out + m * N + n;                                                   \
                RM_SWITCH((M - m < 8 ? M - m : 8) * 2 - 2 + two, PASS, xm, w, K, o, N);       \
            }                                                                                 \
        }                                                                                     \
    }

#define FMA_512(a, x, w) _mm512_fmadd_ps(x, w, a)
#define MASK_F32(live, p) _mm512_maskz_loadu_ps((__mmask16)(live), p)
#define W_F32(p, k) _mm512_loadu_ps((const float *)(p) + (k))
#define W_F32_MASK(live, p, k) _mm512_maskz_loadu_ps((__mmask16)(live), (const float *)(p) + (k))
#define W_WIDEN(p, k) bf16x16_avx512((const uint16_t *)(p) + (k))
#define W_WIDEN_MASK(live, p, k)                                                              \
    _mm512_castsi512_ps(_mm512_slli_epi32(                                                    \
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(                                         \
            _mm512_maskz_loadu_epi16((__mmask32)(live), (const uint16_t *)(p) + (k)))),       \
        16))
ROWS_PASS(f32_pass, "avx512f,avx512bw", 16, float, _mm512_loadu_ps, MASK_F32, W_F32,
          W_F32_MASK, FMA_512, 4)
ROWS_PASS(widen_pass, "avx512f,avx512bw", 16, float, _mm512_loadu_ps, MASK_F32, W_WIDEN,
          W_WIDEN_MASK, FMA_512, 2)
ROWS_DRIVER(f32_rows_avx512, f32_pass, "avx512f,avx512bw", float, 4)
ROWS_DRIVER(widen_rows_avx512, widen_pass, "avx512f,avx512bw", float, 2)

/* --- bf16 weights times rows that are bf16 numbers: vdpbf16ps (level 3) ------------------
 *
 * Why: a bf16 model's activations are bf16 (widened to fp32 on the way in), so rows and
 * weights can meet as bf16 pairs: one vdpbf16ps multiplies 32 of each and adds them into 16
 * fp32 sums, with no widening. At one row this frees the core for the memory stream; at
 * 4-8 rows, where the widen + FMA loop is bound by arithmetic and by re-reading fp32 rows
 * that no longer fit in L1 (~3 GB/s at 8 rows), it does twice the multiply-adds per
 * instruction from bf16 rows half the size (8 rows of 1280: 20 KB, in L1).
 * Numerics: a product of two bf16 is exact in fp32 and each is added with one
 * round-to-nearest-even, as an FMA does, so the result is the widen + FMA result up to
 * summation order, except that the instruction treats bf16 subnormals (|v| < 2^-126) as
 * zero and flushes subnormal sums: weights below 2^-126 count as zero (rows with one
 * take the exact path: see bf16_exact).
 * Same passes as above, 32 k per step. */
#define DP_BF16(a, x, w) _mm512_dpbf16_ps(a, (__m512bh)(x), (__m512bh)(w))
#define X_PAIRS(p) _mm512_castsi512_ps(_mm512_loadu_si512(p))
#define X_PAIRS_MASK(live, p) _mm512_castsi512_ps(_mm512_maskz_loadu_epi16((__mmask32)(live), p))
#define W_PAIRS(p, k) X_PAIRS((const uint16_t *)(p) + (k))
#define W_PAIRS_MASK(live, p, k) X_PAIRS_MASK(live, (const uint16_t *)(p) + (k))
ROWS_PASS(pairs_pass, "avx512f,avx512bw,avx512bf16", 32, uint16_t, X_PAIRS, X_PAIRS_MASK,
          W_PAIRS, W_PAIRS_MASK, DP_BF16, 2)
ROWS_DRIVER(pairs_rows_avx512, pairs_pass, "avx512f,avx512bw,avx512bf16", uint16_t, 2)

/* int8 in the same passes: R weight rows, widened to int16 once per 32 weights, times M
 * rows of 16-bit fixed point (vpmaddwd), one int32 sum per output per CHUNK (exact, see
 * Overflow), taken in int64 and added to acc[r][m] in float: to the bit what int8_rows
 * computes with dot_avx2 or dot_generic (integer sums do not depend on their order), and at
 * 8 rows without re-widening each weight vector 8 times. */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void int8_pass(const int16_t *x, const int8_t *w, int64_t K, float acc[2][8],
                             const int R, const int M) {
    const char *ahead = (const char *)w + PREFETCH_FAR; /* see PREFETCH_FAR */
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = 0.f;
    for (int64_t c = 0; c < K; c += CHUNK) {
        const int64_t end = c + CHUNK < K ? c + CHUNK : K;
        __m512i a[2][8];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) a[r][m] = _mm512_setzero_si512();
        int64_t k = c;
        for (; k + 32 <= end; k += 32) { /* unmasked: masked loads here cost ~25% */
            _mm_prefetch(ahead + R * k, _MM_HINT_T1);
            __m512i v[2];
            for (int r = 0; r < R; r++)
                v[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + r * K + k)));
            for (int m = 0; m < M; m++) {
                __m512i xv = _mm512_loadu_si512(x + m * K + k);
                for (int r = 0; r < R; r++)
                    a[r][m] = _mm512_add_epi32(a[r][m], _mm512_madd_epi16(v[r], xv));
            }
        }
        if (k < end) { /* the last partial vector: zeros past K on both sides */
            const __mmask32 live = (1u << (end - k)) - 1u;
            __m512i v[2];
            for (int r = 0; r < R; r++)
                v[r] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(
                    _mm512_maskz_loadu_epi8((__mmask64)live, w + r * K + k)));
            for (int m = 0; m < M; m++) {
                __m512i xv = _mm512_maskz_loadu_epi16(live, x + m * K + k);
                for (int r = 0; r < R; r++)
                    a[r][m] = _mm512_add_epi32(a[r][m], _mm512_madd_epi16(v[r], xv));
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) {
                __m512i wide = _mm512_add_epi64(
                    _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a[r][m])),
                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a[r][m], 1)));
                acc[r][m] += (float)_mm512_reduce_add_epi64(wide);
            }
    }
}

__attribute__((target("avx512f,avx512bw")))
static void int8_rows_avx512(const int16_t *xi, const float *sx, const int8_t *q,
                             const uint16_t *scale, float *out, int64_t M, int64_t N, int64_t K,
                             int64_t n0, int64_t n1) {
    float acc[2][8];
    for (int64_t n = n0; n < n1; n += 2) {
        const int two = n + 1 < n1;
        for (int64_t m = 0; m < M; m += 8) {
            const int64_t rows = M - m < 8 ? M - m : 8;
            RM_SWITCH(rows * 2 - 2 + two, int8_pass, xi + m * K, q + n * K, K, acc);
            for (int r = 0; r <= two; r++) {
                const float s = bf16_to_float(scale[n + r]);
                for (int64_t i = 0; i < rows; i++)
                    out[(m + i) * N + n + r] = acc[r][i] * sx[m + i] * s;
            }
        }
    }
}
#endif

/* The kernels of one code path: one-row dots (attention), and for the float matmuls either
 * whole-slice kernels (frows: AVX-512) or the one- and four-row dots float_rows combines. */
typedef void (*frows_fn)(const void *x, const void *w, float *out, int64_t M, int64_t N,
                         int64_t K, int64_t n0, int64_t n1);
typedef void (*i8rows_fn)(const int16_t *xi, const float *sx, const int8_t *q,
                          const uint16_t *scale, float *out, int64_t M, int64_t N, int64_t K,
                          int64_t n0, int64_t n1);
typedef struct {
    dot_fn int8;
    i8rows_fn int8rows; /* int8's whole-slice kernel (AVX-512), else NULL: int8_rows + int8 */
    fdot_fn f32, bf16;
    fdot4_fn f32x4, bf16x4;
    frows_fn f32rows, bf16rows;
} kernels_t;

static const kernels_t PORTABLE = {dot_generic, NULL, fdot_generic_f32, fdot_generic_bf16,
                                   fdot4_generic_f32, fdot4_generic_bf16, NULL, NULL};
#if defined(__x86_64__)
static const kernels_t AVX2 = {dot_avx2, NULL, fdot_avx2_f32, fdot_avx2_bf16, fdot4_avx2_f32,
                               fdot4_avx2_bf16, NULL, NULL};
static const kernels_t AVX512 = {NULL, int8_rows_avx512, fdot_avx512_f32,
                                 fdot_avx512_bf16, NULL, NULL, f32_rows_avx512,
                                 widen_rows_avx512};
#endif

/* The fastest path this CPU supports, at most `limit` (3 avx512 with vdpbf16ps for bf16
 * weights, 2 avx512, 1 avx2, 0 portable). */
static int pick(int limit) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (limit >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16"))
        return 3;
    if (limit >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return 2;
    if (limit >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    (void)limit;
    return 0;
}

static int chosen_isa = -1;

static const kernels_t *chosen(void) {
    if (chosen_isa < 0) chosen_isa = pick(3);
#if defined(__x86_64__)
    if (chosen_isa >= 2) return &AVX512;
    if (chosen_isa == 1) return &AVX2;
#endif
    return &PORTABLE;
}

/* omp_get_max_threads() of the runtime these kernels call (0 without OpenMP): equal to
 * torch.get_num_threads() when it is torch's runtime (native.py links it so). */
int dsmoe_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}

/* Which code path runs: 3 avx512 + vdpbf16ps, 2 avx512, 1 avx2, 0 portable (reported by
 * native.py). */
int dsmoe_rows_isa(void) {
    chosen();
    return chosen_isa;
}

/* Restrict the code path to at most `limit` (tests run every path the CPU has); returns
 * the path now in use. Not thread-safe: call it before any matmul. */
int dsmoe_rows_limit_isa(int limit) {
    chosen_isa = pick(limit);
    return chosen_isa;
}

static int chosen_isa_at_least(int level) {
    chosen();
    return chosen_isa >= level;
}

/* --- the streaming-read probe ---------------------------------------------------------
 *
 * Why: benchmarks/generate.py bounds decode speed by bytes per step / bandwidth, and a torch
 * fp32 `sum` is no ceiling (the fp32 kernels drew 113% of its rate). This is the fastest
 * read this code knows: 64-byte loads into eight independent accumulators (no FMA, no
 * widening), contiguous slices of buf split between `threads`. Returns the sum of the n
 * floats (which the caller ignores) so that no load can be optimised away. */
#if defined(__x86_64__)
__attribute__((target("avx512f")))
static float read_avx512(const float *buf, int64_t n) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= n; k += 128) {
        for (int i = 0; i < 8; i++) a[i] = _mm512_add_ps(a[i], _mm512_loadu_ps(buf + k + 16 * i));
    }
    for (int i = 1; i < 8; i++) a[0] = _mm512_add_ps(a[0], a[i]);
    float tail = 0.f;
    for (; k < n; k++) tail += buf[k];
    return _mm512_reduce_add_ps(a[0]) + tail;
}
#endif

static float read_slice(const float *buf, int64_t n) {
#if defined(__x86_64__)
    if (chosen_isa_at_least(2)) return read_avx512(buf, n);
#endif
    float a[8] = {0.f};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int i = 0; i < 8; i++) a[i] += buf[k + i];
    for (; k < n; k++) a[0] += buf[k];
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

float dsmoe_stream_read(const float *buf, int64_t n, int threads) {
    float total = 0.f;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads) reduction(+ : total)
        {
            int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            total += read_slice(buf + n * t / T, n * (t + 1) / T - n * t / T);
        }
        return total;
    }
#endif
    (void)threads;
    return read_slice(buf, n);
}

/* x as 16-bit fixed point, one scale per row. Returns 0, or -1 when x holds inf/nan. */
static int to_fixed(const float *x, int16_t *xi, float *sx, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.f, probe = 0.f; /* fmaxf skips nan; x - x is nan for nan and inf */
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k])), probe += xm[k] - xm[k];
        if (!isfinite(amax) || probe != 0.f) return -1;
        float inv = amax > 0.f ? XMAX / amax : 0.f;
        sx[m] = amax / XMAX;
        for (int64_t k = 0; k < K; k++) xi[m * K + k] = (int16_t)lrintf(xm[k] * inv);
    }
    return 0;
}

static void int8_rows(dot_fn dot, const int16_t *xi, const float *sx, const int8_t *q,
                 const uint16_t *scale, float *out, int64_t M, int64_t N, int64_t K,
                 int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *r = q + n * K;
        float s = bf16_to_float(scale[n]);
        for (int64_t m = 0; m < M; m++) {  /* the row r stays in L1 across m */
            float acc = 0.f;
            for (int64_t k = 0; k < K; k += CHUNK) {
                int64_t len = K - k < CHUNK ? K - k : CHUNK;
                acc += (float)dot(xi + m * K + k, r + k, len);
            }
            out[m * N + n] = acc * sx[m] * s;
        }
    }
}

/* Blocks: a stack of E matrices [E, N, K] serves P activation rows in blocks, one
 * (expert, first row, rows) triple per block: rows [first, first + rows) of x go through
 * matrix `expert` into the same rows of out [P, N]. A single matrix is one block (0, 0, M);
 * a decode step of the routed experts is one block per expert with rows, in one call.
 * Threads split every block's N outputs, so each streams its share of each matrix. */
/* The arguments of one blocks matmul; `slice` computes outputs [n0, n1) of every block. */
typedef struct {
    const int64_t *blocks;
    int64_t nb, N, K;
    /* int8 */
    dot_fn dot;
    i8rows_fn int8rows; /* the whole-slice kernel, else NULL (int8_rows over dot) */
    const int16_t *xi;
    const float *sx;
    const int8_t *q;
    const uint16_t *scale;
    /* float */
    fdot_fn fdot;
    fdot4_fn fdot4;
    frows_fn frows; /* the whole-slice kernel, else NULL (then float_rows combines the dots) */
    const float *x;
    const uint16_t *xb; /* x as bf16 when every row is bf16 numbers and level 3 runs, else NULL */
    const char *w;
    int64_t w_size;
    float *out;
} job_t;

static void int8_slice(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t b = 0; b < j->nb; b++) {
        int64_t e = j->blocks[3 * b], first = j->blocks[3 * b + 1], rows = j->blocks[3 * b + 2];
        const int16_t *xi = j->xi + first * j->K;
        const int8_t *q = j->q + e * j->N * j->K;
        if (j->int8rows)
            j->int8rows(xi, j->sx + first, q, j->scale + e * j->N, j->out + first * j->N, rows,
                        j->N, j->K, n0, n1);
        else
            int8_rows(j->dot, xi, j->sx + first, q, j->scale + e * j->N, j->out + first * j->N,
                      rows, j->N, j->K, n0, n1);
    }
}

static void float_rows(fdot_fn dot, fdot4_fn dot4, const float *x, const char *w,
                       int64_t w_size, float *out, int64_t M, int64_t N, int64_t K, int64_t n0,
                       int64_t n1) {
    float four[4];
    for (int64_t n = n0; n < n1; n++) {
        const char *r = w + n * K * w_size;
        int64_t m = 0;
        for (; M >= 3 && m + 4 <= M; m += 4) {  /* 1-2 rows: one row has more accumulators */
            dot4(x + m * K, r, K, four);
            for (int i = 0; i < 4; i++) out[(m + i) * N + n] = four[i];
        }
        for (; m < M; m++) out[m * N + n] = dot(x + m * K, r, K);
    }
}

/* The float kernels of the path `kern` for fp32 (w_bf16 0) or bf16 weights, and for rows
 * given as bf16 pairs (xb: see bf16_exact; NULL: the fp32 rows j->x). */
static void float_kernels(job_t *j, const kernels_t *kern, int w_bf16, const uint16_t *xb) {
    j->fdot = w_bf16 ? kern->bf16 : kern->f32;
    j->fdot4 = w_bf16 ? kern->bf16x4 : kern->f32x4;
    j->frows = w_bf16 ? kern->bf16rows : kern->f32rows;
    j->xb = xb;
#if defined(__x86_64__)
    if (xb) j->frows = pairs_rows_avx512; /* level 3 only: bf16_exact is NULL below it */
#endif
}

static void float_slice(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t b = 0; b < j->nb; b++) {
        int64_t e = j->blocks[3 * b], first = j->blocks[3 * b + 1], rows = j->blocks[3 * b + 2];
        const char *w = j->w + e * j->N * j->K * j->w_size;
        float *out = j->out + first * j->N;
        /* the rows as bf16 pairs or fp32, as float_kernels chose the kernel */
        const void *x = j->xb ? (const void *)(j->xb + first * j->K)
                              : (const void *)(j->x + first * j->K);
        if (j->frows)
            j->frows(x, w, out, rows, j->N, j->K, n0, n1);
        else
            float_rows(j->fdot, j->fdot4, j->x + first * j->K, w, j->w_size, out, rows, j->N,
                       j->K, n0, n1);
    }
}

/* Outputs [0, N) of every block in pieces of PIECE rows, each taken by whichever thread
 * asks next (*next counts the pieces handed out). Why not a fixed range per thread: on a
 * shared machine one thread is often descheduled for a while, and a fixed split then
 * waits for it at the region's end (two threads measured slower than one); with pieces
 * the running thread takes over the rest. Every output keeps its summation order. */
#define PIECE 64
/* Rows per piece of an N-output matmul on `threads` threads: about four pieces per thread,
 * a multiple of PIECE, at most 1024. Why not always PIECE: a thread streaming one matrix
 * from memory reads each piece's weights as one run, and runs of 64 rows (40 KB of int4)
 * interleaved between two threads kept the hardware prefetchers from reaching full speed
 * (a [65536, 1280] matrix on 2 threads: int8 27 -> 33 GB/s, Q4_0-form int4 24 -> 39 with
 * 1024-row pieces); four pieces per thread keep small matrices balanced. */
int64_t dsmoe_piece_rows(int64_t N, int threads) {
    int64_t want = (N + 4 * (int64_t)threads - 1) / (4 * (int64_t)(threads > 0 ? threads : 1));
    want = (want + PIECE - 1) / PIECE * PIECE;
    return want < PIECE ? PIECE : want > 1024 ? 1024 : want;
}

typedef void (*rows_fn)(const void *job, int64_t n0, int64_t n1);
static void int8_any(const void *job, int64_t n0, int64_t n1) { int8_slice(job, n0, n1); }
static void float_any(const void *job, int64_t n0, int64_t n1) { float_slice(job, n0, n1); }
static void pieces(rows_fn rows, const void *job, int64_t N, int64_t piece, int64_t *next) {
    for (int64_t i; (i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) * piece < N;)
        rows(job, i * piece, (i + 1) * piece < N ? (i + 1) * piece : N);
}

/* Run `slice` over all N outputs, shared between `threads` OpenMP threads when there are
 * enough outputs to share. */
static void run(rows_fn slice, const job_t *job, int threads) {
    int64_t next = 0, piece = dsmoe_piece_rows(job->N, threads);
#ifdef _OPENMP
    if (threads > 1 && job->N >= 64 * threads) {
#pragma omp parallel num_threads(threads)
        pieces(slice, job, job->N, piece, &next);
        return;
    }
#endif
    pieces(slice, job, job->N, piece, &next);
}

/* int8: q [E, N, K], scale [E, N]. Returns 0 on success, -1 when x is not finite (the
 * caller then takes another path), -2 when out of memory. */
int dsmoe_int8_blocks_matmul(const float *x, const int8_t *q, const uint16_t *scale,
                             float *out, int64_t P, const int64_t *blocks, int64_t nb,
                             int64_t N, int64_t K, int threads) {
    int16_t *xi = malloc((size_t)(P * K) * sizeof *xi + 64);
    float *sx = malloc((size_t)(P > 0 ? P : 1) * sizeof *sx);
    if (!xi || !sx) {
        free(xi);
        free(sx);
        return -2;
    }
    if (to_fixed(x, xi, sx, P, K)) {
        free(xi);
        free(sx);
        return -1;
    }
    job_t job = {.blocks = blocks, .nb = nb, .N = N, .K = K, .dot = chosen()->int8,
                 .int8rows = chosen()->int8rows,
                 .xi = xi, .sx = sx, .q = q, .scale = scale, .out = out};
    run(int8_any, &job, threads);
    free(xi);
    free(sx);
    return 0;
}

/* x [P, K] as bf16 for vdpbf16ps (level 3, bf16 weights) when every element is a bf16
 * number other than a subnormal (which the instruction would read as zero): a bf16 model's
 * activations. NULL otherwise (the caller takes the exact widen + FMA path) or when out of
 * memory; the caller frees the result. */
static uint16_t *bf16_exact(const float *x, int64_t P, int64_t K, int w_bf16) {
    if (!w_bf16 || chosen_isa < 3 || P < 1) return NULL;
    uint16_t *xb = malloc((size_t)(P * K) * sizeof *xb + 64);
    for (int64_t i = 0; xb && i < P * K; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        if ((u & 0xffffu) || ((u & 0x7f800000u) == 0 && (u & 0x7fffffffu))) {
            free(xb);
            return NULL;
        }
        xb[i] = (uint16_t)(u >> 16);
    }
    return xb;
}

/* float: w fp32 or bf16 [E, N, K] (w_bf16: 0 or 1). Returns 0. */
int dsmoe_float_blocks_matmul(const float *x, const void *w, int w_bf16, float *out,
                              const int64_t *blocks, int64_t nb, int64_t N, int64_t K,
                              int threads) {
    const kernels_t *kern = chosen();
    int64_t P = 0; /* rows of x: the end of the last block */
    for (int64_t b = 0; b < nb; b++)
        if (blocks[3 * b + 1] + blocks[3 * b + 2] > P) P = blocks[3 * b + 1] + blocks[3 * b + 2];
    uint16_t *xb = bf16_exact(x, P, K, w_bf16);
    job_t job = {.blocks = blocks, .nb = nb, .N = N, .K = K, .x = x, .w = w,
                 .w_size = w_bf16 ? 2 : 4, .out = out};
    float_kernels(&job, kern, w_bf16, xb);
    run(float_any, &job, threads);
    free(xb);
    return 0;
}

/* --- a MoE layer's routed experts for one decode step, in one call ----------------------
 *
 * Why one call: at batch <= 8 the routed experts' weights stream in ~1 ms per layer, while
 * the torch ops around the two matmuls (sort by expert, block table, gather, activation,
 * casts, weighted combine) cost ~0.3-0.5 ms more in per-op overhead. Here they are loops
 * over a few rows, inside one OpenMP region:
 *   1. counting sort of the T*K assignments by expert; gather their token rows (xs [A, D])
 *   2. gate_up = xs @ gate_up[e].T per expert block           [A, 2F]
 *   3. h = silu(gate) * up; each piece of work takes the same f range of gate
 *      and up, so no barrier between 2 and 3                  [A, F]
 *   4. ys = h @ down[e].T per expert block                     [A, D]
 *   5. out[t] = sum_k w[t, k] * ys[row of (t, k)], k in order   [T, D]
 * Weights: kind 0 fp32, 1 bf16 (gate_up [E, 2F, D], down [E, D, F]), 2 int8 with bf16
 * scales per output row ([E, 2F], [E, D]), 3 int4 (int4_matmul.c's, in parts). All sums in fp32; the
 * result is rounded once by the caller. counts [E] receives the assignments per expert.
 * Returns 0; -1 when an activation is not finite (int8/int4: the caller takes torch's
 * path), -2 out of memory, -3 an expert id outside [0, E), -4 a bad int4 group size. */
typedef struct {
    rows_fn rows;            /* the kind's slice: outputs [n0, n1) of every block */
    const void *gu, *dn;     /* the jobs of steps 2 and 4 (int4: struct int4_mm) */
    job_t gu8, dn8;          /* int8 and float: the jobs */
    uint16_t *xb;            /* bf16: xs as bf16 pairs (see bf16_exact) or NULL */
    struct int4_mm *gu4, *dn4;
    const uint16_t *dn_scale, *dn_zero; /* int4: step 4's matrices */
    const void *down;
    const int64_t *blocks;
    int64_t nb, group;
    const int64_t *slot_row;
    const float *w;
    float *ys, *gu_out, *h, *out;
    int16_t *hi;
    float *sh;
    int64_t T, K, A, D, F;
    int64_t next[2], done[2]; /* pieces of steps 2-3 and of step 4: handed out, done */
    int64_t piece[2];         /* their rows per piece (dsmoe_piece_rows) */
    int kind, status;
} moe_job_t;

/* Step 4's activations from h (one thread): int8 fixed point, int4 quantized blocks. */
static void down_acts(moe_job_t *m) {
    if (m->kind == 2 && to_fixed(m->h, m->hi, m->sh, m->A, m->F)) m->status = -1;
    if (m->kind == 3) {
        m->status = dsmoe_int4_begin(&m->dn4, m->h, m->down, m->dn_scale, m->dn_zero, m->ys,
                                     m->A, m->blocks, m->nb, m->D, m->F, m->group);
        if (m->status == -3) m->status = -4; /* a bad group, not a bad expert id */
        m->dn = m->dn4;
    }
}

/* Step 2 and 3 in pieces of f (as `pieces`): gate rows [f0, f1) and up rows [F + f0, F + f1)
 * in one piece, so its thread applies the activation at once, without a barrier. */
static void gate_up_pieces(moe_job_t *m) {
    int64_t F = m->F, piece = m->piece[0];
    for (int64_t i; (i = __atomic_fetch_add(&m->next[0], 1, __ATOMIC_RELAXED)) * piece < F;) {
        int64_t f0 = i * piece, f1 = f0 + piece < F ? f0 + piece : F;
        m->rows(m->gu, f0, f1);
        m->rows(m->gu, F + f0, F + f1);
        for (int64_t a = 0; a < m->A; a++) {
            const float *g = m->gu_out + a * 2 * F;
            for (int64_t f = f0; f < f1; f++) m->h[a * F + f] = g[f] / (1.f + expf(-g[f])) * g[F + f];
        }
        if (__atomic_add_fetch(&m->done[0], 1, __ATOMIC_ACQ_REL) == (F + piece - 1) / piece)
            down_acts(m); /* the last piece's thread: every h is written */
    }
}

/* Step 4 in pieces of d, then step 5 on the thread that finishes the last piece. */
static void down_pieces(moe_job_t *m) {
    int64_t D = m->D, piece = m->piece[1];
    for (int64_t i; (i = __atomic_fetch_add(&m->next[1], 1, __ATOMIC_RELAXED)) * piece < D;) {
        m->rows(m->dn, i * piece, (i + 1) * piece < D ? (i + 1) * piece : D);
        if (__atomic_add_fetch(&m->done[1], 1, __ATOMIC_ACQ_REL) < (D + piece - 1) / piece)
            continue;
        for (int64_t tok = 0; tok < m->T; tok++) { /* every ys is written */
            float *o = m->out + tok * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t k = 0; k < m->K; k++) {
                float wk = m->w[tok * m->K + k];
                const float *y = m->ys + m->slot_row[tok * m->K + k] * D;
                for (int64_t d = 0; d < D; d++) o[d] += wk * y[d];
            }
        }
    }
}

/* Steps 2-5 on every thread of one parallel region: its only barrier is the one before
 * step 4 (the serial steps between run on whichever thread finishes last). */
static void moe_thread(moe_job_t *m) {
    gate_up_pieces(m);
#ifdef _OPENMP
#pragma omp barrier
#endif
    if (m->status) return; /* read after the barrier: every thread sees it */
    down_pieces(m);
}

/* Counting sort by expert: counts, the sorted row of every slot, the block table, and the
 * gathered rows xs. Returns the number of blocks, or -3 for an expert id out of range. */
static int64_t sort_slots(const float *x, const int64_t *idx, int64_t T, int64_t K,
                          int64_t E, int64_t D, int64_t *counts, int64_t *slot_row,
                          int64_t *blocks, int64_t *next, float *xs) {
    int64_t A = T * K, nb = 0, start = 0;
    memset(counts, 0, (size_t)E * sizeof *counts);
    for (int64_t a = 0; a < A; a++) {
        if (idx[a] < 0 || idx[a] >= E) return -3;
        counts[idx[a]]++;
    }
    for (int64_t e = 0; e < E; e++) {
        next[e] = start;
        if (counts[e]) {
            blocks[3 * nb] = e, blocks[3 * nb + 1] = start, blocks[3 * nb + 2] = counts[e];
            nb++;
        }
        start += counts[e];
    }
    for (int64_t a = 0; a < A; a++) {
        int64_t r = next[idx[a]]++;
        slot_row[a] = r;
        memcpy(xs + r * D, x + (a / K) * D, (size_t)D * sizeof *xs);
    }
    return nb;
}

/* Steps 2 and 4's jobs of m's kind (int4: step 2's activations quantized, int8: in fixed
 * point into xi, sx); returns the status. xs [A, D] the rows sorted by expert. */
static int moe_jobs(moe_job_t *m, const float *xs, const void *gate_up, const uint16_t *gu_scale,
                    const uint16_t *gu_zero, float *sx) {
    int64_t A = m->A, D = m->D, F = m->F;
    if (m->kind == 3) {
        m->rows = dsmoe_int4_slice;
        int status = dsmoe_int4_begin(&m->gu4, xs, gate_up, gu_scale, gu_zero, m->gu_out, A,
                                      m->blocks, m->nb, 2 * F, D, m->group);
        m->gu = m->gu4;
        return status == -3 ? -4 : status;
    }
    const kernels_t *kern = chosen();
    job_t *gu = &m->gu8, *dn = &m->dn8;
    *gu = (job_t){.blocks = m->blocks, .nb = m->nb, .N = 2 * F, .K = D, .out = m->gu_out};
    *dn = (job_t){.blocks = m->blocks, .nb = m->nb, .N = D, .K = F, .out = m->ys};
    m->gu = gu, m->dn = dn;
    if (m->kind == 2) {
        m->rows = int8_any;
        gu->dot = dn->dot = kern->int8;
        gu->int8rows = dn->int8rows = kern->int8rows;
        gu->xi = m->hi, gu->sx = sx, gu->q = gate_up, gu->scale = gu_scale;
        /* the activation h is re-quantised into the same buffer once xs is consumed */
        dn->xi = m->hi, dn->sx = m->sh, dn->q = m->down, dn->scale = m->dn_scale;
        return to_fixed(xs, m->hi, sx, A, D) ? -1 : 0;
    }
    m->rows = float_any;
    m->xb = bf16_exact(xs, A, D, m->kind == 1);
    float_kernels(gu, kern, m->kind == 1, m->xb);
    /* h = silu(gate) * up is fp32, not bf16: the down projection stays exact */
    float_kernels(dn, kern, m->kind == 1, NULL);
    gu->x = xs, gu->w = gate_up, dn->x = m->h, dn->w = m->down;
    gu->w_size = dn->w_size = m->kind == 0 ? 4 : m->kind == 1 ? 2 : 1;
    return 0;
}

int dsmoe_experts_decode(const float *x, const int64_t *idx, const float *w, int64_t T,
                         int64_t K, int kind, const void *gate_up, const uint16_t *gu_scale,
                         const uint16_t *gu_zero, const void *down, const uint16_t *dn_scale,
                         const uint16_t *dn_zero, int64_t group, int64_t E, int64_t D,
                         int64_t F, float *out, int64_t *counts, int threads) {
    int64_t A = T * K, W = D > F ? D : F;
    size_t ints = (size_t)(4 * E + A), floats = (size_t)(A * (D + 2 * F + F + D) + 2 * A);
    int64_t *ibuf = malloc(ints * sizeof *ibuf);
    float *fbuf = malloc(floats * sizeof *fbuf);
    int16_t *xi = kind == 2 ? malloc((size_t)(A * W) * sizeof *xi + 64) : NULL;
    if (!ibuf || !fbuf || (kind == 2 && !xi)) {
        free(ibuf), free(fbuf), free(xi);
        return -2;
    }
    int64_t *blocks = ibuf, *next = ibuf + 3 * E, *slot_row = ibuf + 4 * E;
    float *xs = fbuf, *gu = xs + A * D, *h = gu + A * 2 * F, *ys = h + A * F;
    float *sx = ys + A * D, *sh = sx + A;
    int64_t nb = sort_slots(x, idx, T, K, E, D, counts, slot_row, blocks, next, xs);
    int status = nb < 0 ? (int)nb : 0;
    moe_job_t m = {.dn_scale = dn_scale, .dn_zero = dn_zero, .down = down, .blocks = blocks,
                   .nb = nb, .group = group, .slot_row = slot_row, .w = w, .ys = ys,
                   .gu_out = gu, .h = h, .out = out, .hi = xi, .sh = sh, .T = T, .K = K,
                   .A = A, .D = D, .F = F, .next = {0, 0}, .done = {0, 0}, .kind = kind,
                   .piece = {dsmoe_piece_rows(F, threads), dsmoe_piece_rows(D, threads)},
                   .status = 0};
    if (!status) status = moe_jobs(&m, xs, gate_up, gu_scale, gu_zero, sx);
    if (!status) {
#ifdef _OPENMP
        if (threads > 1 && F >= 64 * threads) {
#pragma omp parallel num_threads(threads)
            moe_thread(&m);
        } else
#endif
            moe_thread(&m);
        status = m.status;
    }
    (void)threads;
    dsmoe_int4_end(m.gu4), dsmoe_int4_end(m.dn4);
    free(ibuf), free(fbuf), free(xi), free(m.xb);
    return status;
}

/* --- multi-head attention for one decode step ---------------------------------------------
 *
 * Why: at one query per sequence, torch spends ~25 small ops per layer on RoPE, the cache
 * write and SDPA (whose CPU flash kernel alone takes ~0.1 ms for a few hundred keys): far
 * more than the arithmetic. Here, per sequence b:
 *   1. rotate the new key ("rotate half" RoPE with the given cos/sin) and write it and the
 *      new value into the cache at `slot`
 *   2. per query head h (key head h / (H / Hkv)): rotate the query, scores over slots
 *      [0, slot] (mask 0: skipped), softmax in fp32, the weighted sum of values
 * Tensors are fp32, or bf16 (bf16 = 1: inputs, cos/sin and cache; keys and values are
 * rounded to bf16 once, to nearest even, when written). q [B, H*d], k and v [B, Hkv*d],
 * cos and sin [B, d], keys and values [B, Hkv, S_max, d], mask uint8 [B, slot + 1] with
 * row stride mask_stride (0: one row for all) or NULL, out fp32 [B, H*d].
 * Returns 0, or -2 when out of memory. */
static inline float load_f(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_f(void *p, int64_t i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if (isnan(v)) u = 0x7fc00000u;
    else u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* x [d] rotated by cos/sin [d] ("rotate half": i pairs with i + d/2) into r [d]. */
static void rope(const void *x, const void *cos, const void *sin, int64_t d, int bf16,
                 float *r) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        float rot = i < half ? -load_f(x, i + half, bf16) : load_f(x, i - half, bf16);
        r[i] = load_f(x, i, bf16) * load_f(cos, i, bf16) + rot * load_f(sin, i, bf16);
    }
}

/* One query head over slots [0, n): out [d] (fp32). s is scratch of n floats. */
static void attend_head(const float *qr, const void *keys, const void *values,
                        const uint8_t *mask, int64_t n, int64_t d, float scale, int bf16,
                        float *s, float *out) {
    fdot_fn dot = bf16 ? chosen()->bf16 : chosen()->f32; /* the matmuls' vector dots */
    size_t es = bf16 ? 2 : 4;
    float top = -INFINITY, total = 0.f;
    for (int64_t j = 0; j < n; j++) {
        if (mask && !mask[j]) continue;
        s[j] = dot(qr, (const char *)keys + j * d * es, d) * scale;
        top = fmaxf(top, s[j]);
    }
    for (int64_t i = 0; i < d; i++) out[i] = 0.f;
    for (int64_t j = 0; j < n; j++) {
        if (mask && !mask[j]) continue;
        float p = expf(s[j] - top);
        total += p;
        if (bf16) { /* two loops, so that each vectorises */
            const uint16_t *vj = (const uint16_t *)values + j * d;
            for (int64_t i = 0; i < d; i++) out[i] += p * bf16_to_float(vj[i]);
        } else {
            const float *vj = (const float *)values + j * d;
            for (int64_t i = 0; i < d; i++) out[i] += p * vj[i];
        }
    }
    for (int64_t i = 0; i < d; i++) out[i] /= total;
}

int dsmoe_attention_decode(const void *q, const void *k, const void *v, const void *cos,
                           const void *sin, void *keys, void *values, const uint8_t *mask,
                           int64_t mask_stride, float *out, int64_t B, int64_t H,
                           int64_t Hkv, int64_t d, int64_t S_max, int64_t slot, float scale,
                           int bf16) {
    size_t es = bf16 ? 2 : 4;
    float *scratch = malloc((size_t)(slot + 1 + 2 * d) * sizeof *scratch);
    if (!scratch) return -2;
    float *r = scratch + slot + 1;
    for (int64_t b = 0; b < B; b++) {
        const char *cb = (const char *)cos + b * d * es, *sb = (const char *)sin + b * d * es;
        for (int64_t g = 0; g < Hkv; g++) {
            int64_t at = ((b * Hkv + g) * S_max + slot) * d, src = (b * Hkv + g) * d;
            rope((const char *)k + src * es, cb, sb, d, bf16, r);
            for (int64_t i = 0; i < d; i++) {
                store_f(keys, at + i, r[i], bf16);
                store_f(values, at + i, load_f(v, src + i, bf16), bf16);
            }
        }
        for (int64_t h = 0; h < H; h++) {
            int64_t g = h / (H / Hkv), base = (b * Hkv + g) * S_max * d;
            rope((const char *)q + (b * H + h) * d * es, cb, sb, d, bf16, r);
            attend_head(r, (const char *)keys + base * es, (const char *)values + base * es,
                        mask ? mask + b * mask_stride : NULL, slot + 1, d, scale, bf16,
                        scratch, out + (b * H + h) * d);
        }
    }
    free(scratch);
    return 0;
}
