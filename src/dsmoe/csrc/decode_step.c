/* A whole CPU decode step of a Transformer in one call: embedding rows -> L blocks ->
 * final norm -> lm_head logits, for batch <= 8 rows of one new token each.
 *
 * Why: the per-module decode path (dsmoe.model, each module calling one native op)
 * spends ~3.5 ms per token of the 2B shape outside the weight kernels: ~83 ctypes calls
 * and ~60 aten ops per layer of Python module calls and argument marshalling, which do
 * not shrink with threads. Here a plan built once per decoder (dsmoe.decode.NativeDecoder)
 * holds every pointer and shape, and the step calls the same entry points the modules
 * call (decode_ops.c, rows_matmul.c) in the same order, so the output is the per-module
 * path's (same roundings to the activation dtype; fp32 sums aside):
 *   x = embed[token]
 *   per layer: h = norm(x); a = attention(h): MHA (q, k, v = linears(h); RoPE, cache
 *              write at `slot`, softmax over the valid slots) or MLA (queries, the latent
 *              projection, then decode_ops.c's absorbed attention over the LatentCache);
 *              x, h = x + o(a), norm(x + o(a));
 *              f = experts(route(h)) + shared(h), or a dense SwiGLU(h); x = x + f
 *   logits = head(norm(x)) in the activation dtype, widened to fp32
 * MHA attention runs one task per (row, key/value head) on the kernels' OpenMP pool (the
 * per-module call is single-threaded), each writing its heads of the output rounded to
 * the activation dtype. Routing goes through route() only (every method of decode_ops.c's
 * dsmoe_route_decode), so routing kinds to come plug in there.
 *
 * Returns 0; -1 an activation or logit is not finite (the caller redoes the step through
 * the modules, whose torch fallbacks handle it; the cache slot is rewritten there),
 * -2 out of memory, -4 an int4 group size the kernels do not take, -5 a position beyond
 * the RoPE table, -6 a token id outside the vocabulary, -7 an unknown routing kind.
 *
 * Shapes: B rows, D hidden, H / Hkv query / key-value heads, d head dim, S_max cache slots,
 * E experts, K picks, F expert width, V vocabulary; MLA: n / r nope / rope dims of a query,
 * v of a value, C latent rank, Q q_lora_rank (0: a full q_proj).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe_kernels.h"

/* One weight matrix [N, K] and its optional bias [N] (activation dtype); kinds as in
 * decode_ops.c: 0 fp32, 1 bf16, 2 int8, 3 int4. */
typedef struct {
    int64_t kind, group, N, K;
    const void *w, *scale, *zero, *bias;
} step_op;

typedef struct {
    const void *in_norm, *post_norm; /* [D] */
    float in_eps, post_eps;
    step_op q, k, v, o;  /* MLA: q_proj (or q_b_proj), kv_a_proj_with_mqa, -, o_proj */
    void *keys, *values; /* this layer's cache [B, Hkv, S_max, d] */
    int64_t routing;     /* -1: a dense SwiGLU FFN; 0: decode_ops.c's dsmoe_route_decode */
    const void *gate;    /* router [E, D], fp32 or bf16 */
    const float *bias;   /* the selection bias [E] (V3) or NULL */
    int64_t gate_bf16, E, top_k, renorm, sigmoid, method, groups, keep;
    float scaling;
    int64_t ekind, egroup, F; /* routed experts: gate_up [E, 2F, D], down [E, D, F] */
    const void *gate_up, *gu_scale, *gu_zero, *down, *dn_scale, *dn_zero;
    int64_t skind, sgroup, Fs; /* the dense MLP or the shared experts (skind -1: none) */
    const void *shared[9];     /* gate, its scale, its zero, then up's and down's */
    /* MLA only (step_model.mla): */
    step_op q_a;                  /* q_a_proj [Q, D] (Q 0: none) */
    const void *q_norm, *kv_norm; /* q_a_layernorm [Q], kv_a_layernorm [C] */
    float q_eps, kv_eps, mla_scale;
    int64_t interleaved;          /* the rope layout of model/rope.py: 1 pairs, 0 halves */
    const void *kv_b;             /* kv_b_proj's weight [H*(n+v), C], the activation dtype */
    void *latents;                /* this layer's LatentCache [B, S_max, C+r] */
} step_layer;

