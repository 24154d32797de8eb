/* int4 weights times a few activation rows, for decoding on CPU, and their dequantizer.
 *
 *   out[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = (q[n, k] - 8) * s[n, k/g] + z[n, k/g]
 *   q: dsmoe's canonical nibbles uint8 [N, K/2] (element 2j in the low nibble of byte j,
 *      2j+1 in the high one), s, z bf16 [N, G], g = K / G a multiple of 32; z may be NULL
 *      (symmetric, Q4_0-like: w = (q - 8) * s). x fp32 [M, K], out fp32 [M, N].
 *
 * Why this form: reading the on-disk layout directly means no second, kernel-specific copy
 * of the weights (torch's int4 kernel needs its own opaque packing, which cannot be turned
 * back cheaply). The dot products run in integers, the way llama.cpp's Q4_0 x Q8_0 does:
 * each activation row is quantized per block of 32 to int8 (x ~ dx[b] * xi[k], |xi| <= 127)
 * and the unsigned nibbles meet the signed activations in one u8 x s8 multiply-add
 * (vpdpbusd with AVX512-VNNI; vpmaddubsw + vpmaddwd without). Splitting the weight,
 *   sum_k x w = sum_b s dx[b] sum_{k in b} q xi  +  sum_g (z - 8 s) sum_{k in g} x,
 * the first term is integer per block, the second uses the exact float sums of x per group
 * (computed once per activation row), so the only approximation is the int8 activation
 * (at most dx[b] / 2 per element, the same as llama.cpp's Q8_0 activations).
 * The activations are stored in the order the unpacked nibbles come out of a vector (low
 * nibbles, then the high ones), so unpacking a weight vector is an AND, a shift and an AND:
 * no shuffles in the inner loop.
 * Overflow: a u8 x s8 product is at most 15 * 127; an int32 lane adds at most eight of them
 * (vpmaddubsw's int16 pairs at most four) before it is converted to float per step.
 *
 * The avx512 paths take 128 weights (64 bytes) per step and four weight rows per pass at
 * one or two activation rows (two at three or four), so each activation vector is loaded
 * once for several weight rows and every accumulator is independent: at K = 1280 this ran
 * ~2.2x (g = 128) to ~2.6x (g = 32) faster than one 64-weight step per row, which was
 * bound by instruction count, not memory. Four rows read side by side defeat the hardware
 * prefetcher when the weights stream from DRAM (a stack of experts streamed at 0.6x the
 * old kernel's rate), so each step prefetches into L2 the line of the rows four passes
 * ahead: then 1.6-2x the old rate (L1 prefetches, or two passes ahead, did not help).
 * The weights are read in dsmoe's canonical layout
 * (no repacked copy). Activation rows are taken four at a time per weight row.
 * Code paths: 3 avx512vnni, 2 avx512 (f+bw), 1 avx2, 0 portable; picked at run time like
 * rows_matmul.c's (dsmoe/native.py builds both files into one library).
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

#define QMAX 127.f
#define TILE 4 /* activation rows per pass over a weight row */

static inline float bf16f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The activation rows, quantized: xi int8 [M, K] in the code path's order, dx [M, K/32] the
 * block scales, dxe [M, K/8] those scales spread over the avx512 int32 lanes (see the wide
 * order below), xs [M, G] the exact sums per weight group. */
typedef struct {
    int8_t *xi;
    float *dx, *dxe, *xs;
    int64_t K, G;
    int32_t *plan; /* avx512: per step of 128, which weight scale each int32 lane takes */
} acts_t;

/* Narrow order (one block of 32 = 16 bytes of weights; avx2, portable, and the avx512 paths'
 * last K % 128 elements): low nibbles are the even elements, so element c + 2 j + odd is
 * stored at c + 16 odd + j. Wide order (avx512: 128 elements = 64 bytes per step, split
 * into a vector of low nibbles and one of high nibbles): element c + 32 blk + 2 j + odd at
 * c + 64 odd + 16 blk + j, so int32 lane l of either vector holds block blk = l / 4. */
#define WIDE 128

/* The portable quantizer, narrow order only (the avx512 paths have their own). Returns
 * -1 when x is not finite. */
