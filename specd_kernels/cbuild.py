"""C kernels for the CPU: a `.c` file built into a shared library on first use, called through ctypes.

Why C: at batch 1 each small torch op costs 3-9 us of dispatch on the 2-core dev CPU, and a decoder
layer ran dozens of them around its four matmuls. One C call does the work of ten ops in a few
microseconds, and its loops are written so a row's bits never depend on the other rows of the batch.

Each library is compiled with the system C compiler (`$CC`, default `cc`) for this CPU into
$SPECD_CACHE/kernels (default ~/.cache/specd), named by a hash of the source, flags, compiler and
CPU, so a change of any rebuilds it. No compiler: `load()` returns None and the torch reference runs.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# No reassociation or FMA contraction: a row's bits must not depend on how the compiler vectorised
# the loop around it. Accumulation orders that vectorise are written out explicitly in the sources.
# -fno-trapping-math changes no value (nothing reads FP exception flags) but lets loops with a
# clamp or a float->int conversion vectorise (the attention's exp).
# -fopenmp: parallel loops run on torch's OpenMP threads (the same libgomp, by soname); a compiler
# without OpenMP builds the pthread fallbacks instead (_build).
FLAGS = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared",
         "-pthread", "-fopenmp"]

F32P, I32P, I64P, U8P = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
I64, I32, F32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def _cache_dir() -> Path:
    return Path(os.environ.get("SPECD_CACHE") or Path.home() / ".cache" / "specd") / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return os.uname().machine + flags


def compiler() -> str:
    return os.environ.get("CC", "cc")


def _source_text(source: Path) -> str:
    """The source with the text of every file it `#include "..."`s, so editing one rebuilds it."""
    text = source.read_text()
    included = re.findall(r'^#include "([^"]+)"', text, re.M)
    return text + "".join(_source_text((source.parent / name).resolve()) for name in included)


def library_path(source: Path) -> Path:
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    key = "\0".join([_source_text(source), " ".join(FLAGS), version, _cpu_id()])
    return _cache_dir() / f"{source.parent.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(flags: list[str], source: Path, out: str) -> None:
    subprocess.run([compiler(), *flags, "-o", out, str(source), "-lm"], check=True, capture_output=True, text=True,
                   timeout=120)


def _build(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            _compile(FLAGS, source, tmp)
        except subprocess.CalledProcessError as e:
            log.info("%s: building without OpenMP (%s)", source, e.stderr.strip()[-300:])
            _compile([f for f in FLAGS if f != "-fopenmp"], source, tmp)
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) never load half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load(source: Path, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    """The library built from `source` with the given (function name, argtypes[, restype]) signatures,
    or None (with a warning) when it cannot be built here."""
    try:
        path = library_path(source)
        if not path.exists():
            _build(source, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("C kernels %s unavailable (%s); the slower torch reference runs", source, detail)
        return None
    for name, argtypes, *restype in signatures:
        getattr(lib, name).argtypes = list(argtypes)
        getattr(lib, name).restype = restype[0] if restype else None
    return lib
