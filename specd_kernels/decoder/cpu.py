"""`cpu.c` through specd_kernels/cbuild.py, and the two structs it reads (field order as in cpu.c)."""
from __future__ import annotations

import ctypes
from pathlib import Path

from specd_kernels.cbuild import F32P, load as _load

SOURCE = Path(__file__).with_name("cpu.c")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F32 = ctypes.c_float


class DecoderStep(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("rows", "hidden", "inter", "num_heads", "num_kv_heads", "head_dim",
                                     "block_size", "num_slots", "num_threads")]
                + [(n, _F32) for n in ("eps", "scale", "fit", "inv_step", "step", "lo_gain", "lo_weight")]
                + [(n, _P) for n in ("x", "in_hidden", "in_inter", "scales", "qkv", "attn", "gate_up", "cos",
                                     "sin", "slots", "cu_q", "kv_lens", "block_tables")]
                + [("max_blocks", _I64), ("num_reqs", _I64), ("req_ids", _P), ("tree_mask", _P),
                   ("cu_tree_mask", _P), ("kv_half", _I64), ("y", _P), ("inv_scale", _F32), ("prompt_rows", _P),
                   ("hidden_keys", _P), ("hidden_stride", _I64)])


class TiledWeight(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("tiles", "colsum", "col_scale")] + [(n, _I64) for n in ("n", "k", "n_pad", "k_pad")]


class DecoderLayer(ctypes.Structure):
    _fields_ = ([(n, _P) for n in ("input_norm", "post_norm", "qkv_bias", "o_bias", "qkv_split", "o_split",
                                   "gate_up_split", "down_split")]
                + [(n, _I64) for n in ("qkv_y_width", "o_y_width", "gate_up_y_width", "down_y_width")]
                + [("k_cache", _P), ("v_cache", _P)]
                + [(n, TiledWeight) for n in ("qkv", "o", "gate_up", "down")])


SIGNATURES = (
    ("decoder_before_qkv", (_P, _P)),
    ("decoder_after_qkv", (_P, _P, F32P), ctypes.c_int),
    ("decoder_after_o", (_P, _P, F32P)),
    ("decoder_after_gate_up", (_P, _P, F32P)),
    ("decoder_before_down", (_P, F32P)),
    ("decoder_after_down", (_P, _P, F32P)),
    ("decoder_attention_tiled", (_P, _P), ctypes.c_int),
    ("decoder_down_tiled", (_P, _P, F32P), ctypes.c_int),
)


def load():
    return _load(SOURCE, SIGNATURES)