static int quantize_narrow(const float *x, int64_t M, int64_t g, acts_t *a) {
    int64_t K = a->K, nb = K / 32;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int8_t *xi = a->xi + m * K;
        for (int64_t b = 0; b < nb; b++) {
            float amax = 0.f;
            for (int64_t k = 32 * b; k < 32 * b + 32; k++) amax = fmaxf(amax, fabsf(xm[k]));
            if (!isfinite(amax)) return -1;
            float dx = amax / QMAX, inv = dx > 0.f ? 1.f / dx : 0.f;
            a->dx[m * nb + b] = dx;
            for (int64_t j = 0; j < 16; j++)
                for (int64_t odd = 0; odd < 2; odd++)
                    xi[32 * b + 16 * odd + j] = (int8_t)lrintf(xm[32 * b + 2 * j + odd] * inv);
        }
        for (int64_t grp = 0; grp < a->G; grp++) {
            float sum = 0.f;
            for (int64_t k = grp * g; k < (grp + 1) * g; k++) sum += xm[k];
            if (!isfinite(sum)) return -1; /* fmaxf above passes NaN by */
            a->xs[m * a->G + grp] = sum;
        }
    }
    return 0;
}

/* The weight-side scalars of group grp: scale, and the offset z - 8 s. */
static inline float group_scale(const uint16_t *s, int64_t grp) { return bf16f(s[grp]); }
static inline float group_low(const uint16_t *s, const uint16_t *z, int64_t grp) {
    return (z ? bf16f(z[grp]) : 0.f) - 8.f * bf16f(s[grp]);
}

/* res[r] += sum_g (z - 8 s) * xs[m0 + r, g] over groups [g0, G) (the vector paths do the
 * groups below g0 themselves). Local sums: accumulating in res would go through memory. */
static void offset_terms(const uint16_t *s, const uint16_t *z, const acts_t *a, int64_t m0,
                         int R, int64_t g0, float *res) {
    float sum[TILE] = {0.f};
    for (int64_t grp = g0; grp < a->G; grp++) {
        float low = group_low(s, z, grp);
        for (int r = 0; r < R; r++) sum[r] += low * a->xs[(m0 + r) * a->G + grp];
    }
    for (int r = 0; r < R; r++) res[r] += sum[r];
}

/* nw <= NWMAX consecutive weight rows (q [nw, K/2], s, z [nw, G]) against activation rows
 * m0 .. m0 + R - 1: res[w * TILE + r] = the dot of weight row w and activation row r. */
#define NWMAX 4
typedef void (*tile_fn)(const uint8_t *q, const uint16_t *s, const uint16_t *z, int nw,
                        const acts_t *a, int64_t m0, int R, int64_t g, float *res);

static void row_portable(const uint8_t *q, const uint16_t *s, const uint16_t *z,
                         const acts_t *a, int64_t m0, int R, int64_t g, float *res) {
    int64_t K = a->K, nb = K / 32;
    for (int r = 0; r < R; r++) res[r] = 0.f;
    offset_terms(s, z, a, m0, R, 0, res);
    for (int64_t b = 0; b < nb; b++) {
        float sc = group_scale(s, b / (g / 32));
        const uint8_t *qb = q + 16 * b;
        for (int r = 0; r < R; r++) {
            const int8_t *xb = a->xi + (m0 + r) * K + 32 * b;
            int32_t isum = 0;
            for (int j = 0; j < 16; j++)
                isum += (qb[j] & 15) * xb[j] + (qb[j] >> 4) * xb[16 + j];
            res[r] += sc * a->dx[(m0 + r) * nb + b] * (float)isum;
        }
    }
}

/* A one-row kernel applied to each of the nw weight rows. */
#define EACH_ROW(NAME, ROW)                                                                  \
    static void NAME(const uint8_t *q, const uint16_t *s, const uint16_t *z, int nw,         \
                     const acts_t *a, int64_t m0, int R, int64_t g, float *res) {            \
        int64_t G = a->K / g;                                                                \
        for (int w = 0; w < nw; w++)                                                         \
            ROW(q + w * (a->K / 2), s + w * G, z ? z + w * G : NULL, a, m0, R, g,             \
                res + w * TILE);                                                             \
    }
EACH_ROW(tile_portable, row_portable)

#if defined(__x86_64__)
/* One block of 32 (16 bytes of weights) with 256-bit vectors: the avx2 path, and the avx512
 * paths' last blocks when K is not a multiple of 128. */
