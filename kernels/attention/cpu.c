/* specd: ragged paged attention on the CPU (prefill chunks, decode, speculative verification), fp32,
 * one C call per layer (the spec is kernels/attention/ref.py; this computes the same thing).
 *
 * Every (query row, head) is computed by the same loops over exactly the keys it sees, in cache
 * order: a decode row and the same token verified as a draft row get the same bits, alone or in any
 * batch. The torch path (SDPA over a padded batch) cannot promise that: its matmuls pick kernels by
 * the number of rows, so int8's activation rounding could turn a last-bit difference into another
 * token. Built with -fno-fast-math -ffp-contract=off (kernels/cbuild.py); dot products use a fixed
 * 8-lane order the compiler vectorises without reassociating.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define ROW_BLOCK 16 /* new rows attended together: their keys are read once, scratch stays small */

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* e^x for x <= 0 (scores minus their max), branch-free so the loop over keys vectorises; relative
 * error ~2e-7. Each element's value depends on that element alone. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f; /* log2(e) */
    float whole = floorf(t), f = t - whole;
    float p = 1.535336188319500e-4f; /* 2^f on [0, 1), degree 6 */
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)whole + 127) << 23;
    float two_to_whole;
    memcpy(&two_to_whole, &bits, sizeof two_to_whole);
    return p * two_to_whole;
}

/* One request, one kv head, new rows j0..j1. A causal row j sees keys 0..ctx+j; a tree row sees the
 * context and its ancestors-or-self (the others get weight exactly 0, which adds nothing to any
 * sum, so a tree node's bits equal those of its path decoded token by token).
 * scores: [(j1 - j0) * group, kv_len] scratch; rows: key row offsets (slot * num_kv_heads). */
static void attend_rows(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                        const int64_t *rows, int64_t q0, int64_t q_len, int64_t j0, int64_t j1, int64_t kv_len,
                        int64_t kv_head, int64_t group, int64_t num_heads, int64_t head_dim, float scale,
                        const uint8_t *tree, float *scores, float *out) {
    int64_t ctx = kv_len - q_len;
    int64_t last_key = tree ? kv_len : ctx + j1;
    for (int64_t k = 0; k < last_key; ++k) {
        const float *key = k_cache + (rows[k] + kv_head) * head_dim;
        int64_t first = (!tree && k - ctx > j0) ? k - ctx : j0; /* causal: rows before k - ctx do not see k */
        for (int64_t j = first; j < j1; ++j) {
            for (int64_t g = 0; g < group; ++g) {
                const float *qr = q + (q0 + j) * q_stride + (kv_head * group + g) * head_dim;
                scores[((j - j0) * group + g) * kv_len + k] = dot(qr, key, head_dim) * scale;
            }
        }
    }
    for (int64_t j = j0; j < j1; ++j) {
        int64_t row_keys = tree ? kv_len : ctx + j + 1;
        const uint8_t *seen = tree ? tree + j * q_len : NULL; /* new key n visible iff seen[n] */
        for (int64_t g = 0; g < group; ++g) {
            float *s = scores + ((j - j0) * group + g) * kv_len;
            float *o = out + ((q0 + j) * num_heads + kv_head * group + g) * head_dim;
            if (seen)
                for (int64_t n = 0; n < q_len; ++n)
                    if (!seen[n]) s[ctx + n] = -INFINITY;
            float max_score = -INFINITY;
            for (int64_t k = 0; k < row_keys; ++k) max_score = s[k] > max_score ? s[k] : max_score;
            for (int64_t k = 0; k < row_keys; ++k) s[k] = exp_nonpositive(s[k] - max_score);
            if (seen)
                for (int64_t n = 0; n < q_len; ++n)
                    if (!seen[n]) s[ctx + n] = 0.0f;
            float sum = 0.0f;
            for (int64_t k = 0; k < row_keys; ++k) sum += s[k]; /* in key order: see above */
            memset(o, 0, head_dim * sizeof(float));
            for (int64_t k = 0; k < row_keys; ++k) {
                float p = s[k];
                if (p == 0.0f) continue;
                const float *v = v_cache + (rows[k] + kv_head) * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
            }
            float inv = 1.0f / sum;
            for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
        }
    }
}

/* Attention of the requests req_ids[0..num_reqs) (each with q_len >= 1); writes their rows of out
 * (packed [rows, num_heads, head_dim]). q's rows are q_stride floats apart, heads packed in a row.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int paged_attention_rows(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         const int32_t *cu_q, const int32_t *kv_lens, const int32_t *block_tables, int64_t max_blocks,
                         const int64_t *req_ids, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, float scale, const uint8_t *tree_mask,
                         const int64_t *cu_tree_mask, float *out) {
    int64_t group = num_heads / num_kv_heads, max_scores = 1, max_kv = 1;
    for (int64_t r = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r], rows = cu_q[b + 1] - cu_q[b];
        int64_t size = (rows < ROW_BLOCK ? rows : ROW_BLOCK) * group * kv_lens[b];
        max_scores = size > max_scores ? size : max_scores;
        max_kv = kv_lens[b] > max_kv ? kv_lens[b] : max_kv;
    }
    float *scores = malloc(max_scores * sizeof(float));
    int64_t *key_rows = malloc(max_kv * sizeof(int64_t));
    if (!scores || !key_rows) {
        free(scores);
        free(key_rows);
        return -1;
    }
    for (int64_t r = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r], q0 = cu_q[b], q_len = cu_q[b + 1] - cu_q[b], kv_len = kv_lens[b];
        const int32_t *table = block_tables + b * max_blocks;
        for (int64_t k = 0; k < kv_len; ++k)
            key_rows[k] = ((int64_t)table[k / block_size] * block_size + k % block_size) * num_kv_heads;
        const uint8_t *tree = NULL;
        if (tree_mask && cu_tree_mask[b + 1] > cu_tree_mask[b]) tree = tree_mask + cu_tree_mask[b];
        for (int64_t h = 0; h < num_kv_heads; ++h)
            for (int64_t j0 = 0; j0 < q_len; j0 += ROW_BLOCK)
                attend_rows(q, q_stride, k_cache, v_cache, key_rows, q0, q_len, j0,
                            j0 + ROW_BLOCK < q_len ? j0 + ROW_BLOCK : q_len, kv_len, h, group, num_heads, head_dim,
                            scale, tree, scores, out);
    }
    free(scores);
    free(key_rows);
    return 0;
}
