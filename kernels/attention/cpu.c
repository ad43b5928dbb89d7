/* specd: ragged paged attention on the CPU (prefill chunks, decode, speculative verification), fp32,
 * one C call per layer (the spec is kernels/attention/ref.py; this computes the same thing).
 *
 * Every (query row, head) is computed by the same loops over exactly the keys it sees, in cache
 * order: a decode row and the same token verified as a draft row get the same bits, alone or in any
 * batch. The torch path (SDPA over a padded batch) cannot promise that: its matmuls pick kernels by
 * the number of rows, so int8's activation rounding could turn a last-bit difference into another
 * token. Built with -fno-fast-math -ffp-contract=off (kernels/cbuild.py), so every sum has the order
 * written here: dot products accumulate 8 lanes in dimension order, then add the lanes one fixed way.
 *
 * Speed (2-core AVX2 dev CPU, 9 heads, 600 keys): dot products four keys at a time (independent FMA
 * chains instead of one chain waiting on the adder) and the weighted sum of V in registers made a
 * decode row 2x faster (~190 -> ~105 us per layer), 8 verify rows 1.8x. In a served step the K/V
 * rows come from DRAM (the weights streamed since evict them), scattered by the block table, so
 * - keys and values are prefetched PREFETCH_KEYS ahead through the block table,
 * - a KV head's whole query group is scored per key load, two queries per pass over a key's chunks,
 * - the value sums of a row's heads share one pass over the values (12 FMA chains in flight; the
 *   softmax denominators are summed in the same pass, in the same key order),
 * - the four dot products of a key quad are reduced together (a 4x4 transpose, same additions).
 * Against the build before these four changes, in one process (30 layers' caches flushed between
 * steps, blocks scattered, 2 threads), us per layer: one decode row over 600 keys 358 -> 280, over
 * 2000 keys 916 -> 632, 11 verify rows over 600 keys 630 -> 476, 16 decode rows over 200 keys
 * 1006 -> 629, a 64-row prompt chunk 2422 -> 1616, a 256-row chunk over 300 keys 2864 -> 2105.
 * Every output has the bits it had.
 *
 * K/V in fp16 (kv_half: half the bytes to read): each unit first converts the keys and values it
 * reads into fp32 scratch (exact), then runs the same fp32 code on them, so a row's bits are those
 * of the fp32 kernel over the fp16 values, whichever unit or batch it is in.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../half.h"

#define LANES 8
#define MAX_THREADS 64
#define MIN_WORK_PER_THREAD 256 /* new rows x keys of the whole step */
#define PREFETCH_KEYS 32 /* keys ahead of the one scored: a DRAM round trip at a few ns per key */
#define MIX_HEADS 3 /* heads whose value sums share a pass: 4 x 3 accumulators fill the 16 registers */
#define ROW_BLOCK 16 /* new rows attended together: their keys are read once, scratch stays small */

/* Ask for a key or value row (n floats, 16 per cache line) before it is needed. */
static inline void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i, 0, 3);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD 1

/* The 8-lane sums of four vectors, lane t of the result for vector t, each added in one fixed order:
 * (l0 + l4) + (l2 + l6) and (l1 + l5) + (l3 + l7), then those two. A 4x4 transpose lets the last two
 * steps run for the four sums at once instead of one horizontal chain per vector. */
static inline __m128 hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m128 x0 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    __m128 x1 = _mm_add_ps(_mm256_castps256_ps128(a1), _mm256_extractf128_ps(a1, 1));
    __m128 x2 = _mm_add_ps(_mm256_castps256_ps128(a2), _mm256_extractf128_ps(a2, 1));
    __m128 x3 = _mm_add_ps(_mm256_castps256_ps128(a3), _mm256_extractf128_ps(a3, 1));
    _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
    return _mm_add_ps(_mm_add_ps(x0, x2), _mm_add_ps(x1, x3));
}

/* q . key for four keys, each accumulated lane-wise in dimension order and summed by hsum8x4: the same
 * arithmetic for a key whichever slot of the four it takes, four chains in flight. n % 8 == 0. */
static inline __m128 dot4(const float *q, const float *const *keys, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < n; i += LANES) {
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[0] + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[1] + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[2] + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[3] + i), a3);
    }
    return hsum8x4(a0, a1, a2, a3);
}

