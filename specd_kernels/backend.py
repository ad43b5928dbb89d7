"""Which implementation runs an op: the Triton kernel (`triton.py`) or the torch reference (`ref.py`).

- "auto" (default): CUDA tensors -> Triton, anything else -> the reference. CPU is the embedded
  default (fp32, torch reference kernels); Triton is only for GPUs.
- "triton": always Triton. CPU tensors then run in Triton's interpreter, which needs
  TRITON_INTERPRET=1 in the environment before the first kernel module is imported (the kernel tests
  set it in tests/kernels/conftest.py); without it the call fails with a message saying so.
- "ref": always the torch reference (e.g. to rule a kernel out when debugging on a GPU).

The choice comes from SPECD_KERNELS, read once when this module is imported, or from
`set_backend` (configs and tests). Kernel modules are imported lazily, on first use, so the CPU path
never imports Triton and works without it.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "ref")

_backend = os.environ.get("SPECD_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"SPECD_KERNELS must be one of {BACKENDS}, not {_backend!r}")


def set_backend(name: str) -> None:
    """Force an implementation for every op ("auto", "triton" or "ref")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, not {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (decided once, like Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on `tensor` (its device decides under "auto") should run the Triton kernel."""
    if _backend == "ref":
        return False
    if _backend == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was forced but triton is not installed")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "the first kernel is imported (Triton's interpreter)")
    return True


def load(module: str):
    """Import a kernel module on first use (`specd_kernels.<op>.triton`)."""
    return importlib.import_module(module)
