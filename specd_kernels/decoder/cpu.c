/* specd: the work between the int8 matmuls of a decoder layer, one C call per gap, for decoding and
 * verification steps on the CPU (engine/models/int8_layers.py drives it; the fbgemm matmuls stay in
 * torch). A batch-1 step made ~25 Python-level calls per layer around its four matmuls (kernel
 * wrappers, checks, views, allocations): ~5 ms of a ~19 ms step in perf on the 2-core dev CPU.
 *
 * Each gap calls the same C functions, in the same order and on the same inputs, as the layer-by-op
 * path (engine/models/llama.py `_layer` with specd_kernels/rowscale, specd_kernels/rope, specd_kernels/attention), so
 * every row's bits are the same on both paths; tests/unit/test_int8_layers.py holds them to that.
 */
#include "../rowscale/cpu.c"
#include "../rope/cpu.c"
#include "../attention/cpu.c"
#include "../int8_matmul/cpu.c"

/* What every layer of one step shares: its rows, buffers, rotary tables, slots and attention plan. */
typedef struct {
    int64_t rows, hidden, inter, num_heads, num_kv_heads, head_dim, block_size, num_slots, num_threads;
    float eps, scale, fit, inv_step, step, lo_gain, lo_weight;
    float *x;         /* [rows, hidden] the residual stream */
    float *in_hidden; /* [1 + 2 * rows, hidden] int8 linear input (row 0: the sentinel) */
    float *in_inter;  /* [1 + 2 * rows, inter] */
    float *scales;    /* [rows] */
    float *qkv;       /* [rows, (heads + 2 * kv_heads) * head_dim] */
    float *attn;      /* [rows, heads * head_dim] */
    float *gate_up;   /* [rows, 2 * inter] */
    const float *cos, *sin;
    const int64_t *slots;
    const int32_t *cu_q, *kv_lens, *block_tables;
    int64_t max_blocks, num_reqs;
    const int64_t *req_ids;
    const uint8_t *tree_mask;
    const int64_t *cu_tree_mask;
    int64_t kv_half; /* the caches hold fp16 (else fp32) */
    float *y;        /* [1 + 2 * rows, widest matmul output] the tiled matmuls' output (row 0 unused) */
    float inv_scale; /* the int8 activations' 1 / scale (specd_kernels/int8_matmul/ref.py) */
    const int32_t *prompt_rows; /* [num_reqs] leading prompt rows per request (the plan's; NULL: none) */
    const uint8_t *hidden_keys; /* [batch, hidden_stride] the plan's hidden context keys (NULL: none) */
    int64_t hidden_stride;
} decoder_step;

/* A matmul's weights in AMX tiles (specd_kernels/int8_matmul/cpu.py PackedInt8). */
typedef struct {
    const int8_t *tiles;
    const int32_t *colsum;
    const float *col_scale;
    int64_t n, k, n_pad, k_pad;
} tiled_weight;

/* One layer's weights besides the packed matmuls: norms, biases, split maps (NULL: none), the widths
 * of the matmuls' outputs (channels plus residual rows), its KV cache. */
typedef struct {
    const float *input_norm, *post_norm, *qkv_bias, *o_bias;
    const int32_t *qkv_split, *o_split, *gate_up_split, *down_split;
    int64_t qkv_y_width, o_y_width, gate_up_y_width, down_y_width;
    void *k_cache, *v_cache;
    tiled_weight qkv, o, gate_up, down; /* tiles NULL: the matmuls run from Python */
} decoder_layer;

static void prep_rows(const decoder_step *s, const float *x, int64_t width, const float *norm, float *buf) {
    rowscale_prep(x, s->rows, width, width, norm, s->eps, buf, s->scales, s->fit, s->inv_step, s->step, s->lo_gain);
}

static void finish_rows(const decoder_step *s, const float *y, int64_t width, int64_t y_width, const float *bias,
                        float *out, int32_t accumulate, const int32_t *split) {
    rowscale_finish(y, s->rows, width, y_width, s->scales, s->lo_weight, bias, out, width, accumulate, split);
}

/* Before a layer's qkv matmul: its input norm over the residual stream. */
void decoder_before_qkv(const decoder_step *s, const decoder_layer *l) {
    prep_rows(s, s->x, s->hidden, l->input_norm, s->in_hidden);
}