/* dot4 for two queries at once: each key chunk is loaded once for both, eight chains in flight.
 * Each query's sums are dot4's, term for term. */
static inline void dot4x2(const float *qa, const float *qb, const float *const *keys, int64_t n, __m128 *ra,
                          __m128 *rb) {
    const float *k0 = keys[0], *k1 = keys[1], *k2 = keys[2], *k3 = keys[3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < n; i += LANES) {
        __m256 y0 = _mm256_loadu_ps(k0 + i), y1 = _mm256_loadu_ps(k1 + i);
        __m256 y2 = _mm256_loadu_ps(k2 + i), y3 = _mm256_loadu_ps(k3 + i);
        __m256 x = _mm256_loadu_ps(qa + i);
        a0 = _mm256_fmadd_ps(x, y0, a0), a1 = _mm256_fmadd_ps(x, y1, a1);
        a2 = _mm256_fmadd_ps(x, y2, a2), a3 = _mm256_fmadd_ps(x, y3, a3);
        x = _mm256_loadu_ps(qb + i);
        b0 = _mm256_fmadd_ps(x, y0, b0), b1 = _mm256_fmadd_ps(x, y1, b1);
        b2 = _mm256_fmadd_ps(x, y2, b2), b3 = _mm256_fmadd_ps(x, y3, b3);
    }
    *ra = hsum8x4(a0, a1, a2, a3);
    *rb = hsum8x4(b0, b1, b2, b3);
}

#endif

/* Portable versions (any head_dim; bits differ from the SIMD ones, but one build uses one of them). */
static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

static inline void scores4(const float *q, const float *const *keys, int64_t n, float *out) {
#ifdef SIMD
    if (n % LANES == 0) {
        _mm_storeu_ps(out, dot4(q, keys, n));
        return;
    }
#endif
    for (int t = 0; t < 4; ++t) out[t] = dot(q, keys[t], n);
}

static inline void weighted_sum(const float *p, const float *v_cache, const int64_t *rows, int64_t kv_head,
                                int64_t head_dim, int64_t n, float *out) {
    for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
        if (p[k] == 0.0f) continue;
        const float *v = v_cache + (rows[k] + kv_head) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out[d] += p[k] * v[d];
    }
}

/* Scaled scores of one or two queries against four keys; only the first `count` are stored. */
static inline void store_scores(const float *s4, float scale, int64_t count, float *out) {
    for (int i = 0; i < count; ++i) out[i] = s4[i] * scale;
}

static inline void score_queries(const float *qa, const float *qb, const float *const *keys, int64_t n, float scale,
                                 int64_t count, float *out_a, float *out_b) {
    float sa[4], sb[4];
#ifdef SIMD
    if (qb && n % LANES == 0) {
        __m128 ra, rb;
        dot4x2(qa, qb, keys, n, &ra, &rb);
        _mm_storeu_ps(sa, ra);
        _mm_storeu_ps(sb, rb);
        store_scores(sa, scale, count, out_a);
        store_scores(sb, scale, count, out_b);
        return;
    }
#endif
    scores4(qa, keys, n, sa);
    store_scores(sa, scale, count, out_a);
    if (qb) {
        scores4(qb, keys, n, sb);
        store_scores(sb, scale, count, out_b);
    }
}

#ifdef SIMD
/* For nh heads (NH at compile time) of one row: out_h = (sum_k p_h[k] v_k) / (sum_k p_h[k]), 32 dims
 * per pass over the keys. Every lane and every sum adds the same terms in key order as weighted_sum
 * and a plain loop would (a weight of exactly 0, a masked key, adds nothing), so the bits are theirs;
 * what changes is that 4 * NH independent FMA chains are in flight instead of 8 in turn per head,
 * and each value row is loaded once for the heads sharing it. head_dim % 32 == 0. */
