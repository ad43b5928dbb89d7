"""Kernel tests run natively on a GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before the first kernel module is imported (Triton reads it when a
kernel is decorated); the kernel modules are imported lazily by specd_kernels/backend.py, so setting it
here, at collection, is early enough.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from specd_kernels import backend  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def force_triton():
    """Route every op through its Triton kernel (interpreted on CPU), then restore the default."""
    previous = backend.get_backend()
    backend.set_backend("triton")
    yield
    backend.set_backend(previous)
