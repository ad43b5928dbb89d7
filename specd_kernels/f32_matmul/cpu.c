/* specd: the fp32 linear layers' matmul for few rows, y = x @ w.T, weight-stationary (specd_kernels/f32_matmul/ref.py).
 *
 * Why: on a 2-core CPU an fp32 forward reads ~540 MB of weights, and MKL's and oneDNN's kernels read
 * them well for one row but not for a few: the default model's linears (30 layers + lm_head, 2-core
 * Intel KVM guest) took 21.6 / 52.7 / 53.3 ms for 1 / 8 / 16 rows with F.linear and 25.2 / 32.4 / 40.5
 * with oneDNN, so verifying 8 drafts cost 2x a plain decode step. Here each weight value is loaded once
 * per block of up to 8 rows and multiplied into all of them: 20.3 / 24.8 / 33.9 ms, and no slower than
 * oneDNN at 256 rows (235 ms), so prompt rows take it too.
 *
 * A row's bits depend only on that row: every output is one fused multiply-add chain over k in order
 * (no split of k, no tree reduction), whatever the number of rows, their blocking, the threads, or the
 * vector width (AVX-512 and AVX2 give the same bits). So speculation's verify rows and prompt chunks
 * of any size give a token the same logits as a plain decode step.
 *
 * Weights: [ceil(n / 16)][k][16] fp32 panels (16 output columns side by side per depth step; the last
 * panel's missing columns are zeros), packed by f32_matmul/cpu.py. Without AVX2+FMA in the compiler,
 * f32_matmul_init() returns 0 and the engine keeps torch's linear.
 */
#include <stdint.h>
#include <stdlib.h>

#include "../rowscale/cpu.c" /* row_inv_rms: the RMSNorm every CPU kernel of specd shares */

#define PANEL 16 /* output columns per panel */

#if defined(__AVX512F__)
#include <immintrin.h>
#define VECTOR_PATH 1
#define ROWS 8   /* rows per block: 8 rows x 3 panels = 24 accumulators of 32 registers */
#define PANELS 3 /* panels per block */

/* y[r, :cols] (+)= for rows r < mr of a block of `panels` panels from w (panel stride k * PANEL). */
static inline void block(int mr, int panels, const float *x, int64_t k, const float *w, float *y, int64_t ldy,
                         int64_t cols, int accumulate) {
    __m512 acc[ROWS][PANELS];
    for (int r = 0; r < ROWS; ++r)
        for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_setzero_ps();
    const int64_t stride = k * PANEL;
    for (int64_t d = 0; d < k; ++d) {
        const __m512 w0 = _mm512_loadu_ps(w + d * PANEL);
        const __m512 w1 = panels > 1 ? _mm512_loadu_ps(w + stride + d * PANEL) : w0;
        const __m512 w2 = panels > 2 ? _mm512_loadu_ps(w + 2 * stride + d * PANEL) : w0;
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) {
            if (r < mr) {
                const __m512 xv = _mm512_set1_ps(x[r * k + d]);
                acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
            }
        }
    }
    for (int p = 0; p < panels; ++p) {
        const int64_t left = cols - p * PANEL;
        const __mmask16 mask = left >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < mr; ++r) {
            float *dst = y + r * ldy + p * PANEL;
            __m512 out = acc[r][p];
            if (accumulate) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), out);
            _mm512_mask_storeu_ps(dst, mask, out);
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR_PATH 1
#define ROWS 6   /* 6 rows x 1 panel (two 8-wide halves) = 12 accumulators of 16 registers */
#define PANELS 1

