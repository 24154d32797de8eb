/* Weight-only int8 matrix times a few activation rows, for decoding on CPU.
 *
 *   out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *   x fp32 [M, K] (row-major), q int8 [N, K] (row-major), scale bf16 [N], out fp32 [M, N]
 *
 * Why a kernel of our own: a decode step multiplies every weight by one row, so it should
 * be bound by how fast the int8 weights stream from memory. torch's _weight_int8pack_mm
 * and a float multiply-add loop both spend ~3 vector instructions per 16 weights
 * (sign-extend, convert to float, FMA) and top out at ~8-10 GB/s on one core of the
 * machine in benchmarks/quantized.py. Here each activation row is first written as 16-bit
 * fixed point with one scale per row (x ~ sx[m] * xi[m, k], |xi| <= 32767), and the dot
 * products run in integers: sign-extend 32 weights to int16 and multiply-add pairs into
 * int32 (vpmaddwd), 2 instructions per 32 weights.
 *
 * Precision: the activation rounding error is at most max|x[m]| / 65534 per element, no
 * worse than the bf16 activations torch's int8 kernels use for every element within 128x
 * of the row's largest, and the int32 sums are exact; the weights are what they are.
 * Overflow: a product is at most 32767 * 127 < 2^22 and an int32 lane adds two of them per
 * 64 weights (avx512; per 32 with avx2), so a lane stays below 2^31 for CHUNK weights; lanes
 * are summed in int64 and chunks in float.
 *
 * Built at run time by dsmoe/quant/native.py (cc -O3 -shared, no torch headers); the ISA
 * is picked once from __builtin_cpu_supports, so one binary runs on any x86-64, and other
 * CPUs get the portable loop. With -fopenmp, `threads` > 1 splits the output rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

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
__attribute__((target("avx512f,avx512bw")))
static int64_t dot_avx512(const int16_t *x, const int8_t *w, int64_t K) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k)));
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + 32)));
        a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(w0, _mm512_loadu_si512(x + k)));
        a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(w1, _mm512_loadu_si512(x + k + 32)));
    }
    /* Lanes are < 2^31 by CHUNK; their sum need not be, so it is taken in int64. */
    __m512i wide = _mm512_add_epi64(
        _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a0)),
                         _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a0, 1))),
        _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a1)),
                         _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a1, 1))));
    return _mm512_reduce_add_epi64(wide) + dot_generic(x + k, w + k, K - k);
}

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

/* The fastest path this CPU supports, at most `limit` (2 avx512, 1 avx2, 0 portable). */
static dot_fn pick(int limit, int *isa) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (limit >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        *isa = 2;
        return dot_avx512;
    }
    if (limit >= 1 && __builtin_cpu_supports("avx2")) {
        *isa = 1;
        return dot_avx2;
    }
#endif
    (void)limit;
    *isa = 0;
    return dot_generic;
}

static dot_fn chosen_dot = 0;
static int chosen_isa = -1;

static dot_fn chosen(void) {
    if (!chosen_dot) chosen_dot = pick(2, &chosen_isa);
    return chosen_dot;
}

/* Which code path runs: 2 avx512, 1 avx2, 0 portable (reported by native.py). */
int dsmoe_int8_rows_isa(void) {
    chosen();
    return chosen_isa;
}

/* Restrict the code path to at most `limit` (tests run every path the CPU has); returns
 * the path now in use. Not thread-safe: call it before any matmul. */
int dsmoe_int8_rows_limit_isa(int limit) {
    chosen_dot = pick(limit, &chosen_isa);
    return chosen_isa;
}

/* x as 16-bit fixed point, one scale per row. Returns 0, or -1 when x holds inf/nan. */
static int to_fixed(const float *x, int16_t *xi, float *sx, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        if (!isfinite(amax)) return -1;
        float inv = amax > 0.f ? XMAX / amax : 0.f;
        sx[m] = amax / XMAX;
        for (int64_t k = 0; k < K; k++) xi[m * K + k] = (int16_t)lrintf(xm[k] * inv);
    }
    return 0;
}

static void rows(dot_fn dot, const int16_t *xi, const float *sx, const int8_t *q,
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

/* Returns 0 on success, -1 when x is not finite (the caller then takes another path),
 * -2 when out of memory. */
int dsmoe_int8_rows_matmul(const float *x, const int8_t *q, const uint16_t *scale, float *out,
                           int64_t M, int64_t N, int64_t K, int threads) {
    dot_fn dot = chosen();
    int16_t *xi = malloc((size_t)(M * K) * sizeof *xi + 64);
    float *sx = malloc((size_t)M * sizeof *sx);
    if (!xi || !sx) {
        free(xi);
        free(sx);
        return -2;
    }
    if (to_fixed(x, xi, sx, M, K)) {
        free(xi);
        free(sx);
        return -1;
    }
#ifdef _OPENMP
    if (threads > 1 && N >= 64 * threads) {
#pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            rows(dot, xi, sx, q, scale, out, M, N, K, N * t / T, N * (t + 1) / T);
        }
    } else
#else
    (void)threads;
#endif
        rows(dot, xi, sx, q, scale, out, M, N, K, 0, N);
    free(xi);
    free(sx);
    return 0;
}
