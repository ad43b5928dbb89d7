/* specd: ragged paged attention on the CPU (prefill chunks, decode, speculative verification), fp32,
 * one C call per layer (the spec is specd_kernels/attention/ref.py; this computes the same thing).
 *
 * Every (query row, head) is computed by the same loops over exactly the keys it sees, in cache
 * order: a decode row and the same token verified as a draft row get the same bits, alone or in any
 * batch. The torch path (SDPA over a padded batch) cannot promise that: its matmuls pick kernels by
 * the number of rows, so int8's activation rounding could turn a last-bit difference into another
 * token. Built with -fno-fast-math -ffp-contract=off (specd_kernels/cbuild.py), so every sum has the order
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
 * Prompt rows (AVX-512 builds, head_dim % 64 == 0): a prompt token is never decoded, so its rows only
 * need bits that no chunking or batch changes, and they take a path of their own (attend_prompt_rows):
 * the keys transposed once per unit of 32 rows, then each score one FMA chain over the dimensions, 16
 * keys per vector, no horizontal sums; values mixed six queries per load. A 256-row prompt chunk over
 * 768 keys (9 heads, fp16 K/V, 2 threads on the Intel AVX-512 guest) 3256 -> 2128 us per layer,
 * over 256 keys 693 -> 485; both halves then run near the FMA units' peak (perf: score_tile 30%,
 * mix_values_wide 33%, the softmax's exp 12%).
 *
 * K/V in fp16 (kv_half: half the bytes to read): SIMD builds with F16C read them in place, each
 * chunk converted (exactly) in the register where the fp32 code loads it (HALF: every inner function
 * is built for both), so a row's bits are those of the fp32 kernel over the fp16 values, whichever
 * unit or batch it is in. Other builds first convert the keys and values a unit reads into fp32
 * scratch. In place against scratch, 16 decoding requests at 400 keys, 30 layers' caches: 483 -> 320
 * us per layer; one request 33 -> 24 (the scratch pass waited on memory, then wrote and reread it).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../exp.h"
#include "../half.h"

#define LANES 8
#define MAX_THREADS 64
#define MIN_WORK_PER_THREAD 256 /* new rows x keys of the whole step */
#define PREFETCH_KEYS 32 /* keys ahead of the one scored: a DRAM round trip at a few ns per key */
#define MIX_HEADS 3 /* heads whose value sums share a pass: 4 x 3 accumulators fill the 16 registers */
#define ROW_BLOCK 16 /* new rows attended together: their keys are read once, scratch stays small */
#define PROMPT_ROW_BLOCK 32 /* prompt rows per unit (attend_prompt_rows): ~100 queries share each transposed key */

/* Ask for a key or value row (n floats, 16 per cache line) before it is needed. */
static inline void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i, 0, 3);
}

/* The same for a row of n fp16 values (32 per cache line). */
static inline void prefetch_half_row(const uint16_t *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) __builtin_prefetch(row + i, 0, 3);
}

/* Where row r (in units of head_dim) of a cache starts. */
static inline const void *cache_row(const int HALF, const void *cache, int64_t r, int64_t head_dim) {
    if (HALF) return (const uint16_t *)cache + r * head_dim;
    return (const float *)cache + r * head_dim;
}

/* out_h /= sums_h for the nh rows of a value mix: the softmax's normalisation, one multiply each. */
static inline void divide_rows(float *const *out, const float *sums, int64_t nh, int64_t head_dim) {
    for (int64_t h = 0; h < nh; ++h) {
        float inv = 1.0f / sums[h];
        for (int64_t d = 0; d < head_dim; ++d) out[h][d] *= inv;
    }
}

/* Ask for a row of n elements (fp32 or fp16) before it is needed. */
static inline void prefetch_elems(const int HALF, const void *row, int64_t n) {
    if (HALF) prefetch_half_row(row, n);
    else prefetch_row(row, n);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD 1
#define HALF_IN_PLACE KV_HALF_SUPPORTED /* fp16 K/V read in place where head_dim % 32 == 0 */

/* Element i of a key or value row: fp32, or fp16 converted (exactly) in the register (HALF, known at
 * compile time: each caller is built twice), so an fp16 cache is read in place, at half the bytes. */
static inline __attribute__((always_inline)) __m256 load8(const int HALF, const void *row, int64_t i) {
#ifdef __F16C__
    if (HALF) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
#endif
    return _mm256_loadu_ps((const float *)row + i);
}

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
static inline __attribute__((always_inline)) __m128 dot4(const int HALF, const float *q, const void *const *keys,
                                                           int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < n; i += LANES) {
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, load8(HALF, keys[0], i), a0);
        a1 = _mm256_fmadd_ps(x, load8(HALF, keys[1], i), a1);
        a2 = _mm256_fmadd_ps(x, load8(HALF, keys[2], i), a2);
        a3 = _mm256_fmadd_ps(x, load8(HALF, keys[3], i), a3);
    }
    return hsum8x4(a0, a1, a2, a3);
}