static inline void block(int mr, int panels, const float *x, int64_t k, const float *w, float *y, int64_t ldy,
                         int64_t cols, int accumulate) {
    (void)panels;
    __m256 lo[ROWS], hi[ROWS];
    for (int r = 0; r < ROWS; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < k; ++d) {
        const __m256 w0 = _mm256_loadu_ps(w + d * PANEL), w1 = _mm256_loadu_ps(w + d * PANEL + 8);
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; ++r) {
            if (r < mr) {
                const __m256 xv = _mm256_set1_ps(x[r * k + d]);
                lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
            }
        }
    }
    for (int r = 0; r < mr; ++r) {
        float out[PANEL];
        _mm256_storeu_ps(out, lo[r]);
        _mm256_storeu_ps(out + 8, hi[r]);
        for (int64_t c = 0; c < cols && c < PANEL; ++c) y[r * ldy + c] = accumulate ? y[r * ldy + c] + out[c] : out[c];
    }
}
#else
#define VECTOR_PATH 0
#endif

#if VECTOR_PATH
/* One function per row count, so each block's loops unroll with a constant mr. */
#define BLOCK_OF(MR)                                                                                           \
    static void block_##MR(int panels, const float *x, int64_t k, const float *w, float *y, int64_t ldy,      \
                           int64_t cols, int accumulate) {                                                     \
        block(MR, panels, x, k, w, y, ldy, cols, accumulate);                                                  \
    }
BLOCK_OF(1) BLOCK_OF(2) BLOCK_OF(3) BLOCK_OF(4) BLOCK_OF(5) BLOCK_OF(6)
#if ROWS > 6
BLOCK_OF(7) BLOCK_OF(8)
#endif
typedef void (*block_fn)(int, const float *, int64_t, const float *, float *, int64_t, int64_t, int);
static const block_fn BLOCKS[] = {0, block_1, block_2, block_3, block_4, block_5, block_6,
#if ROWS > 6
                                  block_7, block_8
#endif
};
#endif

/* 1 when the vector kernel was compiled in (AVX2 + FMA, or AVX-512). */
int32_t f32_matmul_init(void) { return VECTOR_PATH; }

/* y[r, :n] = x[r, :k] @ w.T for r < m (rows of y `y_stride` apart; accumulate: y[r] + that, one add,
 * the bits of adding it afterwards); w packed as at the top. norm != NULL: x's rows are RMS-normalised
 * first, times norm (specd_kernels/rowscale's row_inv_rms), as torch's rms_norm then the matmul would.
 * Threads share the column blocks; each walks all row blocks over its weights while they sit in its
 * L2. Returns 0, or -1 without the vector kernel or memory. */
int32_t f32_matmul(const float *x, int64_t m, int64_t k, const float *w, int64_t n, float *y, int64_t y_stride,
                   const float *norm, float eps, int32_t accumulate) {
#if VECTOR_PATH
    float *normed = NULL;
    if (norm && m > 0) {
        normed = malloc((size_t)(m * k) * sizeof(float));
        if (!normed) return -1;
#pragma omp parallel for schedule(static) if (m >= PARALLEL_ROWS)
        for (int64_t r = 0; r < m; ++r) {
            const float *xr = x + r * k;
            const float inv_rms = row_inv_rms(xr, k, eps);
            for (int64_t i = 0; i < k; ++i) normed[r * k + i] = xr[i] * inv_rms * norm[i];
        }
        x = normed;
    }
    const int64_t panels = (n + PANEL - 1) / PANEL, groups = (panels + PANELS - 1) / PANELS;
#pragma omp parallel for schedule(static) if (groups > 1)
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = g * PANELS, count = panels - first < PANELS ? panels - first : PANELS;
        const float *wg = w + first * k * PANEL;
        for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
            const int64_t mr = m - r0 < ROWS ? m - r0 : ROWS;
            BLOCKS[mr]((int)count, x + r0 * k, k, wg, y + r0 * y_stride + first * PANEL, y_stride,
                       n - first * PANEL, accumulate);
        }
    }
    free(normed);
    return 0;
#else
    (void)x; (void)m; (void)k; (void)w; (void)n; (void)y; (void)y_stride; (void)norm; (void)eps; (void)accumulate;
    return -1;
#endif
}
