"""Ragged paged attention with per-request tree masks; dispatch point for backends.

Today every device uses the torch reference (`ref.py`); the Triton kernel will take CUDA tensors.
"""
from kernels.attention.ref import MAX_BATCHED_Q_LEN, AttentionPlan, paged_attention, plan_attention

__all__ = ["paged_attention", "plan_attention", "AttentionPlan", "MAX_BATCHED_Q_LEN"]
