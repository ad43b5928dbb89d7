"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached)."""
from __future__ import annotations

import ctypes
from pathlib import Path

from specd_kernels.cbuild import F32P, I64, load as _load

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (("rescore_top_k", (F32P, I64, I64, I64, F32P, I64, F32P, I64, I64), ctypes.c_int),)


def load():
    return _load(SOURCE, SIGNATURES)
