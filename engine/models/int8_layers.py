"""The int8 decoder layers of a decoding or verification step on the CPU: each layer's four int8
matmuls from Python (`int8.matmul`: AMX tiles or fbgemm through TorchScript, the same bits), everything
between them in one C call per gap (specd_kernels/decoder/cpu.c: norms and per-row scaling, rotary + K/V
store, attention, skip connections). Where every weight has AMX tiles, each half layer is one C call
with its matmuls inside (`decoder_attention_tiled`, `decoder_down_tiled`), the SwiGLU between them.

Why: the layer-by-op path (LlamaModel._layer) makes ~25 Python-level calls per layer around its
matmuls (kernel wrappers and their checks, views, allocations). perf on a batch-1 step of the default
model (2-core dev CPU) put the Python interpreter and torch's Python bindings at ~5.5 ms of ~19 ms,
while fbgemm's second thread waited. Here a layer makes 4 matmul calls, 5 C calls and the SwiGLU.

The C calls are the ones the layer-by-op path makes, in the same order on the same inputs, and the
SwiGLU is the same torch expression on the same layout, so every row has the same bits on both
paths (tests/unit/test_int8_layers.py): a request may decode here and be verified in a step that
also prefills another request (which takes the other path) and stay lossless.

Used when the step has no prompt rows routed to fp32 (engine/models/linear.py PromptRowsDense), the
kernel backend is "auto" and the step's attention plan is the C kernel's; LlamaModel decides.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from engine.models import int8
from engine.models.int8 import Int8Weight, RowScaledInt8Linear
from specd_kernels import backend
from specd_kernels.attention.cpu import CpuPlan
from specd_kernels.decoder import cpu as decoder_cpu
from specd_kernels.int8_matmul.cpu import PackedInt8
from specd_kernels.int8_matmul.ref import INV_SCALE
from specd_kernels.rowscale.ref import FIT, LO_GAIN, LO_WEIGHT, STEP


def _int8_part(weight) -> Int8Weight:
    return getattr(weight, "int8", weight)  # a HybridWeight's int8 half, or the Int8Weight itself


def _ptr(tensor: torch.Tensor | None) -> int | None:
    assert tensor is None or tensor.is_contiguous(), "the C side reads packed rows"
    return None if tensor is None else tensor.data_ptr()


MATMULS = ("qkv", "o", "gate_up", "down")


def _check(code: int) -> None:
    if code == 3:
        raise MemoryError("C decoder layer: no memory for a matmul's quantized rows")
    if code != 0:
        raise ValueError("C decoder layer: head_dim unsupported (even, at most 512), a slot out of range "
                         "or no memory for attention")


def _tiled(packed: PackedInt8) -> decoder_cpu.TiledWeight:
    return decoder_cpu.TiledWeight(
        tiles=packed.tiles.data_ptr(), colsum=packed.colsum.data_ptr(), col_scale=packed.col_scale.data_ptr(),
        n=packed.n, k=packed.k, n_pad=packed.tiles.shape[0] * 16, k_pad=packed.tiles.shape[1] * 4)


def _y_width(weight: Int8Weight) -> int:
    """Columns of the matmul's output: the channels, then one per split channel's residual row."""
    split = weight.residual_of
    return weight.out_features + (0 if split is None else int((split >= 0).sum()))


class Int8Layers:
    """Runs every decoder layer of a step (see the module docstring). Owns per-step scratch buffers:
    one instance per model, used by the engine thread only."""

    def __init__(self, model, int8_linear: RowScaledInt8Linear, lib):
        cfg = model.config
        self.lib, self.linear, self.config = lib, int8_linear, cfg
        self.qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.step = decoder_cpu.DecoderStep(
            hidden=cfg.hidden_size, inter=cfg.intermediate_size, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, scale=model.scale,
            fit=FIT, inv_step=1 / STEP, step=STEP, lo_gain=LO_GAIN, lo_weight=LO_WEIGHT, inv_scale=float(INV_SCALE))
        self.step_ptr = ctypes.addressof(self.step)
        weights = [[_int8_part(getattr(layer, n)) for n in MATMULS] for layer in model.layers]
        # Every matmul on AMX tiles, or every one from Python: one C call per half layer needs all four.
        self.tiled = all(w.tiles is not None for ws in weights for w in ws)  # tiles only where AMX runs
        self.y_width = max(_y_width(w) for ws in weights for w in ws)
        self.layers = [self._layer_struct(layer) for layer in model.layers]
        self._bound_caches = None
        self._scratch: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, model, int8_linear: RowScaledInt8Linear):
        """An instance when the C kernels build here (None otherwise: the layer-by-op path runs).
        int8_linear is the model's layer-by-op int8 linear, whose input buffers both paths share."""
        if model.device.type != "cpu":
            return None
        lib = decoder_cpu.load()
        return None if lib is None else cls(model, int8_linear, lib)

    def _layer_struct(self, layer) -> tuple:
        weights = {name: _int8_part(getattr(layer, name)) for name in layer.linear_weights()}
        struct = decoder_cpu.DecoderLayer(
            input_norm=_ptr(layer.input_norm), post_norm=_ptr(layer.post_norm), qkv_bias=_ptr(layer.qkv_bias),
            o_bias=_ptr(layer.o_bias), **{f"{n}_split": _ptr(w.residual_of) for n, w in weights.items()},
            **{f"{n}_y_width": _y_width(w) for n, w in weights.items()})
        if self.tiled:
            for name in MATMULS:
                setattr(struct, name, _tiled(weights[name].tiles))
        # (the matmuls' weights, the C struct, its address) - the tensors the struct points to
        # belong to the layer, which the model keeps
        return tuple(weights[n] for n in MATMULS), struct, ctypes.addressof(struct)

    @staticmethod
    def applies(meta) -> bool:
        """Whether a step with this metadata may run here (see the module docstring)."""
        prompt_rows = meta.prompt_rows
        return (isinstance(meta.plan, CpuPlan) and backend.get_backend() == "auto"
                and (prompt_rows is None or not bool(prompt_rows.any())))

    def _buffer(self, name: str, rows: int, width: int) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = self._scratch[name] = torch.empty(max(rows, 16, 0 if buf is None else 2 * buf.shape[0]), width)
        return buf

    def _bind_caches(self, kv_caches) -> None:
        """Point each layer at its cache (the runner keeps one list; rebound only if it changes)."""
        if self._bound_caches is kv_caches:
            return
        for (_, struct, _), (k_cache, v_cache) in zip(self.layers, kv_caches):
            assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (torch.float32, torch.float16)
            assert k_cache.is_contiguous() and v_cache.is_contiguous()
            struct.k_cache, struct.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        k_cache = kv_caches[0][0]
        self.step.kv_half = k_cache.dtype == torch.float16
        self.step.block_size = k_cache.shape[1]
        self.step.num_slots = k_cache.numel() // (self.config.num_kv_heads * self.config.head_dim)
        self._bound_caches = kv_caches

    def _bind_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta) -> tuple:
        rows, cfg, st, plan = x.shape[0], self.config, self.step, meta.plan
        in_hidden, scales = self.linear.buffers(rows, cfg.hidden_size)
        in_inter, _ = self.linear.buffers(rows, cfg.intermediate_size)
        gate_up = self._buffer("gate_up", rows, 2 * cfg.intermediate_size)
        slots = meta.slot_mapping if meta.slot_mapping.dtype == torch.int64 else meta.slot_mapping.long()
        keep = (slots.contiguous(), cos.contiguous(), sin.contiguous())  # alive until the step ends
        st.rows, st.num_threads = rows, torch.get_num_threads()
        st.x, st.in_hidden, st.in_inter, st.scales = x.data_ptr(), in_hidden.data_ptr(), in_inter.data_ptr(), scales.data_ptr()
        st.qkv = self._buffer("qkv", rows, self.qkv_width).data_ptr()
        st.attn = self._buffer("attn", rows, cfg.num_heads * cfg.head_dim).data_ptr()
        st.gate_up = gate_up.data_ptr()
        st.slots, st.cos, st.sin = (t.data_ptr() for t in keep)
        st.cu_q, st.kv_lens, st.block_tables = (plan.cu_seqlens_q.data_ptr(), plan.kv_lens.data_ptr(),
                                                plan.block_tables.data_ptr())
        st.max_blocks, st.num_reqs, st.req_ids = plan.block_tables.shape[1], plan.req_ids.numel(), plan.req_ids.data_ptr()
        st.tree_mask, st.cu_tree_mask = _ptr(plan.tree_mask), _ptr(plan.cu_tree_mask)
        st.prompt_rows = _ptr(plan.prompt_rows)
        st.hidden_keys = _ptr(plan.hidden_keys)
        st.hidden_stride = 0 if plan.hidden_keys is None else plan.hidden_keys.shape[1]
        if self.tiled:
            st.y = self._buffer("y", 2 * rows + 1, self.y_width).data_ptr()
        return keep, in_hidden[: 2 * rows + 1], in_inter[: 2 * rows + 1], gate_up[:rows]

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """x # [rows, hidden] fp32 contiguous embeddings -> the last layer's output (x, updated in place)."""
        self._bind_caches(kv_caches)
        _keep, in_hidden, in_inter, gate_up = self._bind_step(x, cos, sin, meta)
        lib, step, inter, matmul = self.lib, self.step_ptr, self.config.intermediate_size, int8.matmul
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if self.tiled:
            for _, _, layer in self.layers:
                _check(lib.decoder_attention_tiled(step, layer))
                act = F.silu(gate).mul_(up)  # the layer-by-op path's expression: the same bits
                assert act.stride(0) == inter, "the C side reads the SwiGLU rows packed"
                _check(lib.decoder_down_tiled(step, layer, act.data_ptr()))
            return x
        # Each matmul's output is named until its C call returns: a temporary would be freed first.
        for (qkv, o, gate_up_w, down), _, layer in self.layers:
            lib.decoder_before_qkv(step, layer)
            y = matmul(in_hidden, qkv)
            _check(lib.decoder_after_qkv(step, layer, y.data_ptr()))
            y = matmul(in_hidden, o)
            lib.decoder_after_o(step, layer, y.data_ptr())
            y = matmul(in_hidden, gate_up_w)
            lib.decoder_after_gate_up(step, layer, y.data_ptr())
            act = F.silu(gate).mul_(up)  # the layer-by-op path's expression: the same bits
            assert act.stride(0) == inter, "the C side reads the SwiGLU rows packed"
            lib.decoder_before_down(step, act.data_ptr())
            y = matmul(in_inter, down)
            lib.decoder_after_down(step, layer, y.data_ptr())
        return x
