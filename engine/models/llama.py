"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a flat ragged batch of many requests.

One forward takes the new tokens of every scheduled request back to back (no padding, EMS-SD),
stores their K/V into the paged cache and attends through specd_kernels.attention. Weights come straight
from the HF directory's safetensors with q/k/v and gate/up fused, so a layer runs three matmuls
plus o_proj instead of seven.

CPU performance notes (PLATFORM.md): fp32 decode is bound by reading the weights; the linear
backends (MKL or oneDNN, measured at load; int8 with prompt rows in fp32) are engine/models/linear.py.
Per-layer Python work is kept to a handful of tensor ops: RoPE cos/sin are gathered once per forward
and the attention layout (masks, gather indices) is planned once per step by the runner. An int8
step without fp32 prompt rows runs its layers through engine/models/int8_layers.py instead: the same
arithmetic with one C call per gap between matmuls, no per-op Python.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.models.int8 import SPLIT_SHARES, RowScaledInt8Linear, quantize_weight
from engine.models.int8_layers import Int8Layers
from engine.models.linear import (HybridWeight, PromptRowsDense, choose_prompt_linear, fp32_backend,
                                  measure_backends, swiglu_block)
from specd_kernels.attention import AttentionPlan, paged_attention
from specd_kernels.rescore import rescore_top_k
from specd_kernels.rope import rotate_and_store

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATION_DTYPES = {**TORCH_DTYPES, **dict.fromkeys(SPLIT_SHARES, torch.float32)}  # int8: fp32 activations, KV
# An int8 lm_head's leading candidates per row get exact fp32 logits (specd_kernels/rescore): 10 matched a
# split lm_head's top-1 agreement with fp32 on 24 dev prompts.
RESCORE_TOP_K = 10


@dataclass
class AttentionMetadata:
    """The step's token layout, shared by every layer (built by engine/model_runner.py)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache slot of each new token
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    kv_lens: torch.Tensor  # [batch] int32, after this step's K/V are stored
    block_tables: torch.Tensor  # [batch, max_blocks_per_seq] int32
    tree_mask: torch.Tensor | None = None  # [sum of tree block sizes] bool (see specd_kernels/attention/ref.py)
    cu_tree_mask: torch.Tensor | None = None  # [batch + 1]
    plan: AttentionPlan | None = None
    prompt_rows: torch.Tensor | None = None  # [num_tokens] bool: the row's token is a prompt token (None: none)


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
    sin[:, : dim // 2].neg_()  # sign-folded for specd_kernels/rope (see apply_rope there)
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
        self.dense_lm_head = self.lm_head  # stays unpacked and unquantized (rescoring, the recycle drafter)
        self.layers = [self._load_layer(get, weights, i) for i in range(config.num_layers)]
        self.cos_table, self.sin_table = _rope_tables(config, self.device, self.dtype)
        self.linear_backend = "int8" if dtype in SPLIT_SHARES else self._choose_backend(linear_backend)
        self.exact_lm_head = self.dense_lm_head if self.linear_backend == "int8" else None  # for rescoring
        self.prompt_rows_dense = False  # int8: prompt-token rows through a dense linear (engine/models/linear.py)
        self.prompt_linear_name: str | None = None  # int8: which (a PromptLinear's name, or "int8")
        self.int8_layers: Int8Layers | None = None  # int8 decoding steps' layers on the CPU (None: layer by op)
        if self.linear_backend == "int8":
            self._init_int8(dtype)
        else:
            pack, self._linear = fp32_backend(self.linear_backend)
            self._logits_linear = self._linear
            if self.linear_backend != "dense":
                self._pack_layers(lambda weight, name: pack(weight))
                self.lm_head = pack(self.lm_head)  # a tied lm_head gets its own copy: the embedding stays dense

    def _init_int8(self, dtype: str) -> None:
        def quantize(weight, name):
            return quantize_weight(weight, SPLIT_SHARES[dtype].get(name, 0.0))

        first = [getattr(self.layers[0], name) for name in self.layers[0].linear_weights()]
        prompt_linear = None
        if self.device.type == "cpu" and torch.backends.mkldnn.is_available():
            prompt_linear = choose_prompt_linear(first)
        self.prompt_rows_dense = prompt_linear is not None
        self.prompt_linear_name = prompt_linear.name if prompt_linear is not None else "int8"
        if prompt_linear is not None:
            self._linear = PromptRowsDense(prompt_linear)
            self._logits_linear = self._linear.int8
            self._pack_layers(lambda weight, name: HybridWeight(prompt_linear.pack(weight), quantize(weight, name)))
        else:
            log.info("int8 prompt rows stay int8: oneDNN's packed linears are missing or not batch-invariant")
            self._linear = self._logits_linear = RowScaledInt8Linear()
            self._pack_layers(quantize)
        self.lm_head = quantize(self.lm_head, "lm_head")
        # The logits' linear is the int8 one on both branches; the fused layers share its buffers.
        self.int8_layers = Int8Layers.build(self, int8_linear=self._logits_linear)

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
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return "dense"
        return measure_backends([getattr(layer, n) for layer in self.layers[:8] for n in layer.linear_weights()])

    def _pack_layers(self, pack) -> None:
        """Replace every decoder layer's linear weights by the backend's form, pack(weight, name)."""
        for layer in self.layers:
            for name in layer.linear_weights():
                setattr(layer, name, pack(getattr(layer, name), name))

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
        if self.prompt_rows_dense:
            self._linear.set_rows(attn_metadata.prompt_rows)
        x = F.embedding(input_ids, self.embed)
        if input_embeds is not None:
            x[input_embeds[0]] = input_embeds[1].to(x.dtype)
        cos = self.cos_table[positions]  # [num_tokens, head_dim]
        sin = self.sin_table[positions]
        if self.int8_layers is not None and Int8Layers.applies(attn_metadata):
            x = self.int8_layers.run(x, cos, sin, attn_metadata, kv_caches)
        else:
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
        mlp = getattr(lin, "mlp", None)  # PromptRowsDense: prompt rows' SwiGLU block fused
        if mlp is not None:
            return mlp(x, layer.gate_up, layer.down, (layer.post_norm, eps), cfg.intermediate_size)
        return swiglu_block(lin, x, layer.gate_up, layer.down, (layer.post_norm, eps), cfg.intermediate_size)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden # [num_rows, hidden] (final-normed) -> logits # [num_rows, vocab] fp32."""
        logits = self._logits_linear(hidden, self.lm_head, None).float()
        if self.exact_lm_head is not None:
            rescore_top_k(logits, hidden, self.exact_lm_head, RESCORE_TOP_K)
        return logits