/* dot4 for two queries at once: each key chunk is loaded once for both, eight chains in flight.
 * Each query's sums are dot4's, term for term. */
static inline __attribute__((always_inline)) void dot4x2(const int HALF, const float *qa, const float *qb,
                                                         const void *const *keys, int64_t n, __m128 *ra, __m128 *rb) {
    const void *k0 = keys[0], *k1 = keys[1], *k2 = keys[2], *k3 = keys[3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < n; i += LANES) {
        __m256 y0 = load8(HALF, k0, i), y1 = load8(HALF, k1, i);
        __m256 y2 = load8(HALF, k2, i), y3 = load8(HALF, k3, i);
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

#ifndef HALF_IN_PLACE
#define HALF_IN_PLACE 0
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

/* HALF (fp16 keys read in place) only where SIMD and n % LANES == 0 (the caller's rule). */
static inline __attribute__((always_inline)) void scores4(const int HALF, const float *q, const void *const *keys,
                                                          int64_t n, float *out) {
    (void)HALF;
#ifdef SIMD
    if (n % LANES == 0) {
        _mm_storeu_ps(out, dot4(HALF, q, keys, n));
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

static inline __attribute__((always_inline)) void score_queries(const int HALF, const float *qa, const float *qb,
        const void *const *keys, int64_t n, float scale, int64_t count, float *out_a, float *out_b) {
    float sa[4], sb[4];
#ifdef SIMD
    if (qb && n % LANES == 0) {
        __m128 ra, rb;
        dot4x2(HALF, qa, qb, keys, n, &ra, &rb);
        _mm_storeu_ps(sa, ra);
        _mm_storeu_ps(sb, rb);
        store_scores(sa, scale, count, out_a);
        store_scores(sb, scale, count, out_b);
        return;
    }
#endif
    scores4(HALF, qa, keys, n, sa);
    store_scores(sa, scale, count, out_a);
    if (qb) {
        scores4(HALF, qb, keys, n, sb);
        store_scores(sb, scale, count, out_b);
    }
}

#ifdef SIMD
/* For nh heads (NH at compile time) of one row: out_h = (sum_k p_h[k] v_k) / (sum_k p_h[k]), 32 dims
 * per pass over the keys. Every lane and every sum adds the same terms in key order as weighted_sum
 * and a plain loop would (a weight of exactly 0, a masked key, adds nothing), so the bits are theirs;
 * what changes is that 4 * NH independent FMA chains are in flight instead of 8 in turn per head,
 * and each value row is loaded once for the heads sharing it. head_dim % 32 == 0. */
static inline __attribute__((always_inline)) void mix_values_nh(const int HALF, const int NH, const float *const *p,
        const void *v_cache, const int64_t *rows, int64_t kv_head, int64_t head_dim, int64_t n, float *const *out) {
    float sums[MIX_HEADS] = {0.0f};
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
        __m256 acc[MIX_HEADS][4];
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; ++k) {
            if (k + PREFETCH_KEYS < n)
                prefetch_elems(HALF, cache_row(HALF, v_cache, rows[k + PREFETCH_KEYS] + kv_head, head_dim), head_dim);
            const void *v = cache_row(HALF, v_cache, rows[k] + kv_head, head_dim);
            __m256 w[MIX_HEADS];
            for (int h = 0; h < NH; ++h) w[h] = _mm256_broadcast_ss(p[h] + k);
            /* 4 * NH accumulators, NH weights and one value chunk fill the 16 registers; holding
             * all four chunks spilled an accumulator to the stack (6 verify rows: 1.7x slower) */
            for (int c = 0; c < 4; ++c) {
                __m256 vc = load8(HALF, v, d0 + 8 * c);
                for (int h = 0; h < NH; ++h) acc[h][c] = _mm256_fmadd_ps(w[h], vc, acc[h][c]);
            }
            if (d0 == 0)
                for (int h = 0; h < NH; ++h) sums[h] += p[h][k];
        }
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out[h] + d0 + 8 * c, acc[h][c]);
    }
    divide_rows(out, sums, NH, head_dim);
}
#endif

#if defined(SIMD) && defined(__AVX512F__)
#define WIDE 1
#define WIDE_QUERIES 6 /* (row, head) queries per tile: 6 x 4 accumulators + 4 vectors fill the 32 registers */

/* load8's 16-lane twin. */
static inline __attribute__((always_inline)) __m512 load16(const int HALF, const void *row, int64_t i) {
    if (HALF) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)));
    return _mm512_loadu_ps((const float *)row + i);
}