#define NARROW_BLOCK(q, a, m0, R, b, sc, res)                                                \
    do {                                                                                     \
        __m128i v = _mm_loadu_si128((const __m128i *)((q) + 16 * (b)));                     \
        __m128i m4 = _mm_set1_epi8(0x0F);                                                    \
        __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4),               \
                                     _mm_and_si128(v, m4));                                  \
        for (int r = 0; r < (R); r++) {                                                      \
            __m256i xv = _mm256_loadu_si256(                                                 \
                (const __m256i *)((a)->xi + ((m0) + r) * (a)->K + 32 * (b)));                \
            __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), _mm256_set1_epi16(1)); \
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1)); \
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));                                \
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));                                \
            (res)[r] += (sc) * (a)->dx[((m0) + r) * ((a)->K / 32) + (b)] *                   \
                        (float)_mm_cvtsi128_si32(h);                                         \
        }                                                                                    \
    } while (0)

__attribute__((target("avx2,fma")))
static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* avx2: per block, the 8 int32 lanes all belong to that block, so the float accumulators
 * take one fused multiply-add with the block's combined scale. */
__attribute__((target("avx2,fma")))
static inline __m256 bf16x8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma"), always_inline))
static inline void row_avx2_r(const uint8_t *q, const uint16_t *s, const uint16_t *z,
                              const acts_t *a, int64_t m0, const int R, int64_t g, float *res) {
    int64_t K = a->K, nb = K / 32, grp = 0;
    __m256 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (; grp + 8 <= a->G; grp += 8) { /* the offsets, eight groups at a time */
        __m256 sc = bf16x8(s + grp);
        __m256 low = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sc,
                                      z ? bf16x8(z + grp) : _mm256_setzero_ps());
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(low, _mm256_loadu_ps(a->xs + (m0 + r) * a->G + grp), acc[r]);
    }
    for (int r = 0; r < R; r++) res[r] = 0.f;
    offset_terms(s, z, a, m0, R, grp, res);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0, grp = 0; grp < a->G; grp++) {
      float sc = group_scale(s, grp);
      for (int64_t end = b + g / 32; b < end; b++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(q + 16 * b));
        __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
        for (int r = 0; r < R; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(a->xi + (m0 + r) * K + 32 * b));
            __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
            __m256 f = _mm256_set1_ps(sc * a->dx[(m0 + r) * nb + b]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; r++) res[r] += hsum8(acc[r]);
}

/* A constant R for each call lets the compiler keep the accumulators in registers. */
__attribute__((target("avx2,fma")))
static void row_avx2(const uint8_t *q, const uint16_t *s, const uint16_t *z, const acts_t *a,
                     int64_t m0, int R, int64_t g, float *res) {
    switch (R) {
        case 1: row_avx2_r(q, s, z, a, m0, 1, g, res); break;
        case 2: row_avx2_r(q, s, z, a, m0, 2, g, res); break;
        case 3: row_avx2_r(q, s, z, a, m0, 3, g, res); break;
        default: row_avx2_r(q, s, z, a, m0, TILE, g, res); break;
    }
}
EACH_ROW(tile_avx2, row_avx2)

/* --- avx512 ---------------------------------------------------------------------------- */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 bf16x16_masked(const uint16_t *p, __mmask16 in) {
    __m256i half = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)in, p));
    __m512i wide = _mm512_cvtepu16_epi32(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* Rows m0 .. m0 + M - 1 of x into a, wide order where 128 elements remain, else narrow;
 * vectorised (the portable loop cost as much as the dot products at K = 1280). */
__attribute__((target("avx512f,avx512bw")))
static int quantize_wide(const float *x, int64_t M, int64_t g, acts_t *a) {
    int64_t K = a->K, nb = K / 32;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *dx = a->dx + m * nb, *xs = a->xs + m * a->G, group_sum = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            __m512 lo = _mm512_loadu_ps(xm + 32 * b), hi = _mm512_loadu_ps(xm + 32 * b + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi)); /* nan for inf and nan */
            if (!isfinite(amax) || !isfinite(sum)) return -1;
            group_sum += sum;
            if ((32 * b + 32) % g == 0) xs[(32 * b) / g] = group_sum, group_sum = 0.f;
            dx[b] = amax / QMAX;
            __m512 inv = _mm512_set1_ps(dx[b] > 0.f ? 1.f / dx[b] : 0.f);
            int64_t c = b * 32 / WIDE * WIDE, half = c + WIDE <= K ? WIDE / 2 : 16;
            int64_t at = half == 16 ? 32 * b : c + 16 * (b % 4); /* the even elements */
            for (int par = 0; par < 2; par++) {
                __m512 v = _mm512_permutex2var_ps(lo, par ? odd : even, hi);
                __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv)); /* nearest, as lrintf */
                _mm_storeu_si128((__m128i *)(a->xi + m * K + at + par * half),
                                 _mm512_cvtsepi32_epi8(i));
            }
        }
        for (int64_t c = 0; c + WIDE <= K; c += WIDE)
            for (int lane = 0; lane < 16; lane++)
                a->dxe[m * (K / 8) + c / 8 + lane] = dx[c / 32 + lane / 4];
    }
    return 0;
}

