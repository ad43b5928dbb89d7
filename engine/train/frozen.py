"""The frozen base model with a differentiable forward, for training drafters on top of it.

The serving forward (engine/models/llama.py) runs under inference mode over a paged cache; training
needs gradients to flow through the frozen layers into a few new parameters (PaSS look-ahead
embeddings) and a dense attention mask that lets many groups of extra rows share one prefix. This
module reuses the serving model's weights, RoPE tables and RoPE rotation, and adds only the dense,
autograd-friendly layer loop. Its outputs match the serving runner's look-ahead rows (tested).

Shapes: T = prefix tokens, N = extra rows, H / KVH / D = heads / kv heads / head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.models.llama import LlamaModel
from specd_kernels.rope import apply_rope


@dataclass
class Prefix:
    """A sequence's K/V at every layer (no grad) and its final-normed hidden states."""

    keys: list[torch.Tensor]  # per layer [T, KVH, D], RoPE applied
    values: list[torch.Tensor]  # per layer [T, KVH, D]
    hidden: torch.Tensor  # [T, hidden]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]


class FrozenLlama:
    """Frozen fp32 weights on `device`; `prefix` (no grad) then `extend` (differentiable)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        self.config = ModelConfig.from_hf_dir(model_dir)
        self.model = LlamaModel.from_hf_dir(model_dir, self.config, device, "fp32", linear_backend="dense")
        self.device = torch.device(device)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def embed(self) -> torch.Tensor:
        return self.model.embed  # [vocab, hidden]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden # [..., hidden] (final-normed) -> logits # [..., vocab]."""
        return F.linear(hidden, self.model.lm_head)

    @torch.no_grad()
    def prefix(self, token_ids: list[int] | torch.Tensor) -> Prefix:
        """Causal forward over one sequence, keeping every layer's K/V for `extend`."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(ids.numel(), device=self.device)
        hidden, keys, values = self._forward(F.embedding(ids, self.model.embed), positions, None, None, None)
        return Prefix(keys, values, hidden)

    def extend(self, prefix: Prefix, embeds: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Extra rows with given input embeddings over a prefix; differentiable in `embeds`.

        embeds # [N, hidden]; positions # [N]; mask # [N, T + N] bool (True = may attend).
        Returns final-normed hidden states # [N, hidden].
        """
        hidden, _, _ = self._forward(embeds, positions, prefix.keys, prefix.values, mask)
        return hidden

    def _forward(self, x, positions, past_keys, past_values, mask):
        m, cfg = self.model, self.config
        cos = m.cos_table[positions].unsqueeze(1)  # [N, 1, D]
        sin = m.sin_table[positions].unsqueeze(1)
        keys, values = [], []
        for i, layer in enumerate(m.layers):
            past = (past_keys[i], past_values[i]) if past_keys is not None else None
            x, k, v = self._layer(layer, x, cos, sin, past, mask)
            keys.append(k)
            values.append(v)
        return F.rms_norm(x, (x.shape[-1],), m.final_norm, cfg.rms_norm_eps), keys, values

    def _layer(self, layer, x, cos, sin, past, mask):
        cfg = self.config
        num_rows, hidden = x.shape
        num_heads, num_kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        num_qk = (num_heads + num_kv_heads) * head_dim
        h = F.rms_norm(x, (hidden,), layer.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)
        qk = apply_rope(qkv[:, :num_qk].view(num_rows, num_heads + num_kv_heads, head_dim), cos, sin)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        v = qkv[:, num_qk:].view(num_rows, num_kv_heads, head_dim)
        all_k = torch.cat([past[0], k]) if past is not None else k
        all_v = torch.cat([past[1], v]) if past is not None else v
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), all_k.transpose(0, 1).unsqueeze(0), all_v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=mask is None, scale=self.model.scale, enable_gqa=True,
        )  # [1, H, N, D]
        attn = attn.squeeze(0).transpose(0, 1).reshape(num_rows, num_heads * head_dim)
        x = x + F.linear(attn, layer.o, layer.o_bias)
        h = F.rms_norm(x, (hidden,), layer.post_norm, cfg.rms_norm_eps)
        gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down), k.detach(), v.detach()