typedef struct {
    int64_t n_layers, B, D, H, Hkv, d, S_max, V, bf16, max_E, max_K;
    float final_eps, attn_scale;
    const void *embed, *final_norm; /* [V, D], [D] */
    const void *cos, *sin;          /* RoPE table [S_max, d] (MLA: [S_max, r]) by position */
    step_op head;
    const step_layer *layers;
    int64_t mla, n, r, v, C, Q; /* mla 0: MHA layers (the rest unused) */
} step_model;

/* Work buffers, carved from one block the caller allocates once per decoder. */
typedef struct {
    char *x, *h, *q, *k, *v, *att, *o, *ffn, *head;
    char *qa, *qn, *cos, *sin; /* MLA: q_a_proj's output and its norm [B, Q]; RoPE [B, r] */
    float *logits, *scores, *topk, *weight;
    int64_t *idx, *counts;
} step_bufs;

static char *take(char **at, size_t bytes) {
    char *p = *at;
    *at += (bytes + 63) & ~(size_t)63;
    return p;
}

/* Lays the buffers out from base (NULL: only counts) and returns the bytes they span. */
static size_t carve(const step_model *m, char *base, step_bufs *b) {
    size_t es = m->bf16 ? 2 : 4, B = (size_t)m->B, D = (size_t)m->D;
    size_t qd = (size_t)(m->H * m->d), kvd = (size_t)(m->Hkv * m->d), ad = qd;
    if (m->mla) /* q [B, H*(n+r)], k the latent projection [B, C+r], att [B, H*v] */
        qd = (size_t)(m->H * (m->n + m->r)), kvd = (size_t)(m->C + m->r), ad = (size_t)(m->H * m->v);
    size_t Q = (size_t)(m->mla ? m->Q : 0), r = (size_t)(m->mla ? m->r : 0);
    size_t EK = (size_t)(m->max_E > m->max_K ? m->max_E : m->max_K);
    char *at = base;
    b->x = take(&at, B * D * es);
    b->h = take(&at, B * D * es);
    b->q = take(&at, B * qd * es);
    b->k = take(&at, B * kvd * es);
    b->v = take(&at, B * kvd * es);
    b->att = take(&at, B * ad * es);
    b->o = take(&at, B * D * es);
    b->ffn = take(&at, B * D * es);
    b->head = take(&at, m->bf16 ? B * (size_t)m->V * es : 0);
    b->logits = (float *)take(&at, B * EK * 4);
    b->scores = (float *)take(&at, B * EK * 4);
    b->topk = (float *)take(&at, B * EK * 4);
    b->weight = (float *)take(&at, B * EK * 4);
    b->idx = (int64_t *)take(&at, B * EK * 8);
    b->counts = (int64_t *)take(&at, EK * 8);
    b->qa = take(&at, B * Q * es);
    b->qn = take(&at, B * Q * es);
    b->cos = take(&at, B * r * es);
    b->sin = take(&at, B * r * es);
    return (size_t)(at - base);
}

int64_t dsmoe_decode_step_scratch_bytes(const step_model *m) {
    step_bufs b;
    return (int64_t)carve(m, NULL, &b);
}

static int linear(const step_op *op, const void *x, int64_t M, void *out, int out_bf16,
                  int bf16, int threads) {
    return dsmoe_linear_decode(x, bf16, M, (int)op->kind, op->w, op->scale, op->zero,
                               op->group, op->bias, op->N, op->K, out, out_bf16, threads);
}

/* The seam for routing kinds: the picks idx [B, K] and their weights [B, K] of h. */
static int route(const step_model *m, const step_layer *l, const void *h, step_bufs *b,
                 int threads) {
    switch (l->routing) {
    case 0:
        return dsmoe_route_decode(h, (int)m->bf16, m->B, l->gate, (int)l->gate_bf16, l->E,
                                  m->D, l->top_k, (int)l->sigmoid, l->bias, (int)l->method,
                                  l->groups, l->keep, (int)l->renorm, l->scaling, b->logits,
                                  b->scores, b->idx, b->topk, b->weight, threads);
    default:
        return -7;
    }
}

