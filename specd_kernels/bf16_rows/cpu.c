/* specd: the elementwise work around the bf16 prompt-row linears (engine/models/linear.py
 * onednn_bf16_blocks), written straight into the bf16 rows oneDNN reads: RMSNorm of the residual
 * stream, and SwiGLU between gate/up and down. torch did each as several passes over fp32 copies
 * (norm, cast; bf16 -> fp32 cast, silu, mul, cast back); with these a 256-token prompt step took
 * ~89 ms against ~100 (2-core Intel guest, median of 25, back to back). Rows split across threads
 * (specd_kernels/rows.h), each row's loops sequential: a row's bits never depend on the others (prompt rows
 * need no more: they are never decoded). ref.py is the spec.
 */
#include <string.h>

#include "../exp.h"
#include "../rowscale/cpu.c"

/* fp32 -> bf16, rounded to nearest even, as torch's cast (no NaN comes here: RMSNorm and SwiGLU of
 * finite values). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* out[r] = bf16(x[r] * inv_rms(x[r]) * w), rows of `width`. */
void rms_norm_bf16(const float *x, int64_t rows, int64_t width, const float *w, float eps, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * width;
        uint16_t *o = out + r * width;
        float inv_rms = row_inv_rms(xr, width, eps);
        for (int64_t i = 0; i < width; ++i) o[i] = to_bf16(xr[i] * inv_rms * w[i]);
    }
}

/* out[r] = bf16(silu(gate) * up), gate and up the two halves of y's row r (bf16, stride y_stride). */
void swiglu_bf16(const uint16_t *y, int64_t rows, int64_t inter, int64_t y_stride, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *gate = y + r * y_stride, *up = gate + inter;
        uint16_t *o = out + r * inter;
        for (int64_t i = 0; i < inter; ++i) {
            /* silu(g) = g / (1 + e^-g) = g e^g / (1 + e^g): e^-|g| in both, never overflowing */
            float g = from_bf16(gate[i]), e = exp_nonpositive(g > 0.0f ? -g : g);
            float silu = (g > 0.0f ? g : g * e) / (1.0f + e);
            o[i] = to_bf16(silu * from_bf16(up[i]));
        }
    }
}