/* The weight scales of the int32 lanes (lane l: block c / 32 + l / 4) come from a window
 * of 16 groups held in a register per weight row (the whole row up to K = 16 g), picked per
 * step by a permutation that depends only on K and g: planned once per call, 16 int32 per
 * step, each lane's group relative to its window's first. Loading and converting the
 * scales in every step cost a third of the kernel. */
#define PLAN 16
#define WINDOW 16 /* groups */
static void plan_scales(int64_t K, int64_t g, int32_t *plan) {
    for (int64_t c = 0; c + WIDE <= K; c += WIDE) {
        int64_t first = c / (WINDOW * g) * WINDOW; /* g % 8 == 0: windows start at a step */
        for (int lane = 0; lane < 16; lane++)
            plan[c / WIDE * PLAN + lane] = (int32_t)((c + 32 * (lane / 4)) / g - first);
    }
}

/* The scales of groups [first, first + 16) of one row as floats (those past G are 0). */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 scale_window(const uint16_t *s, int64_t first, int64_t G) {
    return bf16x16_masked(s + first, G - first >= 16 ? 0xFFFF : (__mmask16)((1u << (G - first)) - 1));
}

#define UNROLL _Pragma("GCC unroll 4") /* every loop over acc: constant indices keep it in registers */
/* The offset terms (z - 8 s) * xs of NW weight rows and R activation rows, summed 16
 * groups at a time into the lanes of acc (the tile's starting values). Each weight row's
 * offsets and each activation row's group sums are loaded once per 16 groups for the
 * whole tile: loaded per pair instead, they cost 14-25% of a prefill tile (K = 1280 and
 * 768, g = 128 and 32). Per pair the sums are the same, in the same order. */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void offsets_tile512(const uint16_t *s, const uint16_t *z, const acts_t *a,
                                   int64_t m0, const int R, const int NW,
                                   __m512 acc[NWMAX][TILE]) {
    int64_t G = a->G;
    UNROLL for (int w = 0; w < NW; w++)
        UNROLL for (int r = 0; r < R; r++) acc[w][r] = _mm512_setzero_ps();
    for (int64_t grp = 0; grp < G; grp += 16) {
        __mmask16 in = G - grp >= 16 ? 0xFFFF : (__mmask16)((1u << (G - grp)) - 1);
        __m512 low[NWMAX];
        UNROLL for (int w = 0; w < NW; w++)
            low[w] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), bf16x16_masked(s + w * G + grp, in),
                                      z ? bf16x16_masked(z + w * G + grp, in) : _mm512_setzero_ps());
        UNROLL for (int r = 0; r < R; r++) {
            __m512 xs = _mm512_maskz_loadu_ps(in, a->xs + (m0 + r) * G + grp);
            UNROLL for (int w = 0; w < NW; w++) acc[w][r] = _mm512_fmadd_ps(low[w], xs, acc[w][r]);
        }
    }
}

/* NW weight rows x R activation rows, 128 weights per step: one 64-byte load per weight row
 * gives a vector of low and one of high nibbles whose int32 lanes are in the same block, so
 * both dot products go into one int32 vector (DOT2), converted and scaled once. The
 * activation vectors and their scales are loaded once for the NW weight rows. */
