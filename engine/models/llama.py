"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a flat ragged batch of many requests.

One forward takes the new tokens of every scheduled request back to back (no padding, EMS-SD),
stores their K/V into the paged cache and attends through kernels.attention. Weights come straight
from the HF directory's safetensors with q/k/v and gate/up fused, so a layer runs three matmuls
plus o_proj instead of seven.

CPU performance notes (PLATFORM.md): fp32 decode is bound by reading the weights, and few-row
matmuls are ~1.3-1.5x faster through oneDNN with pre-packed weights than through MKL's F.linear;
which one wins is measured at load time on this machine (not guessed from the CPU vendor). Per-layer
Python work is kept to a handful of tensor ops: RoPE cos/sin are gathered once per forward and the
attention layout (masks, gather indices) is planned once per step by the runner.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.models.int8 import SPLIT_LAYERS, RowScaledInt8Linear, quantize_weight
from kernels.attention import AttentionPlan, paged_attention
from kernels.rescore import rescore_top_k
from kernels.rope import rotate_and_store

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATION_DTYPES = {**TORCH_DTYPES, **dict.fromkeys(SPLIT_LAYERS, torch.float32)}  # int8: fp32 activations, KV
# An int8 lm_head's leading candidates per row get exact fp32 logits (kernels/rescore): 10 matched a
# split lm_head's top-1 agreement with fp32 on 24 dev prompts.
RESCORE_TOP_K = 10


