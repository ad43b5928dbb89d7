/* specd: fp16 <-> fp32 for the K/V cache of the CPU kernels (specd_kernels/rope/cpu.c stores, specd_kernels/
 * attention/cpu.c reads). F16C only: without it kv_half_supported() is 0 and the caller keeps fp32. */
#ifndef SPECD_HALF_H
#define SPECD_HALF_H
#include <stdint.h>

#if defined(__F16C__)
#include <immintrin.h>
#define KV_HALF_SUPPORTED 1
/* n floats -> fp16, rounded to nearest even, denormals kept: what torch's .to(torch.float16) gives. */
static inline void floats_to_half(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
/* n fp16 -> floats (exact). */
static inline void half_to_floats(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
#else
#define KV_HALF_SUPPORTED 0
static inline void floats_to_half(const float *src, uint16_t *dst, int64_t n) { (void)src, (void)dst, (void)n; }
static inline void half_to_floats(const uint16_t *src, float *dst, int64_t n) { (void)src, (void)dst, (void)n; }
#endif

/* 1 when this build can hold K/V in fp16, else 0. */
int kv_half_supported(void) { return KV_HALF_SUPPORTED; }
#endif