static inline __attribute__((always_inline)) void mix_values_nh(const int NH, const float *const *p,
        const float *v_cache, const int64_t *rows, int64_t kv_head, int64_t head_dim, int64_t n, float *const *out) {
    float sums[MIX_HEADS] = {0.0f};
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
        __m256 acc[MIX_HEADS][4];
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; ++k) {
            if (k + PREFETCH_KEYS < n) prefetch_row(v_cache + (rows[k + PREFETCH_KEYS] + kv_head) * head_dim + d0, 32);
            const float *v = v_cache + (rows[k] + kv_head) * head_dim + d0;
            __m256 w[MIX_HEADS];
            for (int h = 0; h < NH; ++h) w[h] = _mm256_broadcast_ss(p[h] + k);
            /* 4 * NH accumulators, NH weights and one value chunk fill the 16 registers; holding
             * all four chunks spilled an accumulator to the stack (6 verify rows: 1.7x slower) */
            for (int c = 0; c < 4; ++c) {
                __m256 vc = _mm256_loadu_ps(v + 8 * c);
                for (int h = 0; h < NH; ++h) acc[h][c] = _mm256_fmadd_ps(w[h], vc, acc[h][c]);
            }
            if (d0 == 0)
                for (int h = 0; h < NH; ++h) sums[h] += p[h][k];
        }
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out[h] + d0 + 8 * c, acc[h][c]);
    }
    for (int h = 0; h < NH; ++h) {
        float inv = 1.0f / sums[h];
        for (int64_t d = 0; d < head_dim; ++d) out[h][d] *= inv;
    }
}
#endif

static void mix_values(const float *const *p, int64_t nh, const float *v_cache, const int64_t *rows, int64_t kv_head,
                       int64_t head_dim, int64_t n, float *const *out) {
#ifdef SIMD
    if (head_dim % 32 == 0) {
        if (nh == 3) mix_values_nh(3, p, v_cache, rows, kv_head, head_dim, n, out);
        else if (nh == 2) mix_values_nh(2, p, v_cache, rows, kv_head, head_dim, n, out);
        else mix_values_nh(1, p, v_cache, rows, kv_head, head_dim, n, out);
        return;
    }
#endif
    for (int64_t h = 0; h < nh; ++h) {
        float sum = 0.0f;
        for (int64_t k = 0; k < n; ++k) sum += p[h][k]; /* in key order: masked keys (0) change nothing */
        weighted_sum(p[h], v_cache, rows, kv_head, head_dim, n, out[h]);
        float inv = 1.0f / sum;
        for (int64_t d = 0; d < head_dim; ++d) out[h][d] *= inv;
    }
}

/* The largest score; max is exact, so lanes change no bits. */
static inline float max_of(const float *s, int64_t n) {
    float m[LANES];
    for (int j = 0; j < LANES; ++j) m[j] = -INFINITY;
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int j = 0; j < LANES; ++j) m[j] = s[k + j] > m[j] ? s[k + j] : m[j];
    for (; k < n; ++k) m[0] = s[k] > m[0] ? s[k] : m[0];
    float best = m[0];
    for (int j = 1; j < LANES; ++j) best = m[j] > best ? m[j] : best;
    return best;
}

/* e^x for x <= 0 (scores minus their max), branch-free so the loop over keys vectorises; relative
 * error ~2e-7. Each element's value depends on that element alone. */
