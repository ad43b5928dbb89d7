/* specd: rotary embedding of q and k in place in the fused projection's output, and the K/V store,
 * in one call per layer (the spec is specd_kernels/rope/ref.py). Built with -ffp-contract=off
 * (specd_kernels/cbuild.py): x * cos + flip(x) * sin rounds both products, then the sum, as HF does.
 * The cache holds fp32, or fp16 (kv_half) rounded to nearest even as torch's .to(torch.float16). */
#include <stdint.h>
#include <string.h>

#include "../half.h"
#include "../rows.h"

#define MAX_HEAD_DIM 512

/* qkv rows are row_stride floats apart, each [q heads | k heads | v heads] of head_dim floats;
 * cos, sin: [rows, head_dim] contiguous (sin sign-folded, see ref.py); caches: [slots, kv_heads,
 * head_dim] contiguous, num_slots of them, fp32 or (kv_half) fp16. Returns -1 when head_dim is too
 * large or odd, a slot is out of range or fp16 is asked of a build without it (nothing is written then). */
int rotate_and_store(float *qkv, int64_t rows, int64_t row_stride, const float *cos, const float *sin,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, void *k_cache, void *v_cache,
                     const int64_t *slots, int64_t num_slots, int64_t kv_half) {
    if (head_dim > MAX_HEAD_DIM || head_dim % 2 || (kv_half && !KV_HALF_SUPPORTED)) return -1;
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
    /* rows split across threads (specd_kernels/rows.h), each row's loops unchanged, so its bits too */
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; ++t) {
        float rotated[MAX_HEAD_DIM];
        float *row = qkv + t * row_stride;
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            float *x = row + h * head_dim;
            for (int64_t i = 0; i < half; ++i) rotated[i] = x[i] * c[i] + x[i + half] * s[i];
            for (int64_t i = half; i < head_dim; ++i) rotated[i] = x[i] * c[i] + x[i - half] * s[i];
            memcpy(x, rotated, head_dim * sizeof(float));
        }
        const float *k = row + num_heads * head_dim, *v = row + (num_heads + num_kv_heads) * head_dim;
        if (kv_half) {
            floats_to_half(k, (uint16_t *)k_cache + slots[t] * kv_width, kv_width);
            floats_to_half(v, (uint16_t *)v_cache + slots[t] * kv_width, kv_width);
            continue;
        }
        memcpy((float *)k_cache + slots[t] * kv_width, k, kv_width * sizeof(float));
        memcpy((float *)v_cache + slots[t] * kv_width, v, kv_width * sizeof(float));
    }
    return 0;
}
