/* specd: the int8 linear layers' matmul on AMX tiles, with fbgemm's bits (specd_kernels/int8_matmul/ref.py).
 *
 * Why: a 16-request decode step spent half its time in fbgemm's int8 matmuls (perf: its JIT kernels
 * 37% of the step on the 2-core Intel dev CPU). AMX multiplies a 16x64 u8 tile by a 64x16 s8 tile in
 * one instruction, so the cost is mostly reading the weights: 30 layers of the default model, 16 rows
 * 10.2 ms against one row's 9.2 (fbgemm: 21.4 and 9.5).
 *
 * Same bits as fbgemm's dynamic linear on the rowscale buffer (engine/models/int8.py): the activation
 * range is always [-1, 1] (the sentinel row), so the quantization parameters are fixed (scale 2/127,
 * zero point 64, 7 bits); each value is quantized as fbgemm does, fma(x, 1/scale, 64) rounded to
 * nearest even; the int32 accumulation is exact; and the output is float(acc - 64 * colsum) times
 * float(scale * w_scale) per column, fbgemm's order. A row's bits depend only on that row.
 *
 * Weights: [n_tiles][k / 4][16][4] int8 (each 64x16 B tile is 1 KB contiguous), columns padded to a
 * multiple of 32 and the depth to a multiple of 64 with zeros (int8_matmul/cpu.py packs them).
 * Without AMX in the compiler or the CPU, int8_matmul_init() returns 0 and fbgemm runs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__) && defined(__linux__)
#define HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define HAVE_AMX 0
#endif

#define ZERO_POINT 64
#define QMAX 127

#if HAVE_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-1: A (16 rows x 64 u8), 2-3: B (16 k-quads x 64 bytes), 4-7: C (16 x 16 int32). */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* u8 rows of the activations: fbgemm's quantization (see the top), zero rows past m. Called inside
 * the matmul's parallel region: its rows are shared among the threads (one fork per matmul). */
static void quantize_rows(const float *x, int64_t m, int64_t m_pad, int64_t k, int64_t k_pad, float inv_scale,
                          uint8_t *q) {
    const __m512 inv = _mm512_set1_ps(inv_scale), zp = _mm512_set1_ps((float)ZERO_POINT);
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps((float)QMAX);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m_pad; ++r) {
        uint8_t *dst = q + r * k_pad;
        if (r >= m) {
            memset(dst, ZERO_POINT, k_pad);  /* quantized zeros: their rows are never read back */
            continue;
        }
        const float *src = x + r * k;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            __m512 t = _mm512_fmadd_ps(_mm512_loadu_ps(src + i), inv, zp);
            t = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                            lo), hi);
            _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
        }
        for (; i < k; ++i) {
            float t = nearbyintf(fmaf(src[i], inv_scale, (float)ZERO_POINT));
            dst[i] = (uint8_t)(t < 0 ? 0 : t > QMAX ? QMAX : t);
        }
        memset(dst + k, ZERO_POINT, k_pad - k);  /* padded depth meets zero weights */
    }
}

/* One 32x32 block of the output: rows m0.., columns of the weight tile pair nt0, nt0 + 1. */
static void block_32x32(const uint8_t *q, int64_t k_pad, const int8_t *w, int64_t m0, int64_t nt0, int32_t *acc) {
    const int64_t tile_bytes = k_pad * 16;  /* one 16-column weight tile over the whole depth */
    const uint8_t *a0 = q + m0 * k_pad, *a1 = a0 + 16 * k_pad;
    const int8_t *b0 = w + nt0 * tile_bytes, *b1 = b0 + tile_bytes;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kc = 0; kc < k_pad; kc += 64) {
        _tile_loadd(0, a0 + kc, k_pad);
        _tile_loadd(1, a1 + kc, k_pad);
        _tile_loadd(2, b0 + kc * 16, 64);
        _tile_loadd(3, b1 + kc * 16, 64);
        _tile_dpbusd(4, 0, 2);
        _tile_dpbusd(5, 0, 3);
        _tile_dpbusd(6, 1, 2);
        _tile_dpbusd(7, 1, 3);
    }
    _tile_stored(4, acc, 128);
    _tile_stored(5, acc + 16, 128);
    _tile_stored(6, acc + 16 * 32, 128);
    _tile_stored(7, acc + 16 * 32 + 16, 128);
}

static void write_block(const int32_t *acc, int64_t m0, int64_t m, int64_t c0, int64_t n, const int32_t *colsum,
                        const float *col_scale, float *y, int64_t y_stride) {
    int64_t rows = m - m0 < 32 ? m - m0 : 32, cols = n - c0 < 32 ? n - c0 : 32;
    for (int64_t r = 0; r < rows; ++r) {
        float *dst = y + (m0 + r) * y_stride + c0;
        for (int64_t c = 0; c < cols; ++c)
            dst[c] = (float)(acc[r * 32 + c] - ZERO_POINT * colsum[c0 + c]) * col_scale[c0 + c];
    }
}
#endif

/* 1 when AMX runs here (the compiler knew it and the kernel lets this process use tile data). */
int32_t int8_matmul_init(void) {
#if HAVE_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

/* y[r, :n] = the int8 linear of x's row r (r < m), fbgemm's bits. x: [m, k] fp32 rowscale rows (the
 * sentinel row excluded); w: packed (see the top) with n_pad columns and depth k_pad; colsum: [n] the
 * sum of each column's int8 weights; col_scale: [n] float(scale * w_scale). Returns 0, or -1 when no
 * memory or no AMX. */
int32_t int8_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, int64_t n_pad, int64_t k_pad,
                    const int32_t *colsum, const float *col_scale, float inv_scale, float *y, int64_t y_stride) {
#if HAVE_AMX
    if (m == 0) return 0;
    const int64_t m_pad = (m + 31) / 32 * 32, m_blocks = m_pad / 32, n_blocks = n_pad / 32;
    uint8_t *q = aligned_alloc(64, (size_t)(m_pad * k_pad));
    if (!q) return -1;
    /* Blocks in column-major order: a thread's consecutive blocks share their weight tiles (from L2). */
#pragma omp parallel
    {
        int32_t acc[32 * 32] __attribute__((aligned(64)));
        quantize_rows(x, m, m_pad, k, k_pad, inv_scale, q); /* its `omp for` ends in a barrier */
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_blocks * m_blocks; ++b) {
            int64_t nb = b / m_blocks, mb = b % m_blocks;
            block_32x32(q, k_pad, w, mb * 32, nb * 2, acc);
            write_block(acc, mb * 32, m, nb * 32, n, colsum, col_scale, y, y_stride);
        }
        _tile_release();
    }
    free(q);
    return 0;
#else
    (void)x; (void)m; (void)k; (void)w; (void)n; (void)n_pad; (void)k_pad; (void)colsum; (void)col_scale;
    (void)inv_scale; (void)y; (void)y_stride;
    return -1;
#endif
}
