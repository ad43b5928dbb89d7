"""KV cache writes; dispatch point for backends (today always the torch reference)."""
from kernels.kv_cache_ops.ref import copy_slots, store_kv

__all__ = ["store_kv", "copy_slots"]