/* RoPE, cache write and attention of every (row, key/value head) in parallel: each task
 * is the per-module kernel on one row and one head group, so the numerics are its own. */
static int mha_heads(const step_model *m, const step_layer *l, const step_bufs *b,
                     const int64_t *positions, const uint8_t *valid, int64_t slot,
                     int threads) {
    const int64_t H = m->H, Hkv = m->Hkv, d = m->d, Hg = H / Hkv, S = m->S_max;
    const int64_t es = m->bf16 ? 2 : 4, tasks = m->B * Hkv;
    int status = 0;
    for (int64_t r = 0; r < m->B; r++)
        if (positions[r] < 0 || positions[r] >= S) return -5;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : status)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t r = t / Hkv, g = t % Hkv, at = (r * Hkv + g) * S * d * es;
        const int64_t rope = positions[r] * d * es;
        int s = dsmoe_attention_decode_dtype(
            b->q + (r * H + g * Hg) * d * es, b->k + (r * Hkv + g) * d * es,
            b->v + (r * Hkv + g) * d * es, (const char *)m->cos + rope,
            (const char *)m->sin + rope, (char *)l->keys + at, (char *)l->values + at,
            valid + r * S, 0, b->att + (r * H + g * Hg) * d * es, 1, Hg, 1, d, S, slot,
            m->attn_scale, (int)m->bf16);
        status = s < status ? s : status;
    }
    return status;
}

/* MLA's projections, then its latent norm, both rotations, the cache write, the absorbed
 * attention and W_UV in decode_ops.c's one call: the per-module path's calls in its order
 * (model/mla.py). That call takes cos/sin per row [B, r], gathered here from the table. */
static int mla_attention(const step_model *m, const step_layer *l, const step_bufs *b,
                         const int64_t *positions, const uint8_t *valid, int64_t slot,
                         int threads) {
    const int bf16 = (int)m->bf16;
    const int64_t B = m->B, r = m->r, es = bf16 ? 2 : 4;
    int s = 0;
    if (m->Q) { /* q_b_proj(q_a_layernorm(q_a_proj(h))) */
        s = linear(&l->q_a, b->h, B, b->qa, bf16, bf16, threads);
        if (!s) s = dsmoe_rmsnorm_decode(b->qa, NULL, NULL, l->q_norm, b->qn, B, m->Q, l->q_eps,
                                         bf16);
    }
    if (!s) s = linear(&l->q, m->Q ? b->qn : b->h, B, b->q, bf16, bf16, threads);
    if (!s) s = linear(&l->k, b->h, B, b->k, bf16, bf16, threads);
    if (s) return s;
    for (int64_t row = 0; row < B; row++) {
        if (positions[row] < 0 || positions[row] >= m->S_max) return -5;
        memcpy(b->cos + row * r * es, (const char *)m->cos + positions[row] * r * es, r * es);
        memcpy(b->sin + row * r * es, (const char *)m->sin + positions[row] * r * es, r * es);
    }
    return dsmoe_mla_decode(b->q, b->k, l->kv_norm, l->kv_eps, b->cos, b->sin,
                            (int)l->interleaved, l->latents, valid, m->S_max, l->kv_b, b->att,
                            B, m->H, m->n, r, m->v, m->C, m->S_max, slot, l->mla_scale, bf16,
                            threads);
}

/* The attention seam: a = attention(h) into b->att [B, H*d] (MLA: [B, H*v]). */
static int attention(const step_model *m, const step_layer *l, const step_bufs *b,
                     const int64_t *positions, const uint8_t *valid, int64_t slot,
                     int threads) {
    if (m->mla) return mla_attention(m, l, b, positions, valid, slot, threads);
    const int bf16 = (int)m->bf16;
    int s = linear(&l->q, b->h, m->B, b->q, bf16, bf16, threads);
    if (!s) s = linear(&l->k, b->h, m->B, b->k, bf16, bf16, threads);
    if (!s) s = linear(&l->v, b->h, m->B, b->v, bf16, bf16, threads);
    return s ? s : mha_heads(m, l, b, positions, valid, slot, threads);
}