/* mix_values for up to WIDE_QUERIES (row, head) queries, 64 dims per pass in 16-lane vectors. Every
 * lane adds the same terms in key order as mix_values_nh and the portable loop (one FMA per key per
 * output element; the denominators summed in key order), so the bits are theirs: only fewer passes
 * and more queries per value load. head_dim % 64 == 0. */
static inline __attribute__((always_inline)) void mix_values_wide_nq(const int HALF, const int NQ,
        const float *const *p, const void *v_cache, const int64_t *rows, int64_t kv_head, int64_t head_dim, int64_t n,
        float *const *out) {
    float sums[WIDE_QUERIES] = {0.0f};
    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
        __m512 acc[WIDE_QUERIES][4];
        for (int h = 0; h < NQ; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
        for (int64_t k = 0; k < n; ++k) {
            if (k + PREFETCH_KEYS < n && d0 == 0)
                prefetch_elems(HALF, cache_row(HALF, v_cache, rows[k + PREFETCH_KEYS] + kv_head, head_dim), head_dim);
            const void *v = cache_row(HALF, v_cache, rows[k] + kv_head, head_dim);
            __m512 vc[4];
            for (int c = 0; c < 4; ++c) vc[c] = load16(HALF, v, d0 + 16 * c);
            for (int h = 0; h < NQ; ++h) {
                __m512 w = _mm512_set1_ps(p[h][k]);
                for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_fmadd_ps(w, vc[c], acc[h][c]);
            }
            if (d0 == 0)
                for (int h = 0; h < NQ; ++h) sums[h] += p[h][k];
        }
        for (int h = 0; h < NQ; ++h)
            for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out[h] + d0 + 16 * c, acc[h][c]);
    }
    divide_rows(out, sums, NQ, head_dim);
}

static inline __attribute__((always_inline)) void mix_values_wide(const int HALF, const float *const *p, int64_t nq,
        const void *v_cache, const int64_t *rows, int64_t kv_head, int64_t head_dim, int64_t n, float *const *out) {
    switch (nq) { /* a compile-time count each: the accumulators stay in registers */
    case 1: mix_values_wide_nq(HALF, 1, p, v_cache, rows, kv_head, head_dim, n, out); break;
    case 2: mix_values_wide_nq(HALF, 2, p, v_cache, rows, kv_head, head_dim, n, out); break;
    case 3: mix_values_wide_nq(HALF, 3, p, v_cache, rows, kv_head, head_dim, n, out); break;
    case 4: mix_values_wide_nq(HALF, 4, p, v_cache, rows, kv_head, head_dim, n, out); break;
    case 5: mix_values_wide_nq(HALF, 5, p, v_cache, rows, kv_head, head_dim, n, out); break;
    default: mix_values_wide_nq(HALF, WIDE_QUERIES, p, v_cache, rows, kv_head, head_dim, n, out); break;
    }
}

/* Prompt rows' scores, 64 keys x up to WIDE_QUERIES queries per tile from keys transposed into
 * kt[d * stride + k]: s = (sum_d q[d] k[d]) * scale as ONE FMA chain in dimension order per score,
 * so a score's bits depend on its query and key alone, never on the tile, chunk or batch. */
static inline __attribute__((always_inline)) void score_tile_nq(const int NQ, const float *const *qs, const float *kt,
        int64_t stride, int64_t k0, int64_t head_dim, float scale, float *const *outs) {
    __m512 acc[WIDE_QUERIES][4];
    for (int q = 0; q < NQ; ++q)
        for (int c = 0; c < 4; ++c) acc[q][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; ++d) {
        const float *row = kt + d * stride + k0;
        __m512 kc[4];
        for (int c = 0; c < 4; ++c) kc[c] = _mm512_loadu_ps(row + 16 * c);
        for (int q = 0; q < NQ; ++q) {
            __m512 x = _mm512_set1_ps(qs[q][d]);
            for (int c = 0; c < 4; ++c) acc[q][c] = _mm512_fmadd_ps(x, kc[c], acc[q][c]);
        }
    }
    __m512 sc = _mm512_set1_ps(scale);
    for (int q = 0; q < NQ; ++q)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(outs[q] + k0 + 16 * c, _mm512_mul_ps(acc[q][c], sc));
}

