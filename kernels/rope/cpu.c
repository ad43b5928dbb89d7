/* specd: rotary embedding of q and k in place in the fused projection's output, and the K/V store,
 * in one call per layer (the spec is kernels/rope/ref.py). Built with -ffp-contract=off
 * (kernels/cbuild.py): x * cos + flip(x) * sin rounds both products, then the sum, as HF does. */
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 512

/* qkv rows are row_stride floats apart, each [q heads | k heads | v heads] of head_dim floats;
 * cos, sin: [rows, head_dim] contiguous (sin sign-folded, see ref.py); caches: [slots, kv_heads,
 * head_dim] contiguous, num_slots of them. Returns -1 when head_dim is too large or odd or a slot is
 * out of range (nothing is written then). */
int rotate_and_store(float *qkv, int64_t rows, int64_t row_stride, const float *cos, const float *sin,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float *k_cache, float *v_cache,
                     const int64_t *slots, int64_t num_slots) {
    if (head_dim > MAX_HEAD_DIM || head_dim % 2) return -1;
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
    float rotated[MAX_HEAD_DIM];
    for (int64_t t = 0; t < rows; ++t) {
        float *row = qkv + t * row_stride;
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            float *x = row + h * head_dim;
            for (int64_t i = 0; i < half; ++i) rotated[i] = x[i] * c[i] + x[i + half] * s[i];
            for (int64_t i = half; i < head_dim; ++i) rotated[i] = x[i] * c[i] + x[i - half] * s[i];
            memcpy(x, rotated, head_dim * sizeof(float));
        }
        memcpy(k_cache + slots[t] * kv_width, row + num_heads * head_dim, kv_width * sizeof(float));
        memcpy(v_cache + slots[t] * kv_width, row + (num_heads + num_kv_heads) * head_dim, kv_width * sizeof(float));
    }
    return 0;
}
