/* The entry points one C file of dsmoe's native library calls in another (they are built
 * into one shared library, see native.py). Every file includes this header, so the
 * compiler checks each definition against the declaration its callers use: a changed
 * signature cannot silently disagree between files. */
#ifndef DSMOE_KERNELS_H
#define DSMOE_KERNELS_H
#include <stdint.h>

/* rows_matmul.c: the int8 / float row kernels, the experts and attention decode steps */
int dsmoe_int8_blocks_matmul(const float *x, const int8_t *q, const uint16_t *scale,
                             float *out, int64_t P, const int64_t *blocks, int64_t nb,
                             int64_t N, int64_t K, int threads);
int dsmoe_float_blocks_matmul(const float *x, const void *w, int w_bf16, float *out,
                              const int64_t *blocks, int64_t nb, int64_t N, int64_t K,
                              int threads);
int dsmoe_experts_decode(const float *x, const int64_t *idx, const float *w, int64_t T,
                         int64_t K, int kind, const void *gate_up, const uint16_t *gu_scale,
                         const uint16_t *gu_zero, const void *down, const uint16_t *dn_scale,
                         const uint16_t *dn_zero, int64_t group, int64_t E, int64_t D,
                         int64_t F, float *out, int64_t *counts, int threads);
int dsmoe_attention_decode(const void *q, const void *k, const void *v, const void *cos,
                           const void *sin, void *keys, void *values, const uint8_t *mask,
                           int64_t mask_stride, float *out, int64_t B, int64_t H,
                           int64_t Hkv, int64_t d, int64_t S_max, int64_t slot, float scale,
                           int bf16);

int64_t dsmoe_piece_rows(int64_t N, int threads); /* rows per piece of a threaded matmul */

/* int4_matmul.c: the int4 matmul, whole or in parts (begin, slices on any threads, end) */
int dsmoe_int4_blocks_matmul(const float *x, const uint8_t *q, const uint16_t *s,
                             const uint16_t *z, float *out, int64_t P, const int64_t *blocks,
                             int64_t nb, int64_t N, int64_t K, int64_t g, int threads);
struct int4_mm;
int dsmoe_int4_begin(struct int4_mm **mm, const float *x, const uint8_t *q, const uint16_t *s,
                     const uint16_t *z, float *out, int64_t P, const int64_t *blocks,
                     int64_t nb, int64_t N, int64_t K, int64_t g);
void dsmoe_int4_slice(const void *mm, int64_t n0, int64_t n1);
void dsmoe_int4_end(struct int4_mm *mm);

/* decode_ops.c: the decode step's ops in the activations' dtype */
int dsmoe_linear_decode(const void *x, int x_bf16, int64_t M, int kind, const void *w,
                        const uint16_t *scale, const uint16_t *zero, int64_t group,
                        const void *bias, int64_t N, int64_t K, void *out, int out_bf16,
                        int threads);
int dsmoe_swiglu_decode(const void *x, int64_t M, int bf16, int kind, const void *gate,
                        const uint16_t *gate_scale, const uint16_t *gate_zero, const void *up,
                        const uint16_t *up_scale, const uint16_t *up_zero, const void *down,
                        const uint16_t *down_scale, const uint16_t *down_zero, int64_t group,
                        int64_t D, int64_t F, void *out, int threads);
int dsmoe_rmsnorm_decode(const void *x, const void *delta, void *sum, const void *weight,
                         void *out, int64_t M, int64_t D, float eps, int bf16);
int dsmoe_route_decode(const void *x, int bf16, int64_t T, const void *gate, int gate_bf16,
                       int64_t E, int64_t D, int64_t K, int sigmoid, const float *bias,
                       int method, int64_t groups, int64_t keep, int renorm, float scaling,
                       float *logits, float *scores, int64_t *idx, float *topk_score,
                       float *weight, int threads);
int dsmoe_experts_decode_dtype(const void *x, int x_bf16, const int64_t *idx, const float *w,
                               int64_t T, int64_t K, int kind, const void *gate_up,
                               const uint16_t *gu_scale, const uint16_t *gu_zero,
                               const void *down, const uint16_t *dn_scale,
                               const uint16_t *dn_zero, int64_t group, int64_t E, int64_t D,
                               int64_t F, int shared_kind, const void *const *shared,
                               int64_t shared_group, int64_t Fs, void *out, int out_bf16,
                               int64_t *counts, int threads);
int dsmoe_attention_decode_dtype(const void *q, const void *k, const void *v, const void *cos,
                                 const void *sin, void *keys, void *values,
                                 const uint8_t *mask, int64_t mask_stride, void *out,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t d, int64_t S_max,
                                 int64_t slot, float scale, int bf16);
int dsmoe_mla_decode(const void *q, const void *kv, const void *norm_w, float eps,
                     const void *cos, const void *sin, int interleaved, void *latents,
                     const uint8_t *mask, int64_t mask_stride, const void *w_kv_b, void *out,
                     int64_t B, int64_t H, int64_t n, int64_t r, int64_t v, int64_t C,
                     int64_t S_max, int64_t slot, float scale, int bf16, int threads);

#endif