/* One block; on entry b->h holds norm(x), on return b->ffn holds the FFN output (the
 * residual add is fused into the next norm). */
static int block(const step_model *m, const step_layer *l, step_bufs *b,
                 const int64_t *positions, const uint8_t *valid, int64_t slot, int threads) {
    const int bf16 = (int)m->bf16;
    const int64_t B = m->B, D = m->D;
    int s = attention(m, l, b, positions, valid, slot, threads);
    if (s) return s;
    s = linear(&l->o, b->att, B, b->o, bf16, bf16, threads);
    if (!s) s = dsmoe_rmsnorm_decode(b->x, b->o, b->x, l->post_norm, b->h, B, D, l->post_eps,
                                     bf16);
    if (s) return s;
    if (l->routing < 0)
        return dsmoe_swiglu_decode(b->h, B, bf16, (int)l->skind, l->shared[0], l->shared[1],
                                   l->shared[2], l->shared[3], l->shared[4], l->shared[5],
                                   l->shared[6], l->shared[7], l->shared[8], l->sgroup, D,
                                   l->Fs, b->ffn, threads);
    s = route(m, l, b->h, b, threads);
    if (!s)
        s = dsmoe_experts_decode_dtype(
            b->h, bf16, b->idx, b->weight, B, l->top_k, (int)l->ekind, l->gate_up, l->gu_scale,
            l->gu_zero, l->down, l->dn_scale, l->dn_zero, l->egroup, l->E, D, l->F,
            (int)l->skind, l->shared, l->sgroup, l->Fs, b->ffn, bf16, b->counts, threads);
    return s == -3 ? -1 : s; /* -3: an expert id out of range, i.e. a NaN routing */
}

/* One decode step: tokens [B], positions [B] (advanced by one on success), valid [B, S_max]
 * (1: a slot the row may attend to), the cache slot to write; logits fp32 [B, V]. */
int dsmoe_decode_step(const step_model *m, const int64_t *tokens, int64_t *positions,
                      const uint8_t *valid, int64_t slot, void *scratch, float *logits,
                      int threads) {
    step_bufs b;
    carve(m, scratch, &b);
    const int bf16 = (int)m->bf16;
    const int64_t B = m->B, D = m->D;
    const size_t row = (size_t)D * (bf16 ? 2 : 4);
    for (int64_t r = 0; r < B; r++) {
        if (tokens[r] < 0 || tokens[r] >= m->V) return -6;
        memcpy(b.x + r * row, (const char *)m->embed + tokens[r] * row, row);
    }
    int s = 0;
    for (int64_t i = 0; !s && i < m->n_layers; i++) {
        const step_layer *l = &m->layers[i];
        s = dsmoe_rmsnorm_decode(b.x, i ? b.ffn : NULL, i ? b.x : NULL, l->in_norm, b.h, B, D,
                                 l->in_eps, bf16);
        if (!s) s = block(m, l, &b, positions, valid, slot, threads);
    }
    if (!s) s = dsmoe_rmsnorm_decode(b.x, m->n_layers ? b.ffn : NULL, m->n_layers ? b.x : NULL,
                                     m->final_norm, b.h, B, D, m->final_eps, bf16);
    if (!s) s = linear(&m->head, b.h, B, bf16 ? (void *)b.head : (void *)logits, bf16, bf16,
                       threads);
    if (s) return s;
    if (bf16) /* the per-module path's logits are rounded to the dtype, then widened */
        for (int64_t i = 0; i < B * m->V; i++) {
            uint32_t u = (uint32_t)((const uint16_t *)b.head)[i] << 16;
            memcpy(&logits[i], &u, sizeof u);
        }
    for (int64_t r = 0; r < B; r++) positions[r]++;
    return 0;
}