static void score_tile(const float *const *qs, int64_t nq, const float *kt, int64_t stride, int64_t k0,
                       int64_t head_dim, float scale, float *const *outs) {
    switch (nq) {
    case 1: score_tile_nq(1, qs, kt, stride, k0, head_dim, scale, outs); break;
    case 2: score_tile_nq(2, qs, kt, stride, k0, head_dim, scale, outs); break;
    case 3: score_tile_nq(3, qs, kt, stride, k0, head_dim, scale, outs); break;
    case 4: score_tile_nq(4, qs, kt, stride, k0, head_dim, scale, outs); break;
    case 5: score_tile_nq(5, qs, kt, stride, k0, head_dim, scale, outs); break;
    default: score_tile_nq(WIDE_QUERIES, qs, kt, stride, k0, head_dim, scale, outs); break;
    }
}
#endif

/* HALF (fp16 values read in place) only where SIMD and head_dim % 32 == 0 (the caller's rule). */
static inline __attribute__((always_inline)) void mix_values(const int HALF, const float *const *p, int64_t nh,
        const void *v_cache, const int64_t *rows, int64_t kv_head, int64_t head_dim, int64_t n, float *const *out) {
    (void)HALF;
#ifdef WIDE
    if (head_dim % 64 == 0) {
        mix_values_wide(HALF, p, nh, v_cache, rows, kv_head, head_dim, n, out);
        return;
    }
#endif
#ifdef SIMD
    if (head_dim % 32 == 0) {
        if (nh == 3) mix_values_nh(HALF, 3, p, v_cache, rows, kv_head, head_dim, n, out);
        else if (nh == 2) mix_values_nh(HALF, 2, p, v_cache, rows, kv_head, head_dim, n, out);
        else mix_values_nh(HALF, 1, p, v_cache, rows, kv_head, head_dim, n, out);
        return;
    }
#endif
    for (int64_t h = 0; h < nh; ++h) {
        float sum = 0.0f;
        for (int64_t k = 0; k < n; ++k) sum += p[h][k]; /* in key order: masked keys (0) change nothing */
        weighted_sum(p[h], v_cache, rows, kv_head, head_dim, n, out[h]);
        divide_rows(out + h, &sum, 1, head_dim);
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

/* A row's scores s[0..row_keys) -> exp(score - max); keys its tree row does not see (seen[n] == 0 for
 * new key n) and hidden context keys (hidden[k] != 0, the padded-KV baseline's padding) exactly 0. */
static void softmax_numerators(float *s, int64_t row_keys, const uint8_t *seen, const uint8_t *hidden, int64_t ctx,
                               int64_t q_len) {
    if (seen)
        for (int64_t n = 0; n < q_len; ++n)
            if (!seen[n]) s[ctx + n] = -INFINITY;
    if (hidden)
        for (int64_t k = 0; k < ctx; ++k)
            if (hidden[k]) s[k] = -INFINITY;
    float max_score = max_of(s, row_keys);
    for (int64_t k = 0; k < row_keys; ++k) s[k] = exp_nonpositive(s[k] - max_score);
    if (seen)
        for (int64_t n = 0; n < q_len; ++n)
            if (!seen[n]) s[ctx + n] = 0.0f;
    if (hidden)
        for (int64_t k = 0; k < ctx; ++k)
            if (hidden[k]) s[k] = 0.0f;
}

/* One request, query heads g0..g1 of the group sharing KV head kv_head, new rows j0..j1. A causal row j sees keys
 * 0..ctx+j; a tree row sees the context and its ancestors-or-self (the others get weight exactly 0,
 * which adds nothing to any sum, so a tree node's bits equal those of its path decoded token by token).
 * The group's heads are scored inside the loop over keys, so each key leaves memory once for all of
 * them (it was once per head); each (row, head) still runs the same arithmetic on the same keys.
 * scores: [group, j1 - j0, kv_len] scratch; rows: key row offsets (slot * num_kv_heads). */
static inline __attribute__((always_inline)) void attend_rows_t(const int HALF, const float *q, int64_t q_stride,
        const void *k_cache, const void *v_cache, const int64_t *rows, int64_t q0, int64_t q_len, int64_t j0,
        int64_t j1, int64_t kv_len, int64_t kv_head, int64_t group, int64_t g0, int64_t g1, int64_t num_heads,
        int64_t head_dim, float scale, const uint8_t *tree, const uint8_t *hidden, float *scores, float *out) {
    int64_t ctx = kv_len - q_len, block = j1 - j0;
    int64_t last_key = tree ? kv_len : ctx + j1;
    for (int64_t k = 0; k < last_key; k += 4) {
        const void *keys[4];
        for (int i = 0; i < 4; ++i) /* past the end: repeat the last key, its scores are not stored */
            keys[i] = cache_row(HALF, k_cache, rows[k + i < last_key ? k + i : last_key - 1] + kv_head, head_dim);
        if (k + PREFETCH_KEYS < last_key) /* the keys' rows are scattered by the block table */
            for (int i = 0; i < 4 && k + PREFETCH_KEYS + i < last_key; ++i)
                prefetch_elems(HALF, cache_row(HALF, k_cache, rows[k + PREFETCH_KEYS + i] + kv_head, head_dim),
                               head_dim);
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
            score_queries(HALF, qs[0], qs[1], keys, head_dim, scale, count, outs[0], outs[1]);
        }
    }
    for (int64_t j = j0; j < j1; ++j) {
        int64_t row_keys = tree ? kv_len : ctx + j + 1;
        const uint8_t *seen = tree ? tree + j * q_len : NULL; /* new key n visible iff seen[n] */
        for (int64_t g = g0; g < g1; ++g)
            softmax_numerators(scores + (g * block + j - j0) * kv_len, row_keys, seen, hidden, ctx, q_len);
        for (int64_t g = g0; g < g1; g += MIX_HEADS) {
            int64_t nh = g1 - g < MIX_HEADS ? g1 - g : MIX_HEADS;
            const float *p[MIX_HEADS];
            float *o[MIX_HEADS];
            for (int64_t h = 0; h < nh; ++h) {
                p[h] = scores + ((g + h) * block + j - j0) * kv_len;
                o[h] = out + ((q0 + j) * num_heads + kv_head * group + g + h) * head_dim;
            }
            mix_values(HALF, p, nh, v_cache, rows, kv_head, head_dim, row_keys, o);
        }
    }
}

/* attend_rows_t over an fp32 cache, or an fp16 one read in place (SIMD builds with F16C, head_dim % 32
 * == 0: same bits as over its values converted into fp32 scratch). */
static void attend_rows(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int64_t half,
                        const int64_t *rows, int64_t q0, int64_t q_len, int64_t j0, int64_t j1, int64_t kv_len,
                        int64_t kv_head, int64_t group, int64_t g0, int64_t g1, int64_t num_heads,
                        int64_t head_dim, float scale, const uint8_t *tree, const uint8_t *hidden, float *scores,
                        float *out) {
    if (half)
        attend_rows_t(1, q, q_stride, k_cache, v_cache, rows, q0, q_len, j0, j1, kv_len, kv_head, group, g0, g1,
                      num_heads, head_dim, scale, tree, hidden, scores, out);
    else
        attend_rows_t(0, q, q_stride, k_cache, v_cache, rows, q0, q_len, j0, j1, kv_len, kv_head, group, g0, g1,
                      num_heads, head_dim, scale, tree, hidden, scores, out);
}

#ifdef WIDE

/* Prompt rows j0..j1 of one request (causal, never a tree), query heads g0..g1 of KV head kv_head, a
 * tile of up to WIDE_QUERIES (row, head) queries at a time: scores from the keys transposed into
 * kt[d * stride + k] (score_tile), softmax, values mixed (mix_values_wide) while the tile's scores
 * are still in cache. A prompt row's bits depend only on its query and the keys it sees, whatever
 * chunk, unit or batch it is in; they are not a decode row's (another order of additions in the
 * scores), but a prompt token is never decoded. scores: [WIDE_QUERIES, stride] scratch. */
static void attend_prompt_rows(const float *q, int64_t q_stride, const float *kt, int64_t stride, const void *v_cache,
                               int64_t half, const int64_t *rows, int64_t q0, int64_t ctx, int64_t j0, int64_t j1,
                               int64_t kv_head, int64_t group, int64_t g0, int64_t g1, int64_t num_heads,
                               int64_t head_dim, float scale, float *scores, float *out) {
    int64_t heads = g1 - g0, num_queries = (j1 - j0) * heads;
    for (int64_t t0 = 0; t0 < num_queries; t0 += WIDE_QUERIES) {
        int64_t nq = num_queries - t0 < WIDE_QUERIES ? num_queries - t0 : WIDE_QUERIES, keys = 0;
        const float *qs[WIDE_QUERIES];
        float *ps[WIDE_QUERIES], *outs[WIDE_QUERIES];
        int64_t row_keys[WIDE_QUERIES];
        for (int64_t u = 0; u < nq; ++u) {
            int64_t j = j0 + (t0 + u) / heads, g = g0 + (t0 + u) % heads;
            qs[u] = q + (q0 + j) * q_stride + (kv_head * group + g) * head_dim;
            ps[u] = scores + u * stride;
            outs[u] = out + ((q0 + j) * num_heads + kv_head * group + g) * head_dim;
            row_keys[u] = ctx + j + 1;
            keys = row_keys[u] > keys ? row_keys[u] : keys;
        }
        for (int64_t k0 = 0; k0 < keys; k0 += 64) score_tile(qs, nq, kt, stride, k0, head_dim, scale, ps);
        for (int64_t u = 0; u < nq; ++u) {
            softmax_numerators(ps[u], row_keys[u], NULL, NULL, ctx, 0);
            for (int64_t k = row_keys[u]; k < keys; ++k) ps[u][k] = 0.0f; /* past its row: adds nothing */
        }
        if (half) mix_values_wide(1, (const float *const *)ps, nq, v_cache, rows, kv_head, head_dim, keys, outs);
        else mix_values_wide(0, (const float *const *)ps, nq, v_cache, rows, kv_head, head_dim, keys, outs);
    }
}
#endif

/* The step's work: units of (request, block of rows, KV head, query heads of its group), taken by the
 * threads from a shared counter. A request's prompt rows (where this build has attend_prompt_rows)
 * come in blocks of PROMPT_ROW_BLOCK, its other rows in blocks of ROW_BLOCK. A unit takes the whole
 * group, so each key is read once for all heads that share it, unless that leaves fewer units than
 * threads to share them (a decode step of one request): then a unit is one head. Units write disjoint
 * (row, head) outputs, and every (row, head) runs the same arithmetic whichever unit, thread or batch
 * it lands in, so the split changes no bits. */
struct unit {
    int64_t r, j0, j1, kv_head, g0, g1, prompt;
};

struct step {
    const float *q;
    const void *k_cache, *v_cache; /* fp32, or fp16 when kv_half */
    int64_t q_stride, num_heads, num_kv_heads, head_dim, group, max_scores, max_kv_len, kv_half;
    const int32_t *cu_q, *kv_lens;
    const int64_t *req_ids, *key_rows, *key_offsets; /* key_rows of request r at key_offsets[r] */
    const uint8_t *tree_mask;
    const int64_t *cu_tree_mask;
    const uint8_t *hidden_keys; /* [batch, hidden_stride] or NULL */
    int64_t hidden_stride;
    float scale, *out;
    const struct unit *units;
    int64_t num_units, next_unit, has_prompt_units; /* next_unit: atomic */
    int failed;
};

/* Rows 0..last-1 of one KV head of an fp16 cache, converted into [last, head_dim] fp32 scratch; rows
 * becomes the offsets that address them there as attend_rows does the cache. */
static void cache_to_scratch(const uint16_t *cache, const int64_t *key_rows, int64_t kv_head, int64_t last,
                             int64_t d, float *buf, int64_t *rows) {
    for (int64_t k = 0; k < last; ++k) {
        if (k + PREFETCH_KEYS < last) /* a row of 64 halves spans two cache lines: ask for each */
            prefetch_half_row(cache + (key_rows[k + PREFETCH_KEYS] + kv_head) * d, d);
        half_to_floats(cache + (key_rows[k] + kv_head) * d, buf + k * d, d);
        rows[k] = k - kv_head;
    }
}

#ifdef WIDE
/* Keys 0..last-1 of one KV head (fp32 or fp16 cache), transposed into kt[d * stride + k], zero from
 * last to stride (a multiple of 16): 16 keys go through a [16, head_dim] tile, each dimension gathered
 * from it as one vector. */
static void keys_transposed(const struct step *st, const int64_t *key_rows, int64_t kv_head, int64_t last,
                            int64_t stride, float *kt, float *tile) {
    int64_t d = st->head_dim;
    __m512i across = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((int)d));
    for (int64_t k0 = 0; k0 < stride; k0 += 16) {
        for (int64_t i = 0; i < 16; ++i) {
            int64_t k = k0 + i;
            if (k >= last) {
                memset(tile + i * d, 0, d * sizeof(float));
                continue;
            }
            int64_t at = (key_rows[k] + kv_head) * d;
            if (k + PREFETCH_KEYS < last) {
                int64_t ahead = (key_rows[k + PREFETCH_KEYS] + kv_head) * d;
                if (st->kv_half) prefetch_half_row((const uint16_t *)st->k_cache + ahead, d);
                else prefetch_row((const float *)st->k_cache + ahead, d);
            }
            if (st->kv_half) half_to_floats((const uint16_t *)st->k_cache + at, tile + i * d, d);
            else memcpy(tile + i * d, (const float *)st->k_cache + at, d * sizeof(float));
        }
        for (int64_t c = 0; c < d; ++c)
            _mm512_storeu_ps(kt + c * stride + k0, _mm512_i32gather_ps(across, tile + c, 4));
    }
}
#endif