#define TILE_AVX512(NAME, TARGET, DOT2)                                                      \
    __attribute__((target(TARGET), always_inline))                                           \
    static inline void NAME##_t(const uint8_t *q, const uint16_t *s, const uint16_t *z,      \
                                const acts_t *a, int64_t m0, const int R, const int NW,      \
                                int64_t g, float *res) {                                     \
        int64_t K = a->K, G = a->G, c = 0;                                                   \
        __m512 acc[NWMAX][TILE];                                                             \
        offsets_tile512(s, z, a, m0, R, NW, acc);                                            \
        const __m512i m4 = _mm512_set1_epi8(0x0F);                                           \
        for (int64_t first = 0; c + WIDE <= K; first += WINDOW) {                            \
          __m512 win[NWMAX];                                                                 \
          UNROLL for (int w = 0; w < NW; w++) win[w] = scale_window(s + w * G, first, G);    \
          for (int64_t end = c + WINDOW * g; c + WIDE <= K && c < end; c += WIDE) {          \
            __m512i lo[NWMAX], hi[NWMAX];                                                    \
            __m512 sv[NWMAX];                                                                \
            __m512i pick = _mm512_load_si512(a->plan + c / WIDE * PLAN);                     \
            UNROLL for (int w = 0; w < NW; w++) {                                            \
                _mm_prefetch((const char *)(q + (4 * NW + w) * (K / 2) + c / 2), _MM_HINT_T1); \
                __m512i v = _mm512_loadu_si512(q + w * (K / 2) + c / 2);                     \
                lo[w] = _mm512_and_si512(v, m4);                                             \
                hi[w] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);                       \
                sv[w] = _mm512_permutexvar_ps(pick, win[w]);                                 \
            }                                                                                \
            UNROLL for (int r = 0; r < R; r++) {                                             \
                const int8_t *xr = a->xi + (m0 + r) * K + c;                                 \
                __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);       \
                __m512 dx = _mm512_loadu_ps(a->dxe + (m0 + r) * (K / 8) + c / 8);            \
                UNROLL for (int w = 0; w < NW; w++)                                          \
                    acc[w][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DOT2(lo[w], x0, hi[w], x1)), \
                                                _mm512_mul_ps(dx, sv[w]), acc[w][r]);        \
            }                                                                                \
          }                                                                                  \
        }                                                                                    \
        UNROLL for (int w = 0; w < NW; w++)                                                  \
            UNROLL for (int r = 0; r < R; r++) res[w * TILE + r] = _mm512_reduce_add_ps(acc[w][r]); \
        for (int w = 0; w < NW; w++) {                                                       \
            const uint8_t *qw = q + w * (K / 2);                                             \
            for (int64_t b = c / 32; b < K / 32; b++) { /* K % 128: narrow blocks */         \
                float sc = group_scale(s + w * G, b * 32 / g);                               \
                NARROW_BLOCK(qw, a, m0, R, b, sc, res + w * TILE);                           \
            }                                                                                \
        }                                                                                    \
    }

/* Constant R and NW per call keep the accumulators in registers: four weight rows at
 * R <= 2 (8 accumulators), two at R > 2 (32 vector registers in all). */
#define TILE_BY_SHAPE(NAME, TARGET)                                                          \
    __attribute__((target(TARGET)))                                                          \
    static void NAME(const uint8_t *q, const uint16_t *s, const uint16_t *z, int nw,         \
                     const acts_t *a, int64_t m0, int R, int64_t g, float *res) {            \
        int64_t G = a->K / g, w = 0, hk = a->K / 2;                                          \
        if (R <= 2 && nw == 4) {                                                             \
            if (R == 1) NAME##_t(q, s, z, a, m0, 1, 4, g, res);                              \
            else NAME##_t(q, s, z, a, m0, 2, 4, g, res);                                     \
            return;                                                                          \
        }                                                                                    \
        for (; R > 2 && w + 2 <= nw; w += 2) {                                               \
            if (R == 3) NAME##_t(q + w * hk, s + w * G, z ? z + w * G : NULL, a, m0, 3, 2, g, res + w * TILE); \
            else NAME##_t(q + w * hk, s + w * G, z ? z + w * G : NULL, a, m0, TILE, 2, g, res + w * TILE); \
        }                                                                                    \
        for (; w < nw; w++) {                                                                \
            const uint8_t *qw = q + w * hk;                                                  \
            const uint16_t *sw = s + w * G, *zw = z ? z + w * G : NULL;                      \
            switch (R) {                                                                     \
                case 1: NAME##_t(qw, sw, zw, a, m0, 1, 1, g, res + w * TILE); break;         \
                case 2: NAME##_t(qw, sw, zw, a, m0, 2, 1, g, res + w * TILE); break;         \
                case 3: NAME##_t(qw, sw, zw, a, m0, 3, 1, g, res + w * TILE); break;         \
                default: NAME##_t(qw, sw, zw, a, m0, TILE, 1, g, res + w * TILE); break;     \
            }                                                                                \
        }                                                                                    \
    }

