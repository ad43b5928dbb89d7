/* specd: exact logits for each row's k leading int8 candidates (the spec is specd_kernels/rescore/ref.py).
 *
 * One pass per row keeps the k largest values (ties: the lower token id), then each is
 * replaced by the float64 dot product of the hidden row and the fp32 weight row, rounded once. A row
 * never reads another row, so its bits do not depend on the batch. */
#include <stdint.h>

#define MAX_K 64
#define BLOCK 32

int rescore_top_k(float *logits, int64_t rows, int64_t vocab, int64_t logits_stride, const float *hidden,
                  int64_t hidden_stride, const float *weight, int64_t width, int64_t k) {
    if (k < 1 || k > MAX_K) return -1;
    if (k > vocab) k = vocab;
    for (int64_t r = 0; r < rows; ++r) {
        float *row = logits + r * logits_stride;
        const float *h = hidden + r * hidden_stride;
        float top_v[MAX_K];
        int64_t top_i[MAX_K];
        int64_t n = 0;
        for (int64_t t = 0; t < vocab; ++t) {
            /* Once k candidates are held, skip whole blocks with nothing above the k-th: a compare-
             * and-or loop the compiler vectorises (no float arithmetic, so no reassociation). */
            if (n == k && (t & (BLOCK - 1)) == 0 && t + BLOCK <= vocab) {
                float floor_v = top_v[k - 1];
                int above = 0;
                for (int64_t b = 0; b < BLOCK; ++b) above |= row[t + b] > floor_v;
                if (!above) {
                    t += BLOCK - 1;
                    continue;
                }
            }
            float v = row[t];
            if (n == k && !(v > top_v[k - 1])) continue;  /* NaN never enters */
            int64_t j = n < k ? n++ : k - 1;
            while (j > 0 && top_v[j - 1] < v) {
                top_v[j] = top_v[j - 1];
                top_i[j] = top_i[j - 1];
                --j;
            }
            top_v[j] = v;
            top_i[j] = t;
        }
        for (int64_t j = 0; j < n; ++j) {
            const float *w = weight + top_i[j] * width;
            double sum = 0.0;
            for (int64_t i = 0; i < width; ++i) sum += (double)h[i] * (double)w[i];
            row[top_i[j]] = (float)sum;
        }
    }
    return 0;
}