static void *run_units(void *arg) {
    struct step *st = arg;
    int64_t d = st->head_dim, wide_stride = (st->max_kv_len + 63) / 64 * 64;
    int64_t in_place = st->kv_half && HALF_IN_PLACE && d % 32 == 0; /* fp16 read where it lies */
    float *scores = malloc(st->max_scores * sizeof(float));
    float *k_buf = NULL, *v_buf = NULL, *kt = NULL, *tile = NULL;
    int64_t *scratch_rows = NULL;
    int missing = !scores;
    if (st->kv_half && !in_place) { /* scratch for converted K/V */
        k_buf = malloc(st->max_kv_len * d * sizeof(float));
        v_buf = malloc(st->max_kv_len * d * sizeof(float));
        scratch_rows = malloc(st->max_kv_len * sizeof(int64_t));
        missing |= !k_buf || !v_buf || !scratch_rows;
    }
    if (st->has_prompt_units) {
        kt = malloc(d * wide_stride * sizeof(float));
        tile = malloc(16 * d * sizeof(float));
        missing |= !kt || !tile;
    }
    for (; !missing;) {
        int64_t unit = __atomic_fetch_add(&st->next_unit, 1, __ATOMIC_RELAXED);
        if (unit >= st->num_units) break;
        const struct unit *u = &st->units[unit];
        int64_t b = st->req_ids[u->r], q0 = st->cu_q[b], q_len = st->cu_q[b + 1] - q0, kv_len = st->kv_lens[b];
        const uint8_t *tree = NULL;
        if (st->tree_mask && st->cu_tree_mask[b + 1] > st->cu_tree_mask[b]) tree = st->tree_mask + st->cu_tree_mask[b];
        const uint8_t *hidden = st->hidden_keys ? st->hidden_keys + b * st->hidden_stride : NULL;
        const void *k_cache = st->k_cache, *v_cache = st->v_cache;
        const int64_t *rows = st->key_rows + st->key_offsets[u->r];
        int64_t last = tree ? kv_len : kv_len - q_len + u->j1; /* the keys this unit's rows see */
#ifdef WIDE
        if (u->prompt) {
            int64_t stride = (last + 63) / 64 * 64;
            keys_transposed(st, rows, u->kv_head, last, stride, kt, tile);
            attend_prompt_rows(st->q, st->q_stride, kt, stride, st->v_cache, st->kv_half, rows, q0, kv_len - q_len,
                               u->j0, u->j1, u->kv_head, st->group, u->g0, u->g1, st->num_heads, d, st->scale, scores,
                               st->out);
            continue;
        }
#endif
        if (st->kv_half && !in_place) {
            cache_to_scratch(st->k_cache, rows, u->kv_head, last, d, k_buf, scratch_rows);
            cache_to_scratch(st->v_cache, rows, u->kv_head, last, d, v_buf, scratch_rows);
            k_cache = k_buf, v_cache = v_buf, rows = scratch_rows;
        }
        attend_rows(st->q, st->q_stride, k_cache, v_cache, in_place, rows, q0, q_len, u->j0, u->j1, kv_len, u->kv_head,
                    st->group, u->g0, u->g1, st->num_heads, d, st->scale, tree, hidden, scores, st->out);
    }
    if (missing) __atomic_store_n(&st->failed, 1, __ATOMIC_RELAXED);
    free(scores), free(k_buf), free(v_buf), free(scratch_rows), free(kt), free(tile);
    return NULL;
}