#define DOT2_VNNI(lo, x0, hi, x1) \
    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0), hi, x1)
/* u8 x s8 pair sums are at most 2 * 15 * 127, so the two add in int16 without saturating */
#define DOT2_BW(lo, x0, hi, x1)                                                          \
    _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, x0), _mm512_maddubs_epi16(hi, x1)), \
                      _mm512_set1_epi16(1))
TILE_AVX512(tile_avx512vnni, "avx512f,avx512bw,avx512vnni,avx2,fma", DOT2_VNNI)
TILE_AVX512(tile_avx512, "avx512f,avx512bw,avx2,fma", DOT2_BW)
TILE_BY_SHAPE(tile_avx512vnni, "avx512f,avx512bw,avx512vnni,avx2,fma")
TILE_BY_SHAPE(tile_avx512, "avx512f,avx512bw,avx2,fma")
#endif

/* --- code path choice (as in rows_matmul.c, with its own level 3) ------------------- */
static int pick4(int limit) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (limit >= 3 && avx512 && __builtin_cpu_supports("avx512vnni")) return 3;
    if (limit >= 2 && avx512) return 2;
    if (limit >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    (void)limit;
    return 0;
}

static int isa4 = -1;

int dsmoe_int4_isa(void) {
    if (isa4 < 0) isa4 = pick4(3);
    return isa4;
}

/* Restrict the code path to at most `limit`; returns the path now in use. Not
 * thread-safe: call it before any matmul. */
int dsmoe_int4_limit_isa(int limit) {
    isa4 = pick4(limit);
    return isa4;
}

static tile_fn tile_kernel(int level) {
#if defined(__x86_64__)
    if (level == 3) return tile_avx512vnni;
    if (level == 2) return tile_avx512;
    if (level == 1) return tile_avx2;
#endif
    (void)level;
    return tile_portable;
}

/* --- blocks matmul -------------------------------------------------------------------- */
typedef struct {
    const int64_t *blocks;
    int64_t nb, N, K, g;
    const uint8_t *q;
    const uint16_t *s, *z;
    const acts_t *a;
    tile_fn tile;
    float *out;
} job4_t;

/* Outputs [n0, n1) of block b (expert, first row, rows), as in rows_matmul.c. */
static void int4_block(const job4_t *j, int64_t b, int64_t n0, int64_t n1) {
    int64_t G = j->K / j->g;
    int64_t e = j->blocks[3 * b], first = j->blocks[3 * b + 1], rows = j->blocks[3 * b + 2];
    for (int64_t n = n0; n < n1; n += NWMAX) {
        int nw = n1 - n < NWMAX ? (int)(n1 - n) : NWMAX;
        int64_t wrow = e * j->N + n;
        const uint8_t *q = j->q + wrow * (j->K / 2);
        const uint16_t *s = j->s + wrow * G, *z = j->z ? j->z + wrow * G : NULL;
        for (int64_t m = 0; m < rows; m += TILE) {
            int R = rows - m < TILE ? (int)(rows - m) : TILE;
            float res[NWMAX * TILE];
            j->tile(q, s, z, nw, j->a, first + m, R, j->g, res);
            for (int w = 0; w < nw; w++)
                for (int r = 0; r < R; r++)
                    j->out[(first + m + r) * j->N + n + w] = res[w * TILE + r];
        }
    }
}

/* Every block's outputs in pieces of `piece` rows (dsmoe_piece_rows: a multiple of NWMAX, so tiles stay
 * whole), each taken by whichever thread asks next (*next counts the pieces handed out).
 * Why not a fixed range per thread: on a shared machine one thread is often descheduled
 * for a while, and a fixed split then waits for it at the region's end (two threads
 * measured slower than one); with pieces the running thread takes over the rest. */
