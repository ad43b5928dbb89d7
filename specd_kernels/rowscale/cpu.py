"""`cpu.c` through specd_kernels/cbuild.py (built on first use, cached)."""
from __future__ import annotations

from pathlib import Path

from specd_kernels.cbuild import F32, F32P, I32, I32P, I64, load as _load

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = (
    ("rowscale_prep", (F32P, I64, I64, I64, F32P, F32, F32P, F32P, F32, F32, F32, F32)),
    ("rowscale_finish", (F32P, I64, I64, I64, F32P, F32, F32P, F32P, I64, I32, I32P)),
)


def load():
    return _load(SOURCE, SIGNATURES)