/* Leading rows of request b's new rows that take attend_prompt_rows: its prompt tokens (prompt_rows[b],
 * when given) where this build has that path and the head size suits it; none in a tree. */
static int64_t prompt_rows_of(const int32_t *prompt_rows, const uint8_t *tree_mask, const int64_t *cu_tree_mask,
                              int64_t b, int64_t q_len, int64_t head_dim) {
#ifdef WIDE
    int has_tree = tree_mask && cu_tree_mask[b + 1] > cu_tree_mask[b];
    if (prompt_rows && head_dim % 64 == 0 && !has_tree) return prompt_rows[b] < q_len ? prompt_rows[b] : q_len;
#else
    (void)prompt_rows, (void)tree_mask, (void)cu_tree_mask, (void)b, (void)q_len, (void)head_dim;
#endif
    return 0;
}

/* Attention of the requests req_ids[0..num_reqs) (each with q_len >= 1); writes their rows of out
 * (packed [rows, num_heads, head_dim]). q's rows are q_stride floats apart, heads packed in a row.
 * The caches hold fp32, or fp16 when kv_half. prompt_rows (or NULL): per request, how many of its
 * leading new rows are prompt tokens. hidden_keys (or NULL): [batch, hidden_stride] bytes, nonzero = a
 * context key no row of that request sees (the padded-KV baseline's padding; never with prompt rows).
 * Up to num_threads threads (this one included) share the work when there is enough of it. Returns
 * 0, or -1 when memory or a thread could not be had or fp16 is asked of a build without it. */