static inline float exp_nonpositive(float x) {
    x = x > -87.0f ? x : -87.0f;
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

/* One request, query heads g0..g1 of the group sharing KV head kv_head, new rows j0..j1. A causal row j sees keys
 * 0..ctx+j; a tree row sees the context and its ancestors-or-self (the others get weight exactly 0,
 * which adds nothing to any sum, so a tree node's bits equal those of its path decoded token by token).
 * The group's heads are scored inside the loop over keys, so each key leaves memory once for all of
 * them (it was once per head); each (row, head) still runs the same arithmetic on the same keys.
 * scores: [group, j1 - j0, kv_len] scratch; rows: key row offsets (slot * num_kv_heads). */
static void attend_rows(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                        const int64_t *rows, int64_t q0, int64_t q_len, int64_t j0, int64_t j1, int64_t kv_len,
                        int64_t kv_head, int64_t group, int64_t g0, int64_t g1, int64_t num_heads,
                        int64_t head_dim, float scale, const uint8_t *tree, float *scores, float *out) {
    int64_t ctx = kv_len - q_len, block = j1 - j0;
    int64_t last_key = tree ? kv_len : ctx + j1;
    for (int64_t k = 0; k < last_key; k += 4) {
        const float *keys[4];
        for (int i = 0; i < 4; ++i) /* past the end: repeat the last key, its scores are not stored */
            keys[i] = k_cache + (rows[k + i < last_key ? k + i : last_key - 1] + kv_head) * head_dim;
        if (k + PREFETCH_KEYS < last_key) /* the keys' rows are scattered by the block table */
            for (int i = 0; i < 4 && k + PREFETCH_KEYS + i < last_key; ++i)
                prefetch_row(k_cache + (rows[k + PREFETCH_KEYS + i] + kv_head) * head_dim, head_dim);
        int64_t count = last_key - k < 4 ? last_key - k : 4;
        /* causal: rows before k - ctx see none of the four; a row that sees only some gets scores for
         * keys past its own end too, which it never reads */
        int64_t first = (!tree && k - ctx > j0) ? k - ctx : j0;
        /* the (row, head) queries, two at a time: t -> row first + t / heads, head g0 + t % heads */
        int64_t heads = g1 - g0, num_queries = (j1 - first) * heads;
        for (int64_t t = 0; t < num_queries; t += 2) {
            const float *qs[2] = {NULL, NULL};
            float *outs[2] = {NULL, NULL};
            for (int64_t u = 0; u < 2 && t + u < num_queries; ++u) {
                int64_t j = first + (t + u) / heads, g = g0 + (t + u) % heads;
                qs[u] = q + (q0 + j) * q_stride + (kv_head * group + g) * head_dim;
                outs[u] = scores + (g * block + j - j0) * kv_len + k;
            }
            score_queries(qs[0], qs[1], keys, head_dim, scale, count, outs[0], outs[1]);
        }
    }
    for (int64_t j = j0; j < j1; ++j) {
        int64_t row_keys = tree ? kv_len : ctx + j + 1;
        const uint8_t *seen = tree ? tree + j * q_len : NULL; /* new key n visible iff seen[n] */
        for (int64_t g = g0; g < g1; ++g) { /* scores -> exp(score - max), masked keys exactly 0 */
            float *s = scores + (g * block + j - j0) * kv_len;
            if (seen)
                for (int64_t n = 0; n < q_len; ++n)
                    if (!seen[n]) s[ctx + n] = -INFINITY;
            float max_score = max_of(s, row_keys);
            for (int64_t k = 0; k < row_keys; ++k) s[k] = exp_nonpositive(s[k] - max_score);
            if (seen)
                for (int64_t n = 0; n < q_len; ++n)
                    if (!seen[n]) s[ctx + n] = 0.0f;
        }
        for (int64_t g = g0; g < g1; g += MIX_HEADS) {
            int64_t nh = g1 - g < MIX_HEADS ? g1 - g : MIX_HEADS;
            const float *p[MIX_HEADS];
            float *o[MIX_HEADS];
            for (int64_t h = 0; h < nh; ++h) {
                p[h] = scores + ((g + h) * block + j - j0) * kv_len;
                o[h] = out + ((q0 + j) * num_heads + kv_head * group + g + h) * head_dim;
            }
            mix_values(p, nh, v_cache, rows, kv_head, head_dim, row_keys, o);
        }
    }
}

/* The step's work: units of (request, block of up to ROW_BLOCK rows, KV head, query heads of its
 * group), taken by the threads from a shared counter. A unit takes the whole group, so each key is read
 * once for all heads that share it, unless that leaves fewer units than threads to share them (a
 * decode step of one request): then a unit is one head. Units write disjoint (row, head) outputs, and
 * every (row, head) runs the same arithmetic whichever unit, thread or batch it lands in, so the
 * split changes no bits. */
struct unit {
    int64_t r, j0, kv_head, g0, g1;
};

struct step {
    const float *q;
    const void *k_cache, *v_cache; /* fp32, or fp16 when kv_half */
    int64_t q_stride, num_heads, num_kv_heads, head_dim, group, max_scores, max_kv_len, kv_half;
    const int32_t *cu_q, *kv_lens;
    const int64_t *req_ids, *key_rows, *key_offsets; /* key_rows of request r at key_offsets[r] */
    const uint8_t *tree_mask;
    const int64_t *cu_tree_mask;
    float scale, *out;
    const struct unit *units;
    int64_t num_units, next_unit; /* next_unit: atomic */
    int failed;
};

/* fp16 K/V: the keys and values 0..last-1 of one KV head, converted into [last, head_dim] fp32
 * scratch; rows becomes the offsets that address them there as attend_rows does the cache. */
static void keys_to_scratch(const struct step *st, const int64_t *key_rows, int64_t kv_head, int64_t last,
                            float *k_buf, float *v_buf, int64_t *rows) {
    const uint16_t *k_cache = st->k_cache, *v_cache = st->v_cache;
    int64_t d = st->head_dim;
    for (int64_t k = 0; k < last; ++k) {
        if (k + PREFETCH_KEYS < last) { /* 64 halves: one cache line per row */
            __builtin_prefetch(k_cache + (key_rows[k + PREFETCH_KEYS] + kv_head) * d, 0, 3);
            __builtin_prefetch(v_cache + (key_rows[k + PREFETCH_KEYS] + kv_head) * d, 0, 3);
        }
        half_to_floats(k_cache + (key_rows[k] + kv_head) * d, k_buf + k * d, d);
        half_to_floats(v_cache + (key_rows[k] + kv_head) * d, v_buf + k * d, d);
        rows[k] = k - kv_head;
    }
}

static void *run_units(void *arg) {
    struct step *st = arg;
    float *scores = malloc(st->max_scores * sizeof(float));
    float *k_buf = NULL, *v_buf = NULL;
    int64_t *scratch_rows = NULL;
    if (st->kv_half) {
        k_buf = malloc(st->max_kv_len * st->head_dim * sizeof(float));
        v_buf = malloc(st->max_kv_len * st->head_dim * sizeof(float));
        scratch_rows = malloc(st->max_kv_len * sizeof(int64_t));
    }
    if (!scores || (st->kv_half && (!k_buf || !v_buf || !scratch_rows))) {
        __atomic_store_n(&st->failed, 1, __ATOMIC_RELAXED);
        free(scores), free(k_buf), free(v_buf), free(scratch_rows);
        return NULL;
    }
    for (;;) {
        int64_t unit = __atomic_fetch_add(&st->next_unit, 1, __ATOMIC_RELAXED);
        if (unit >= st->num_units) break;
        const struct unit *u = &st->units[unit];
        int64_t b = st->req_ids[u->r], q0 = st->cu_q[b], q_len = st->cu_q[b + 1] - q0, kv_len = st->kv_lens[b];
        const uint8_t *tree = NULL;
        if (st->tree_mask && st->cu_tree_mask[b + 1] > st->cu_tree_mask[b]) tree = st->tree_mask + st->cu_tree_mask[b];
        int64_t j1 = u->j0 + ROW_BLOCK < q_len ? u->j0 + ROW_BLOCK : q_len;
        const float *k_cache = st->k_cache, *v_cache = st->v_cache;
        const int64_t *rows = st->key_rows + st->key_offsets[u->r];
        if (st->kv_half) { /* the keys this unit's rows see (attend_rows' last_key) */
            keys_to_scratch(st, rows, u->kv_head, tree ? kv_len : kv_len - q_len + j1, k_buf, v_buf, scratch_rows);
            k_cache = k_buf, v_cache = v_buf, rows = scratch_rows;
        }
        attend_rows(st->q, st->q_stride, k_cache, v_cache, rows, q0, q_len, u->j0, j1, kv_len, u->kv_head,
                    st->group, u->g0, u->g1, st->num_heads, st->head_dim, st->scale, tree, scores, st->out);
    }
    free(scores), free(k_buf), free(v_buf), free(scratch_rows);
    return NULL;
}

/* Attention of the requests req_ids[0..num_reqs) (each with q_len >= 1); writes their rows of out
 * (packed [rows, num_heads, head_dim]). q's rows are q_stride floats apart, heads packed in a row.
 * The caches hold fp32, or fp16 when kv_half. Up to num_threads threads (this one included) share
 * the work when there is enough of it. Returns 0, or -1 when memory or a thread could not be had
 * or fp16 is asked of a build without it. */
int paged_attention_rows(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                         const int32_t *cu_q, const int32_t *kv_lens, const int32_t *block_tables, int64_t max_blocks,
                         const int64_t *req_ids, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, float scale, const uint8_t *tree_mask,
                         const int64_t *cu_tree_mask, float *out, int64_t num_threads, int64_t kv_half) {
    if (kv_half && !KV_HALF_SUPPORTED) return -1;
    int64_t group = num_heads / num_kv_heads, max_scores = 1, total_keys = 0, work = 0, row_blocks = 0, max_kv = 1;
    for (int64_t r = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r], rows = cu_q[b + 1] - cu_q[b];
        int64_t size = group * (rows < ROW_BLOCK ? rows : ROW_BLOCK) * kv_lens[b];
        max_scores = size > max_scores ? size : max_scores;
        max_kv = kv_lens[b] > max_kv ? kv_lens[b] : max_kv;
        total_keys += kv_lens[b];
        work += rows * kv_lens[b];
        row_blocks += (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    }
    /* Splitting costs waking torch's OpenMP threads (a new pthread without OpenMP: ~10-20 us on the AMD
     * dev CPU, ~40-60 on an Intel KVM guest): worth it from about one decode row over a few hundred keys. */
    int64_t threads_wanted = work >= MIN_WORK_PER_THREAD ? num_threads : 1;
    int64_t split = row_blocks * num_kv_heads < threads_wanted ? group : 1; /* units per (row block, KV head) */
    int64_t num_units = row_blocks * num_kv_heads * split;
    int64_t *key_rows = malloc((total_keys > 0 ? total_keys : 1) * sizeof(int64_t));
    int64_t *key_offsets = malloc((num_reqs > 0 ? num_reqs : 1) * sizeof(int64_t));
    struct unit *units = malloc((num_units > 0 ? num_units : 1) * sizeof(struct unit));
    if (!key_rows || !key_offsets || !units) {
        free(key_rows);
        free(key_offsets);
        free(units);
        return -1;
    }
    for (int64_t r = 0, n = 0; r < num_reqs; ++r)
        for (int64_t j0 = 0; j0 < cu_q[req_ids[r] + 1] - cu_q[req_ids[r]]; j0 += ROW_BLOCK)
            for (int64_t h = 0; h < num_kv_heads; ++h)
                for (int64_t g = 0; g < split; ++g, ++n)
                    units[n] = (struct unit){r, j0, h, split == 1 ? 0 : g, split == 1 ? group : g + 1};
    for (int64_t r = 0, offset = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r];
        const int32_t *table = block_tables + b * max_blocks;
        key_offsets[r] = offset;
        for (int64_t k = 0; k < kv_lens[b]; ++k)
            key_rows[offset + k] = ((int64_t)table[k / block_size] * block_size + k % block_size) * num_kv_heads;
        offset += kv_lens[b];
    }
    struct step st = {q, k_cache, v_cache, q_stride, num_heads, num_kv_heads, head_dim, group, max_scores, max_kv,
                      kv_half, cu_q, kv_lens, req_ids, key_rows, key_offsets, tree_mask, cu_tree_mask, scale, out,
                      units, num_units, 0, 0};
    int64_t helpers = threads_wanted - 1 < num_units - 1 ? threads_wanted - 1 : num_units - 1;
    helpers = helpers < MAX_THREADS ? helpers : MAX_THREADS;
#ifdef _OPENMP
    /* torch's OpenMP threads (one libgomp per process: the soname torch loaded first), still spinning
     * from the matmul before, join in for free; a new thread cost ~40-60 us on an Intel KVM guest. */
    if (helpers > 0) {
#pragma omp parallel num_threads(helpers + 1)
        run_units(&st);
    } else {
        run_units(&st);
    }
#else
    pthread_t threads[MAX_THREADS];
    int64_t started = 0;
    for (; started < helpers; ++started)
        if (pthread_create(&threads[started], NULL, run_units, &st) != 0) break;
    run_units(&st);
    for (int64_t t = 0; t < started; ++t) pthread_join(threads[t], NULL);
#endif
    free(key_rows);
    free(key_offsets);
    free(units);
    return st.failed ? -1 : 0;
}