/* After qkv: rotary + K/V store, attention, o's input. Returns nonzero on a bad slot or no memory. */
int decoder_after_qkv(const decoder_step *s, const decoder_layer *l, const float *y) {
    int64_t q_width = s->num_heads * s->head_dim, width = q_width + 2 * s->num_kv_heads * s->head_dim;
    finish_rows(s, y, width, l->qkv_y_width, l->qkv_bias, s->qkv, 0, l->qkv_split);
    if (rotate_and_store(s->qkv, s->rows, width, s->cos, s->sin, s->num_heads, s->num_kv_heads, s->head_dim,
                         l->k_cache, l->v_cache, s->slots, s->num_slots, s->kv_half) != 0)
        return 1;
    if (s->num_reqs > 0 &&
        paged_attention_rows(s->qkv, width, l->k_cache, l->v_cache, s->cu_q, s->kv_lens, s->block_tables,
                             s->max_blocks, s->req_ids, s->num_reqs, s->num_heads, s->num_kv_heads, s->head_dim,
                             s->block_size, s->scale, s->tree_mask, s->cu_tree_mask, s->prompt_rows, s->hidden_keys,
                             s->hidden_stride, s->attn, s->num_threads, s->kv_half) != 0)
        return 2;
    prep_rows(s, s->attn, q_width, NULL, s->in_hidden);
    return 0;
}

/* After o: the skip connection, then gate/up's input norm. */
void decoder_after_o(const decoder_step *s, const decoder_layer *l, const float *y) {
    finish_rows(s, y, s->hidden, l->o_y_width, l->o_bias, s->x, 1, l->o_split);
    prep_rows(s, s->x, s->hidden, l->post_norm, s->in_hidden);
}

/* After gate/up: its output rows, for the SwiGLU torch computes (its bits, as on the other path). */
void decoder_after_gate_up(const decoder_step *s, const decoder_layer *l, const float *y) {
    finish_rows(s, y, 2 * s->inter, l->gate_up_y_width, NULL, s->gate_up, 0, l->gate_up_split);
}

/* down's input from the SwiGLU rows ([rows, inter] contiguous). */
void decoder_before_down(const decoder_step *s, const float *act) {
    prep_rows(s, act, s->inter, NULL, s->in_inter);
}

/* After down: the skip connection. */
void decoder_after_down(const decoder_step *s, const decoder_layer *l, const float *y) {
    finish_rows(s, y, s->hidden, l->down_y_width, NULL, s->x, 1, l->down_split);
}

/* A matmul on AMX tiles from a rowscale buffer (its row 0, fbgemm's sentinel, skipped) into s->y,
 * laid out as fbgemm's output is (row 0 unused), so the gap after it reads it the same way. */
static int tiled_matmul(const decoder_step *s, const float *buf, const tiled_weight *w) {
    return int8_matmul(buf + w->k, 2 * s->rows, w->k, w->tiles, w->n, w->n_pad, w->k_pad, w->colsum, w->col_scale,
                       s->inv_scale, s->y + w->n, w->n);
}

/* A layer up to its SwiGLU with the matmuls on AMX tiles: one call instead of four matmul calls and
 * four gap calls from Python. Returns decoder_after_qkv's codes, or 3 when a matmul has no memory. */
int decoder_attention_tiled(const decoder_step *s, const decoder_layer *l) {
    decoder_before_qkv(s, l);
    if (tiled_matmul(s, s->in_hidden, &l->qkv) != 0) return 3;
    int err = decoder_after_qkv(s, l, s->y);
    if (err != 0) return err;
    if (tiled_matmul(s, s->in_hidden, &l->o) != 0) return 3;
    decoder_after_o(s, l, s->y);
    if (tiled_matmul(s, s->in_hidden, &l->gate_up) != 0) return 3;
    decoder_after_gate_up(s, l, s->y);
    return 0;
}

/* The rest of the layer from the SwiGLU rows: down on AMX tiles and the skip connection. */
int decoder_down_tiled(const decoder_step *s, const decoder_layer *l, const float *act) {
    decoder_before_down(s, act);
    if (tiled_matmul(s, s->in_inter, &l->down) != 0) return 3;
    decoder_after_down(s, l, s->y);
    return 0;
}
