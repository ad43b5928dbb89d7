"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from specd_kernels.cbuild import F32P, I64, I64P, load as _load

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (
    ("rotate_and_store", (F32P, I64, I64, F32P, F32P, I64, I64, I64, F32P, F32P, I64P, I64, I64), ctypes.c_int),
    ("kv_half_supported", (), ctypes.c_int),
)


def load():
    return _load(SOURCE, SIGNATURES)


@functools.cache
def kv_half_supported() -> bool:
    """Whether the C kernels here can hold K/V in fp16 (they need F16C; specd_kernels/half.h). Asked once:
    the rope store and the attention read it on every call."""
    lib = load()
    return lib is not None and bool(lib.kv_half_supported())