int paged_attention_rows(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                         const int32_t *cu_q, const int32_t *kv_lens, const int32_t *block_tables, int64_t max_blocks,
                         const int64_t *req_ids, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, float scale, const uint8_t *tree_mask,
                         const int64_t *cu_tree_mask, const int32_t *prompt_rows, const uint8_t *hidden_keys,
                         int64_t hidden_stride, float *out, int64_t num_threads, int64_t kv_half) {
    if (kv_half && !KV_HALF_SUPPORTED) return -1;
    int64_t group = num_heads / num_kv_heads, max_scores = 1, total_keys = 0, work = 0, row_blocks = 0, max_kv = 1;
    int64_t has_prompt_units = 0;
    for (int64_t r = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r], rows = cu_q[b + 1] - cu_q[b];
        int64_t prompt = prompt_rows_of(prompt_rows, tree_mask, cu_tree_mask, b, rows, head_dim);
        int64_t others = rows - prompt;
        int64_t size = group * (others < ROW_BLOCK ? others : ROW_BLOCK) * kv_lens[b];
        max_scores = size > max_scores ? size : max_scores;
        size = 6 * ((kv_lens[b] + 63) / 64 * 64); /* attend_prompt_rows: WIDE_QUERIES rows of scores */
        max_scores = prompt && size > max_scores ? size : max_scores;
        row_blocks += (prompt + PROMPT_ROW_BLOCK - 1) / PROMPT_ROW_BLOCK;
        has_prompt_units |= prompt > 0;
        max_kv = kv_lens[b] > max_kv ? kv_lens[b] : max_kv;
        total_keys += kv_lens[b];
        work += rows * kv_lens[b];
        row_blocks += (others + ROW_BLOCK - 1) / ROW_BLOCK;
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
    for (int64_t r = 0, n = 0; r < num_reqs; ++r) {
        int64_t q_len = cu_q[req_ids[r] + 1] - cu_q[req_ids[r]];
        int64_t prompt = prompt_rows_of(prompt_rows, tree_mask, cu_tree_mask, req_ids[r], q_len, head_dim);
        for (int64_t j0 = 0; j0 < q_len;) {
            int64_t in_prompt = j0 < prompt, j1 = j0 + (in_prompt ? PROMPT_ROW_BLOCK : ROW_BLOCK);
            j1 = in_prompt ? (j1 < prompt ? j1 : prompt) : (j1 < q_len ? j1 : q_len);
            for (int64_t h = 0; h < num_kv_heads; ++h)
                for (int64_t g = 0; g < split; ++g, ++n)
                    units[n] = (struct unit){r, j0, j1, h, split == 1 ? 0 : g, split == 1 ? group : g + 1, in_prompt};
            j0 = j1;
        }
    }
    for (int64_t r = 0, offset = 0; r < num_reqs; ++r) {
        int64_t b = req_ids[r];
        const int32_t *table = block_tables + b * max_blocks;
        key_offsets[r] = offset;
        for (int64_t k = 0; k < kv_lens[b]; ++k)
            key_rows[offset + k] = ((int64_t)table[k / block_size] * block_size + k % block_size) * num_kv_heads;
        offset += kv_lens[b];
    }
    struct step st = {q, k_cache, v_cache, q_stride, num_heads, num_kv_heads, head_dim, group, max_scores, max_kv,
                      kv_half, cu_q, kv_lens, req_ids, key_rows, key_offsets, tree_mask, cu_tree_mask, hidden_keys,
                      hidden_stride, scale, out, units, num_units, 0, has_prompt_units, 0};
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