static void int4_pieces(const job4_t *j, int64_t piece, int64_t *next) {
    int64_t per = (j->N + piece - 1) / piece, total = j->nb * per;
    for (int64_t i; (i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t n0 = i % per * piece;
        int4_block(j, i / per, n0, n0 + piece < j->N ? n0 + piece : j->N);
    }
}

/* The matmul in parts, for a caller that runs its own parallel region (rows_matmul.c's
 * experts decode step): dsmoe_int4_begin quantizes x on one thread, dsmoe_int4_slice
 * computes outputs [n0, n1) of every block (threads at once on disjoint ranges),
 * dsmoe_int4_end frees. */
typedef struct int4_mm {
    job4_t job;
    acts_t a;
} int4_mm_t;

/* q [E, N, K/2], s and z [E, N, G] (z may be NULL), x [P, K]; `blocks` as in
 * rows_matmul.c. *mm: the matmul, or NULL when the status is not 0 (-1 x not finite, -2
 * out of memory, -3 bad group). */
int dsmoe_int4_begin(int4_mm_t **mm, const float *x, const uint8_t *q, const uint16_t *s,
                     const uint16_t *z, float *out, int64_t P, const int64_t *blocks,
                     int64_t nb, int64_t N, int64_t K, int64_t g) {
    *mm = NULL;
    if (g < 32 || (g != 32 && g % 64) || K % g) return -3; /* see lane_scales */
    int level = dsmoe_int4_isa();
    int64_t rows = P > 0 ? P : 1;
    /* one buffer: the matmul, plan [K/128, PLAN], xi [rows, K] (all 64-byte aligned),
     * dx [rows, K/32], dxe [rows, K/8], xs [rows, G] */
    size_t head = (sizeof(int4_mm_t) + 63) / 64 * 64;
    size_t plan = (size_t)(K / WIDE * PLAN) * sizeof(int32_t), xi = ((size_t)(rows * K) + 63) / 64 * 64;
    size_t floats = (size_t)(rows * (K / 32 + K / 8 + K / g));
    char *buf = aligned_alloc(64, (head + plan + xi + floats * sizeof(float) + 63) / 64 * 64);
    if (!buf) return -2;
    int4_mm_t *m = (int4_mm_t *)buf;
    buf += head;
    acts_t *a = &m->a;
    *a = (acts_t){.plan = (int32_t *)buf, .xi = (int8_t *)(buf + plan), .K = K, .G = K / g};
    a->dx = (float *)(buf + plan + xi);
    a->dxe = a->dx + rows * (K / 32);
    a->xs = a->dxe + rows * (K / 8);
    plan_scales(K, g, a->plan);
    int status;
#if defined(__x86_64__)
    if (level >= 2) status = quantize_wide(x, P, g, a);
    else
#endif
        status = quantize_narrow(x, P, g, a);
    if (status) {
        free(m);
        return status;
    }
    m->job = (job4_t){.blocks = blocks, .nb = nb, .N = N, .K = K, .g = g, .q = q, .s = s,
                      .z = z, .a = a, .tile = tile_kernel(level), .out = out};
    *mm = m;
    return 0;
}

void dsmoe_int4_slice(const void *mm, int64_t n0, int64_t n1) {
    const job4_t *j = &((const int4_mm_t *)mm)->job;
    for (int64_t b = 0; b < j->nb; b++) int4_block(j, b, n0, n1);
}

void dsmoe_int4_end(int4_mm_t *mm) { free(mm); }

/* The whole matmul on `threads` threads; returns dsmoe_int4_begin's status. */
int dsmoe_int4_blocks_matmul(const float *x, const uint8_t *q, const uint16_t *s,
                             const uint16_t *z, float *out, int64_t P, const int64_t *blocks,
                             int64_t nb, int64_t N, int64_t K, int64_t g, int threads) {
    int4_mm_t *mm;
    int status = dsmoe_int4_begin(&mm, x, q, s, z, out, P, blocks, nb, N, K, g);
    if (status) return status;
    int64_t next = 0, piece = dsmoe_piece_rows(N, threads);
#ifdef _OPENMP
    if (threads > 1 && N >= 64 * threads) {
#pragma omp parallel num_threads(threads)
        int4_pieces(&mm->job, piece, &next);
    } else
#endif
        int4_pieces(&mm->job, piece, &next);
    dsmoe_int4_end(mm);
    return 0;
}

/* One group of g weights (g/2 bytes at qb) as floats low + sc * q, fp32 or bf16, in order. */
typedef void (*deq_fn)(const uint8_t *qb, int64_t g, float sc, float low, void *out, int bf16);

static void deq_portable(const uint8_t *qb, int64_t g, float sc, float low, void *out,
                         int bf16) {
    for (int64_t j = 0; j < g / 2; j++) {
        float even = low + sc * (float)(qb[j] & 15), odd = low + sc * (float)(qb[j] >> 4);
        if (bf16) {
            ((uint16_t *)out)[2 * j] = f_to_bf16(even);
            ((uint16_t *)out)[2 * j + 1] = f_to_bf16(odd);
        } else {
            ((float *)out)[2 * j] = even;
            ((float *)out)[2 * j + 1] = odd;
        }
    }
}

#if defined(__x86_64__)
/* 16 bytes -> 32 weights: the nibbles interleaved back into element order, widened,
 * scaled; bf16 rounded to nearest even with integer ops (weights are finite). */
__attribute__((target("avx512f,avx512bw")))
static void deq_avx512(const uint8_t *qb, int64_t g, float sc, float low, void *out, int bf16) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m512 vs = _mm512_set1_ps(sc), vl = _mm512_set1_ps(low);
    for (int64_t j = 0; j < g / 2; j += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(qb + j));
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m128i half[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int h = 0; h < 2; h++) {
            __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(half[h])), vs, vl);
            int64_t at = 2 * j + 16 * h;
            if (bf16) {
                __m512i u = _mm512_castps_si512(w);
                __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            } else {
                _mm512_storeu_ps((float *)out + at, w);
            }
        }
    }
}
#endif

