/* specd: per-row activation scaling around fbgemm's int8 linear, fused (see specd_kernels/rowscale/ref.py,
 * the specification these functions follow).
 *
 * Every row is computed by the same sequential loops whatever else is in the batch (no reassociation:
 * built with -fno-fast-math -ffp-contract=off; rows, never a row's loops, are split across threads),
 * so a row's bits never depend on its neighbours. That is what keeps speculative decoding lossless
 * under int8. Threads only from PARALLEL_ROWS rows on (specd_kernels/rows.h).
 */
#include <math.h>
#include <stdint.h>

#include "../rows.h"

/* 1 / RMS of a row, its squares summed in order. */
static float row_inv_rms(const float *x, int64_t width, float eps) {
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < width; ++i) sum_sq += x[i] * x[i];
    return 1.0f / sqrtf(sum_sq / (float)width + eps);
}

/* buf rows: 0 = the sentinel (caller's), 1..rows = hi, rows+1..2*rows = lo.
 * norm_weight != NULL: the row is RMS-normalised first (x * rsqrt(mean(x^2) + eps) * w). */
void rowscale_prep(const float *x, int64_t rows, int64_t width, int64_t x_stride,
                   const float *norm_weight, float eps, float *buf, float *scales,
                   float fit, float inv_step, float step, float lo_gain) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        float *hi = buf + (1 + r) * width;
        float *lo = buf + (1 + rows + r) * width;
        if (norm_weight) {
            float inv_rms = row_inv_rms(xr, width, eps);
            for (int64_t i = 0; i < width; ++i) hi[i] = xr[i] * inv_rms * norm_weight[i];
        } else {
            for (int64_t i = 0; i < width; ++i) hi[i] = xr[i];
        }
        float max_abs = 0.0f;
        for (int64_t i = 0; i < width; ++i) {
            float a = fabsf(hi[i]);
            max_abs = a > max_abs ? a : max_abs;
        }
        float scale = (max_abs > 1e-30f ? max_abs : 1e-30f) / fit;
        for (int64_t i = 0; i < width; ++i) {
            float h = hi[i] / scale;
            hi[i] = h;
            lo[i] = (h - nearbyintf(h * inv_step) * step) * lo_gain;
        }
        scales[r] = scale;
    }
}

/* y rows as buf's, each y_width wide: the weight's width output channels, then the outputs of the
 * residual rows of a split weight (engine/models/int8.py), which add to their channels:
 * residual_of[i] is the y column of channel i's residual, or -1 (residual_of NULL: none).
 * out[r] = (hi + lo * lo_weight) * scale[r] (+ bias), or out[r] += that. */
void rowscale_finish(const float *y, int64_t rows, int64_t width, int64_t y_width, const float *scales,
                     float lo_weight, const float *bias, float *out, int64_t out_stride, int32_t accumulate,
                     const int32_t *residual_of) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *hi = y + (1 + r) * y_width;
        const float *lo = y + (1 + rows + r) * y_width;
        float scale = scales[r];
        float *o = out + r * out_stride;
        for (int64_t i = 0; i < width; ++i) {
            int32_t k = residual_of ? residual_of[i] : -1;
            float h = k >= 0 ? hi[i] + hi[k] : hi[i];
            float l = k >= 0 ? lo[i] + lo[k] : lo[i];
            float v = (h + l * lo_weight) * scale;
            if (bias) v += bias[i];
            o[i] = accumulate ? o[i] + v : v;
        }
    }
}