@dataclass
class AttentionMetadata:
    """The step's token layout, shared by every layer (built by engine/model_runner.py)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache slot of each new token
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    kv_lens: torch.Tensor  # [batch] int32, after this step's K/V are stored
    block_tables: torch.Tensor  # [batch, max_blocks_per_seq] int32
    tree_mask: torch.Tensor | None = None  # [sum of tree block sizes] bool (see kernels/attention/ref.py)
    cu_tree_mask: torch.Tensor | None = None  # [batch + 1]
    plan: AttentionPlan | None = None


def _dense_linear(x, weight, bias):
    return F.linear(x, weight, bias)


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default  # the overload: no per-call Python dispatch checks


def _onednn_linear(x, weight, bias):
    # weight was packed by torch.ops.mkldnn._reorder_linear_weight; x stays a plain dense tensor.
    return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight)


class _FusedLinear:
    """A plain matmul behind the int8 layer's interface (engine/models/int8.py): `(x, weight, bias,
    norm=(weight, eps) applied to x first, residual that receives the output in place)`, so the
    decoder layer is written once for every backend."""

    def __init__(self, matmul):
        self.matmul = matmul

    def __call__(self, x, weight, bias, norm=None, residual=None):
        if norm is not None:
            x = F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])
        y = self.matmul(x, weight, bias)
        return y if residual is None else residual.add_(y)


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden] (or packed)
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, num_heads * head_dim]
    o_bias: torch.Tensor | None  # Llama with attention_bias=True; Qwen2 has none
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]

    def linear_weights(self) -> list[str]:
        return ["qkv", "o", "gate_up", "down"]


def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of every *.safetensors file in an HF model directory."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    weights = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name)
    return weights


def _rope_tables(config: ModelConfig, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables [max_positions, head_dim] (HF "default" rope, rotate_half)."""
    dim = config.head_dim
    # Same fp32 arithmetic as HF's LlamaRotaryEmbedding so positions agree to the last bit.
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2].neg_()  # sign-folded for kernels/rope (see apply_rope there)
    return emb.cos().to(device, dtype), sin.to(device, dtype)


class LlamaModel:
    """A plain class, not nn.Module: no hooks or parameter registries on the per-token path."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: str = "cpu",
                 dtype: str = "fp32", linear_backend: str = "auto"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = ACTIVATION_DTYPES[dtype]
        self.scale = config.head_dim**-0.5
        get = lambda name: weights[name].to(self.device, self.dtype)  # noqa: E731
        self.embed = get("model.embed_tokens.weight")  # [vocab, hidden]
        self.final_norm = get("model.norm.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = self.embed if tied else get("lm_head.weight")  # [vocab, hidden]
        self.layers = [self._load_layer(get, weights, i) for i in range(config.num_layers)]
        self.cos_table, self.sin_table = _rope_tables(config, self.device, self.dtype)
        self.linear_backend = "int8" if dtype in SPLIT_LAYERS else self._choose_backend(linear_backend)
        self.exact_lm_head = self.lm_head if self.linear_backend == "int8" else None  # fp32, for rescoring
        if self.linear_backend == "int8":
            self._linear = RowScaledInt8Linear()
            self._pack_all(lambda weight, name: quantize_weight(weight, split=name in SPLIT_LAYERS[dtype]))
        elif self.linear_backend == "onednn":
            self._linear = _FusedLinear(_onednn_linear)
            self._pack_all(lambda weight, name: _pack(weight))
        else:
            self._linear = _FusedLinear(_dense_linear)

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path, config: ModelConfig | None = None, device: str = "cpu",
                    dtype: str = "fp32", linear_backend: str = "auto") -> "LlamaModel":
        config = config or ModelConfig.from_hf_dir(model_dir)
        return cls(config, load_hf_weights(Path(model_dir)), device, dtype, linear_backend)

    def _load_layer(self, get, weights, i: int) -> _Layer:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_bias = None
        if self.config.attention_bias or (a + "q_proj.bias") in weights:
            qkv_bias = torch.cat([get(a + f"{n}_proj.bias") for n in "qkv"])
        return _Layer(
            input_norm=get(p + "input_layernorm.weight"),
            qkv=torch.cat([get(a + f"{n}_proj.weight") for n in "qkv"]),
            qkv_bias=qkv_bias,
            o=get(a + "o_proj.weight"),
            o_bias=get(a + "o_proj.bias") if (a + "o_proj.bias") in weights else None,
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
            down=get(p + "mlp.down_proj.weight"),
        )

    # ------------------------------------------------------------------ linear backend

    def _choose_backend(self, requested: str) -> str:
        if requested != "auto":
            return requested
        if self.device.type != "cpu" or self.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return "dense"
        try:
            return _measure_backends(self.layers[: min(8, len(self.layers))])
        except RuntimeError as e:  # an oneDNN build without the packed-linear op
            log.info("oneDNN linear unavailable (%s); using F.linear", e)
            return "dense"

    def _pack_all(self, pack) -> None:
        """Replace every linear weight (and the lm_head) by the backend's packed form, pack(weight, name)."""
        for layer in self.layers:
            for name in layer.linear_weights():
                setattr(layer, name, pack(getattr(layer, name), name))
        # The embedding lookup needs the dense matrix, so a tied lm_head gets its own packed copy.
        self.lm_head = pack(self.lm_head, "lm_head")

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        attn_metadata: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer ([num_blocks, block_size, kv_heads, head_dim] x2)
        input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,  # (rows [n] int64, embeddings [n, hidden])
    ) -> torch.Tensor:
        """Final-normed hidden states # [num_tokens, hidden] (pass sampled rows to compute_logits).

        input_embeds replaces the input embedding of the given rows (PaSS look-ahead embeddings)."""
        x = F.embedding(input_ids, self.embed)
        if input_embeds is not None:
            x[input_embeds[0]] = input_embeds[1].to(x.dtype)
        cos = self.cos_table[positions]  # [num_tokens, head_dim]
        sin = self.sin_table[positions]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = self._layer(layer, x, cos, sin, attn_metadata, k_cache, v_cache)
        return F.rms_norm(x, (x.shape[-1],), self.final_norm, self.config.rms_norm_eps)

    def _layer(self, layer: _Layer, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
        cfg, lin = self.config, self._linear
        num_tokens = x.shape[0]
        num_heads, num_kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        qkv = lin(x, layer.qkv, layer.qkv_bias, norm=(layer.input_norm, eps))  # [num_tokens, (H + 2 * KVH) * D]
        q = rotate_and_store(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, num_heads, num_kv_heads)
        attn = paged_attention(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.kv_lens, meta.block_tables, self.scale,
            meta.tree_mask, meta.cu_tree_mask, plan=meta.plan,
        )
        x = lin(attn.reshape(num_tokens, num_heads * head_dim), layer.o, layer.o_bias, residual=x)
        gate_up = lin(x, layer.gate_up, None, norm=(layer.post_norm, eps))  # [num_tokens, 2 * intermediate]
        inter = cfg.intermediate_size
        return lin(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), layer.down, None, residual=x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden # [num_rows, hidden] (final-normed) -> logits # [num_rows, vocab] fp32."""
        logits = self._linear(hidden, self.lm_head, None).float()
        if self.exact_lm_head is not None:
            rescore_top_k(logits, hidden, self.exact_lm_head, RESCORE_TOP_K)
        return logits


def _measure_backends(layers: list[_Layer], reps: int = 5) -> str:
    """Time F.linear against packed oneDNN on a few layers' weights (more than the cache holds)."""
    weights = [getattr(layer, n) for layer in layers for n in layer.linear_weights()]
    packed = [_pack(w) for w in weights]
    hidden = weights[0].shape[1]
    gen = torch.Generator().manual_seed(0)
    inputs = {m: {w.shape[1]: torch.randn(m, w.shape[1], generator=gen) for w in weights} for m in (1, 8)}

    def run(fn, ws, m):
        t = time.perf_counter()
        for w in ws:
            fn(inputs[m][w.shape[1]], w, None)
        return time.perf_counter() - t

    best = {(b, m): float("inf") for b in ("dense", "onednn") for m in (1, 8)}
    for _ in range(reps):  # interleaved, best of reps per shape: robust to a noisy neighbour
        for m in (1, 8):
            best["dense", m] = min(best["dense", m], run(_dense_linear, weights, m))
            best["onednn", m] = min(best["onednn", m], run(_onednn_linear, packed, m))
    dense, onednn = (sum(best[b, m] for m in (1, 8)) for b in ("dense", "onednn"))
    x = inputs[1][hidden]
    ref = F.linear(x, weights[0])
    err = (_onednn_linear(x, packed[0], None) - ref).abs().max() / ref.abs().max()
    choice = "onednn" if onednn < 0.95 * dense and err < 1e-5 else "dense"
    log.info("linear backend %s (dense %.2f ms, onednn %.2f ms for rows 1 + 8, rel err %.1e)", choice,
             dense * 1e3, onednn * 1e3, err)
    return choice
