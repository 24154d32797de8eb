/* The small steps of a CPU decode step between the weight kernels, in the model's dtype.
 *
 * Why: a quantized (or bf16) model runs bf16 activations while the kernels of
 * rows_matmul.c / int4_matmul.c take and return fp32 rows. Around every kernel call torch
 * used to cast twice, and the norms, the shared experts' activation and the routing
 * were a handful of small aten ops each: at one token per step these cost more than
 * their arithmetic (issue 17 measured ~170 aten ops, ~0.33 ms, per layer). Here each is
 * one call that reads and writes the activations in their own dtype (bf16 = 1: bf16,
 * else fp32; results rounded once, to nearest even):
 *   linear:  out = x @ W.T (+ bias), W fp32 / bf16 / int8 / int4 (the existing kernels)
 *   swiglu:  out = down(silu(gate x) * up x), all three matrices of one kind, fp32 inside
 *   rmsnorm: [s = x + delta, rounded], out = weight * round(s / sqrt(mean(s^2) + eps))
 *   experts, attention: rows_matmul.c's one-call decode steps, reading and writing the
 *            activations' dtype
 *   mla:     Multi-head Latent Attention's whole absorbed step over its latent cache (below)
 *   router:  fp32 gate logits, softmax or sigmoid scores, (bias-corrected, group-limited)
 *            top-k, gate weights (optionally divided by their sum) times the scaling
 *            factor: every DeepSeek generation's routing
 * Matrices: kind 0 fp32, 1 bf16 ([N, K]); 2 int8 with bf16 scales [N]; 3 int4 nibbles
 * [N, K/2] with bf16 scales and zeros [N, G] in groups of `group` (zeros NULL: symmetric).
 * Returns 0; -1 an activation is not finite (int8 / int4: the caller takes torch's path),
 * -2 out of memory, -3 an int4 group size the kernel does not take.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dsmoe_kernels.h"

static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t narrow(float f) { /* nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (isnan(f)) return (uint16_t)((u >> 16) | 0x40); /* quiet, sign kept */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float get(const void *p, int64_t i, int bf16) {
    return bf16 ? widen(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* n values of p (bf16 or fp32) as fp32 into dst. */
static void to_f32(const void *p, int bf16, int64_t n, float *dst) {
    if (!bf16) {
        memcpy(dst, p, (size_t)n * sizeof *dst);
        return;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = widen(((const uint16_t *)p)[i]);
}

/* fp32 src into n values of p (bf16 rounded, or fp32). */
static void from_f32(const float *src, int64_t n, void *p, int bf16) {
    if (!bf16) {
        memcpy(p, src, (size_t)n * sizeof *src);
        return;
    }
    for (int64_t i = 0; i < n; i++) ((uint16_t *)p)[i] = narrow(src[i]);
}

/* One weight matrix [N, K] of any kind (see the header). */
typedef struct {
    const void *w;
    const uint16_t *scale, *zero;
} mat_t;

/* x fp32 [M, K] @ m.T -> out fp32 [M, N] by the kind's kernel. */
static int matmul(int kind, const mat_t *m, int64_t group, const float *x, int64_t M,
                  int64_t N, int64_t K, float *out, int threads) {
    const int64_t one[3] = {0, 0, M}; /* one block: matrix 0 times every row */
    if (kind == 2)
        return dsmoe_int8_blocks_matmul(x, m->w, m->scale, out, M, one, 1, N, K, threads);
    if (kind == 3)
        return dsmoe_int4_blocks_matmul(x, m->w, m->scale, m->zero, out, M, one, 1, N, K,
                                        group, threads);
    return dsmoe_float_blocks_matmul(x, m->w, kind == 1, out, one, 1, N, K, threads);
}

/* out [M, N] = x [M, K] @ W.T (+ bias [N], same dtype as out); x and out in their dtypes. */
int dsmoe_linear_decode(const void *x, int x_bf16, int64_t M, int kind, const void *w,
                        const uint16_t *scale, const uint16_t *zero, int64_t group,
                        const void *bias, int64_t N, int64_t K, void *out, int out_bf16,
                        int threads) {
    float *xf = x_bf16 ? malloc((size_t)(M * K) * sizeof *xf) : (float *)x;
    float *of = out_bf16 ? malloc((size_t)(M * N) * sizeof *of) : (float *)out;
    int status = (!xf || !of) ? -2 : 0;
    if (!status) {
        if (x_bf16) to_f32(x, 1, M * K, xf);
        mat_t m = {w, scale, zero};
        status = matmul(kind, &m, group, xf, M, N, K, of, threads);
    }
    for (int64_t i = 0; !status && bias && i < M * N; i++) of[i] += get(bias, i % N, out_bf16);
    if (!status && out_bf16) from_f32(of, M * N, out, 1);
    if (x_bf16) free(xf);
    if (out_bf16) free(of);
    return status;
}

/* out [M, D] = down(silu(gate x) * up x) for x [M, D] (gate, up [F, D]; down [D, F]): a
 * dense SwiGLU MLP (the shared experts) in one call; fp32 from the kernels to the one
 * rounding of out, as the routed experts' decode step. */
/* of [M, D] (+)= down(silu(gate xf) * up xf) for xf fp32 [M, D], m = {gate, up, down}. */
static int swiglu_f32(const float *xf, int64_t M, int kind, const mat_t m[3], int64_t group,
                      int64_t D, int64_t F, float *of, int add, int threads) {
    float *buf = malloc((size_t)(M * (2 * F + (add ? D : 0))) * sizeof *buf);
    if (!buf) return -2;
    float *g = buf, *u = g + M * F, *y = add ? u + M * F : of;
    int status = matmul(kind, &m[0], group, xf, M, F, D, g, threads);
    if (!status) status = matmul(kind, &m[1], group, xf, M, F, D, u, threads);
    for (int64_t i = 0; !status && i < M * F; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    if (!status) status = matmul(kind, &m[2], group, g, M, D, F, y, threads);
    for (int64_t i = 0; !status && add && i < M * D; i++) of[i] += y[i];
    free(buf);
    return status;
}

int dsmoe_swiglu_decode(const void *x, int64_t M, int bf16, int kind, const void *gate,
                        const uint16_t *gate_scale, const uint16_t *gate_zero, const void *up,
                        const uint16_t *up_scale, const uint16_t *up_zero, const void *down,
                        const uint16_t *down_scale, const uint16_t *down_zero, int64_t group,
                        int64_t D, int64_t F, void *out, int threads) {
    float *buf = malloc((size_t)(2 * M * D) * sizeof *buf);
    if (!buf) return -2;
    float *xf = buf, *of = xf + M * D;
    to_f32(x, bf16, M * D, xf);
    const mat_t m[3] = {{gate, gate_scale, gate_zero}, {up, up_scale, up_zero},
                        {down, down_scale, down_zero}};
    int status = swiglu_f32(xf, M, kind, m, group, D, F, of, 0, threads);
    if (!status) from_f32(of, M * D, out, bf16);
    free(buf);
    return status;
}

/* RMSNorm of rows x [M, D] (model/norm.py's order: fp32 mean square, normalised values
 * rounded to the dtype, then times weight [D] and rounded again). With delta: first the
 * residual add s = x + delta (rounded, as torch's add), written to sum [M, D], and s is
 * normalised. All tensors in one dtype. */
int dsmoe_rmsnorm_decode(const void *x, const void *delta, void *sum, const void *weight,
                         void *out, int64_t M, int64_t D, float eps, int bf16) {
    float *s = malloc((size_t)D * sizeof *s);
    if (!s) return -2;
    for (int64_t m = 0; m < M; m++) {
        double total = 0.0; /* torch's mean sums pairwise in fp32; double is closer to both */
        for (int64_t i = 0; i < D; i++) {
            float v = get(x, m * D + i, bf16);
            if (delta) v += get(delta, m * D + i, bf16);
            if (delta && bf16) v = widen(narrow(v));
            s[i] = v;
            float sq = v * v;
            total += sq;
        }
        if (delta) from_f32(s, D, (char *)sum + m * D * (bf16 ? 2 : 4), bf16);
        float inv = 1.f / sqrtf((float)total / (float)D + eps);
        for (int64_t i = 0; i < D; i++) {
            float y = s[i] * inv;
            if (bf16) y = widen(narrow(y));
            float o = get(weight, i, bf16) * y;
            if (bf16) ((uint16_t *)out)[m * D + i] = narrow(o);
            else ((float *)out)[m * D + i] = o;
        }
    }
    free(s);
    return 0;
}

/* Routing of decode rows (every method of moe/router.py; the torch path's order of
 * operations, so the same experts and fp32 weights to a few ulp):
 *   logits = x @ gate.T (fp32); scores = softmax (exp(l - max) / sum, as torch) or sigmoid
 *   choice = scores (+ bias [E], fp32: V3 steers the selection, never the weights)
 *   method 0: the K best choices of all E experts (V1)
 *          1, 2: only inside the `keep` best of `groups` contiguous expert groups, ranked
 *          by their best choice (1: V2 group-limited, device-limited) or by the sum of their
 *          two best (2: V3 noaux_tc); experts of the other groups never win
 *   idx = the picks in descending order of choice, a tie to the lower expert / group id
 *   weight = scores[idx] (/ (their sum + 1e-20) with renorm) * scaling
 * x [T, D] bf16 or fp32, gate [E, D] fp32 or bf16. Outputs: logits and scores fp32 [T, E],
 * idx int64 [T, K], topk_score and weight fp32 [T, K]. Returns -1 when a logit or a bias is
 * not finite (torch's path handles it), -2 out of memory. */

/* One row's scores p [E] from its logits l [E]; -1 when a logit is not finite. */
static int score_row(const float *l, int64_t E, int sigmoid, float *p) {
    float top = -INFINITY, total = 0.f;
    for (int64_t e = 0; e < E; e++) {
        if (!isfinite(l[e])) return -1;
        top = fmaxf(top, l[e]);
    }
    if (sigmoid) {
        for (int64_t e = 0; e < E; e++) p[e] = 1.f / (1.f + expf(-l[e]));
        return 0;
    }
    for (int64_t e = 0; e < E; e++) total += p[e] = expf(l[e] - top);
    float inv = 1.f / total;
    for (int64_t e = 0; e < E; e++) p[e] *= inv;
    return 0;
}

/* The index of the largest v[i] (i < n) with taken[i] == 0, marked taken; the first of
 * equals wins (torch's topk keeps the lower index of a tie). -1 when all are taken. */
static int64_t take_best(const float *v, int64_t n, unsigned char *taken) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    if (best >= 0) taken[best] = 1;
    return best;
}

/* Marks taken every expert of c [E] outside the `keep` best of `groups` groups (method
 * 1: a group's best choice ranks it, 2: the sum of its best two). gs [G], gt [G] work. */
static void mask_groups(const float *c, int64_t E, int method, int64_t groups, int64_t keep,
                        float *gs, unsigned char *gt, unsigned char *taken) {
    int64_t size = E / groups;
    for (int64_t g = 0; g < groups; g++) {
        float a = -INFINITY, b = -INFINITY; /* the group's best and second best */
        for (int64_t e = g * size; e < (g + 1) * size; e++) {
            if (c[e] > a) b = a, a = c[e];
            else if (c[e] > b) b = c[e];
        }
        gs[g] = method == 2 ? a + b : a;
        gt[g] = 0;
    }
    for (int64_t j = 0; j < keep; j++) take_best(gs, groups, gt);
    for (int64_t e = 0; e < E; e++) taken[e] = !gt[e / size]; /* the other groups' experts never win */
}

int dsmoe_route_decode(const void *x, int bf16, int64_t T, const void *gate, int gate_bf16,
                       int64_t E, int64_t D, int64_t K, int sigmoid, const float *bias,
                       int method, int64_t groups, int64_t keep, int renorm, float scaling,
                       float *logits, float *scores, int64_t *idx, float *topk_score,
                       float *weight, int threads) {
    mat_t m = {gate, NULL, NULL};
    float *xf = bf16 ? malloc((size_t)(T * D) * sizeof *xf) : (float *)x;
    float *work = malloc((size_t)(E + groups) * (sizeof(float) + 1));
    int status = (!xf || !work) ? -2 : 0;
    if (!status && bf16) to_f32(x, 1, T * D, xf);
    if (!status) status = matmul(gate_bf16, &m, 0, xf, T, E, D, logits, threads);
    float *c = work, *gs = c + E;
    unsigned char *taken = (unsigned char *)(gs + groups), *gt = taken + E;
    for (int64_t e = 0; !status && bias && e < E; e++)
        if (!isfinite(bias[e])) status = -1;
    for (int64_t t = 0; !status && t < T; t++) {
        float *p = scores + t * E, picked = 0.f;
        status = score_row(logits + t * E, E, sigmoid, p);
        for (int64_t e = 0; e < E; e++) c[e] = bias ? p[e] + bias[e] : p[e];
        if (method) mask_groups(c, E, method, groups, keep, gs, gt, taken);
        else memset(taken, 0, (size_t)E);
        for (int64_t k = 0; !status && k < K; k++) {
            int64_t best = take_best(c, E, taken);
            if (best < 0) status = -1; /* fewer experts allowed than K: torch's path */
            else idx[t * K + k] = best, picked += topk_score[t * K + k] = p[best];
        }
        for (int64_t k = 0; !status && k < K; k++) {
            float w = topk_score[t * K + k];
            weight[t * K + k] = (renorm ? w / (picked + 1e-20f) : w) * scaling;
        }
    }
    if (bf16) free(xf);
    free(work);
    return status;
}

/* rows_matmul.c's dsmoe_experts_decode with x [T, D] and out [T, D] in their dtypes, plus
 * (shared_kind >= 0) the shared experts' SwiGLU (`shared`: gate, its scale, its zero, then
 * up's and down's, width Fs) added before the one rounding: a MoE layer's whole FFN. */
int dsmoe_experts_decode_dtype(const void *x, int x_bf16, const int64_t *idx, const float *w,
                               int64_t T, int64_t K, int kind, const void *gate_up,
                               const uint16_t *gu_scale, const uint16_t *gu_zero,
                               const void *down, const uint16_t *dn_scale,
                               const uint16_t *dn_zero, int64_t group, int64_t E, int64_t D,
                               int64_t F, int shared_kind, const void *const *shared,
                               int64_t shared_group, int64_t Fs, void *out, int out_bf16,
                               int64_t *counts, int threads) {
    float *xf = x_bf16 ? malloc((size_t)(T * D) * sizeof *xf) : (float *)x;
    float *of = out_bf16 ? malloc((size_t)(T * D) * sizeof *of) : (float *)out;
    int status = (!xf || !of) ? -2 : 0;
    if (!status && x_bf16) to_f32(x, 1, T * D, xf);
    if (!status)
        status = dsmoe_experts_decode(xf, idx, w, T, K, kind, gate_up, gu_scale, gu_zero, down,
                                      dn_scale, dn_zero, group, E, D, F, of, counts, threads);
    if (!status && shared_kind >= 0) {
        const mat_t m[3] = {{shared[0], shared[1], shared[2]}, {shared[3], shared[4], shared[5]},
                            {shared[6], shared[7], shared[8]}};
        status = swiglu_f32(xf, T, shared_kind, m, shared_group, D, Fs, of, 1, threads);
        if (status == -3) status = -4; /* the int4 kernel's bad group size, as the experts' */
    }
    if (!status && out_bf16) from_f32(of, T * D, out, 1);
    if (x_bf16) free(xf);
    if (out_bf16) free(of);
    return status;
}

/* rows_matmul.c's dsmoe_attention_decode with out [B, H*d] in the inputs' dtype. */
int dsmoe_attention_decode_dtype(const void *q, const void *k, const void *v, const void *cos,
                                 const void *sin, void *keys, void *values,
                                 const uint8_t *mask, int64_t mask_stride, void *out,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t d, int64_t S_max,
                                 int64_t slot, float scale, int bf16) {
    float *of = bf16 ? malloc((size_t)(B * H * d) * sizeof *of) : (float *)out;
    if (!of) return -2;
    int status = dsmoe_attention_decode(q, k, v, cos, sin, keys, values, mask, mask_stride, of,
                                        B, H, Hkv, d, S_max, slot, scale, bf16);
    if (!status && bf16) from_f32(of, B * H * d, out, 1);
    if (bf16) free(of);
    return status;
}

/* --- Multi-head Latent Attention's decode step over the latent cache in one call -----------
 * (model/mla.py's absorbed form).
 *
 * Why: at one query per sequence, torch runs the absorbed form as ~270 small aten ops per
 * layer, and its SDPA (enable_gqa) copies the shared latent cache once per head: at
 * DeepSeek-V2-Lite's shape and 128 cached tokens ~10 ms per layer and token on one core,
 * for ~5 M multiply-adds. Here, per sequence b (after q_proj and kv_a_proj_with_mqa):
 *   latent = [rmsnorm(c_kv) * norm_w | rope(k_rope)] written into the cache at `slot`
 *   per head h: q_lat = q_nope W_UK[h] ([n] x [n, C]), q = [q_lat | rope(q_rope)]
 *               p = softmax(scale * q . latent[t] over the slots t <= slot the mask allows)
 *               out[h] = W_UV[h] (sum_t p[t] latent[t, :C])
 * in the model's dtype (bf16 = 1: bf16, else fp32) with torch's roundings where they are
 * state or cheap to keep (the cached latent, the rotations, q_lat and the attention's
 * output are rounded to the dtype as torch rounds them), fp32 sums otherwise; out rounded
 * once. RoPE: the half layout ([x1, x2] -> x cos + [-x2, x1] sin) or, interleaved, pairs
 * (2i, 2i+1) returned in the half layout, as model/rope.py.
 * Tensors: q [B, H*(n+r)], kv [B, C+r], norm_w [C], cos/sin [B, r], latents one layer of
 * the cache [B, S_max, C+r], w_kv_b [H*(n+v), C] (per head: n key rows, then v value
 * rows), mask uint8 rows [B or 1, slot+1] (stride 0: one row for all) or NULL, out
 * [B, H*v]. Returns 0, or -2 out of memory.
 */

/* f as torch's result in the dtype: bf16 rounds it, fp32 keeps it. */
static inline float rnd(float f, int bf16) { return bf16 ? widen(narrow(f)) : f; }

/* dst [r] fp32 = x [r] rotated by cos/sin [r], each product and sum rounded as torch's. */
static void rope(const void *x, const void *cos, const void *sin, int64_t r, int interleaved,
                 int bf16, float *dst) {
    int64_t h = r / 2;
    for (int64_t i = 0; i < h; i++) {
        int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + h;
        float x1 = get(x, a, bf16), x2 = get(x, b, bf16);
        float c1 = get(cos, i, bf16), s1 = get(sin, i, bf16);
        float c2 = interleaved ? c1 : get(cos, i + h, bf16);
        float s2 = interleaved ? s1 : get(sin, i + h, bf16);
        dst[i] = rnd(rnd(x1 * c1, bf16) + rnd(-x2 * s1, bf16), bf16);
        dst[i + h] = rnd(rnd(x2 * c2, bf16) + rnd(x1 * s2, bf16), bf16);
    }
}

typedef struct {
    const void *q, *kv, *norm_w, *cos, *sin, *w;
    void *latents;
    const uint8_t *mask;
    int64_t mask_stride, B, H, n, r, v, C, S_max, slot;
    float eps, scale;
    int interleaved, bf16;
} mla_t;

/* Sequence b's new latent into the cache at the slot: [norm(c_kv) | rope(k_rope)]. Returns
 * the norm's status (-2: out of memory, nothing written). */
static int write_latent(const mla_t *m, int64_t b, float *tmp) {
    int64_t W = m->C + m->r, at = (b * m->S_max + m->slot) * W;
    char *row = (char *)m->latents + at * (m->bf16 ? 2 : 4);
    const char *kv = (const char *)m->kv + b * W * (m->bf16 ? 2 : 4);
    int status = dsmoe_rmsnorm_decode(kv, NULL, NULL, m->norm_w, row, 1, m->C, m->eps, m->bf16);
    if (status) return status;
    int64_t off = m->C * (m->bf16 ? 2 : 4), cs = b * m->r * (m->bf16 ? 2 : 4);
    rope(kv + off, (const char *)m->cos + cs, (const char *)m->sin + cs, m->r, m->interleaved,
         m->bf16, tmp);
    from_f32(tmp, m->r, row + off, m->bf16);
    return 0;
}

/* qc [C + r] fp32: head h's query of sequence b in the latent space, [q_nope W_UK | rope]. */
static void absorb(const mla_t *m, int64_t b, int64_t h, float *qc) {
    int64_t C = m->C, es = m->bf16 ? 2 : 4;
    const char *q = (const char *)m->q + (b * m->H + h) * (m->n + m->r) * es;
    memset(qc, 0, (size_t)C * sizeof *qc);
    for (int64_t i = 0; i < m->n; i++) { /* row by row: an axpy the compiler vectorises */
        float a = get(q, i, m->bf16);
        int64_t at = (h * (m->n + m->v) + i) * C;
        if (m->bf16)
            for (int64_t c = 0; c < C; c++) qc[c] += a * widen(((const uint16_t *)m->w)[at + c]);
        else
            for (int64_t c = 0; c < C; c++) qc[c] += a * ((const float *)m->w)[at + c];
    }
    for (int64_t c = 0; m->bf16 && c < C; c++) qc[c] = rnd(qc[c], 1); /* torch's einsum */
    int64_t cs = b * m->r * es;
    rope(q + m->n * es, (const char *)m->cos + cs, (const char *)m->sin + cs, m->r,
         m->interleaved, m->bf16, qc + C);
}

/* Head h of sequence b from its scores s [T] (T = slot + 1): softmax, the weighted latent
 * o [C] (rounded as SDPA's output), then W_UV -> of [v] fp32. */
static int attend(const mla_t *m, int64_t b, int64_t h, float *s, float *o, float *of) {
    int64_t T = m->slot + 1, C = m->C, W = C + m->r;
    const uint8_t *allow = m->mask ? m->mask + b * m->mask_stride : NULL;
    float top = -INFINITY, total = 0.f;
    for (int64_t t = 0; t < T; t++)
        if (!allow || allow[t]) top = fmaxf(top, s[t] * m->scale);
    for (int64_t t = 0; t < T; t++)
        total += s[t] = (!allow || allow[t]) ? expf(s[t] * m->scale - top) : 0.f;
    memset(o, 0, (size_t)C * sizeof *o);
    const char *lat = (const char *)m->latents + b * m->S_max * W * (m->bf16 ? 2 : 4);
    for (int64_t t = 0; t < T && total > 0.f; t++) { /* none allowed: zeros, as SDPA's */
        float p = s[t] / total;
        if (p == 0.f) continue;
        if (m->bf16)
            for (int64_t c = 0; c < C; c++) o[c] += p * widen(((const uint16_t *)lat)[t * W + c]);
        else
            for (int64_t c = 0; c < C; c++) o[c] += p * ((const float *)lat)[t * W + c];
    }
    for (int64_t c = 0; m->bf16 && c < C; c++) o[c] = rnd(o[c], 1);
    const int64_t one[3] = {0, 0, 1};
    const char *w_uv = (const char *)m->w + (h * (m->n + m->v) + m->n) * C * (m->bf16 ? 2 : 4);
    return dsmoe_float_blocks_matmul(o, w_uv, m->bf16, of, one, 1, m->v, C, 1);
}

/* Sequence b: the cache write, every head's query, the scores of all heads against the
 * cached latents in one matmul, then each head's softmax and values. */
static int sequence(const mla_t *m, int64_t b, float *buf, float *of, int threads) {
    int64_t H = m->H, W = m->C + m->r, T = m->slot + 1;
    float *qc = buf, *s = qc + H * W, *o = s + H * T;
    int status = write_latent(m, b, o);
    if (status) return status;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t h = 0; h < H; h++) absorb(m, b, h, qc + h * W);
    const int64_t all[3] = {0, 0, H};
    const char *lat = (const char *)m->latents + b * m->S_max * W * (m->bf16 ? 2 : 4);
    status = dsmoe_float_blocks_matmul(qc, lat, m->bf16, s, all, 1, T, W, threads);
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static) reduction(|:failed)
    for (int64_t h = 0; h < H; h++)
        failed |= attend(m, b, h, s + h * T, o + h * m->C, of + h * m->v) != 0;
    return status ? status : failed ? -2 : 0;
}

int dsmoe_mla_decode(const void *q, const void *kv, const void *norm_w, float eps,
                     const void *cos, const void *sin, int interleaved, void *latents,
                     const uint8_t *mask, int64_t mask_stride, const void *w_kv_b, void *out,
                     int64_t B, int64_t H, int64_t n, int64_t r, int64_t v, int64_t C,
                     int64_t S_max, int64_t slot, float scale, int bf16, int threads) {
    mla_t m = {q, kv, norm_w, cos, sin, w_kv_b, latents, mask, mask_stride, B, H, n, r, v,
               C, S_max, slot, eps, scale, interleaved, bf16};
    int64_t T = slot + 1;
    float *buf = malloc((size_t)(H * (C + r + T + C) + B * H * v) * sizeof *buf);
    if (!buf) return -2;
    float *of = buf + H * (C + r + T + C);
    int status = 0;
    for (int64_t b = 0; !status && b < B; b++) status = sequence(&m, b, buf, of + b * H * v, threads);
    if (!status) from_f32(of, B * H * v, out, bf16);
    free(buf);
    return status;
}