/* The float weight [N, K] (fp32, or bf16 when out_bf16) of q, s, z: prefill runs a GEMM on
 * it, one matrix at a time. Returns 0, or -3 for a bad group. */
int dsmoe_int4_dequantize(const uint8_t *q, const uint16_t *s, const uint16_t *z, void *out,
                          int out_bf16, int64_t N, int64_t K, int64_t g, int threads) {
    if (g < 32 || g % 32 || K % g) return -3;
    int64_t G = K / g, size = out_bf16 ? 2 : 4;
    deq_fn deq = deq_portable;
#if defined(__x86_64__)
    if (dsmoe_int4_isa() >= 2) deq = deq_avx512;
#endif
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
#endif
    for (int64_t n = 0; n < N; n++)
        for (int64_t grp = 0; grp < G; grp++)
            deq(q + n * (K / 2) + grp * (g / 2), g, group_scale(s + n * G, grp),
                group_low(s + n * G, z ? z + n * G : NULL, grp),
                (char *)out + (n * K + grp * g) * size, out_bf16);
    return 0;
}

/* --- llama.cpp's Q4_0 blocks -> symmetric int4 ------------------------------------------ */
static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        u |= sign;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    uint32_t u = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    memcpy(&f, &u, sizeof f);
    return f;
}

/* n Q4_0 blocks (18 bytes: fp16 d, then 16 bytes holding element j in the low nibble of
 * byte j and element j + 16 in its high nibble) -> q [n, 16] in the canonical order (element
 * 2i low, 2i + 1 high) and scale bf16 [n] = d rounded to bf16. The values are the same
 * 4-bit numbers: nothing is dequantized. */
void dsmoe_q4_0_to_int4(const uint8_t *blocks, uint8_t *q, uint16_t *scale, int64_t n) {
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *blk = blocks + 18 * b;
        scale[b] = f_to_bf16(f16_to_float((uint16_t)(blk[0] | (blk[1] << 8))));
        uint8_t v[32];
        for (int j = 0; j < 16; j++) {
            v[j] = blk[2 + j] & 15;
            v[j + 16] = blk[2 + j] >> 4;
        }
        for (int i = 0; i < 16; i++) q[16 * b + i] = (uint8_t)(v[2 * i] | (v[2 * i + 1] << 4));
    }
}
