/* specd: e^x for the CPU kernels' loops (specd_kernels/attention/cpu.c softmax, specd_kernels/bf16_rows/cpu.c
 * SwiGLU): branch-free, so the loops around it vectorise, where libm's expf is a call per element. */
#ifndef SPECD_EXP_H
#define SPECD_EXP_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0, branch-free so the loop over keys vectorises; relative
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

#endif
