"""Back the engine's big allocations (int8 weights, KV cache) with transparent huge pages.

A CPU decode step streams every weight from DRAM (~120-230 MB for the default model) and reads
each request's K/V through scattered cache blocks. On 4 KiB pages that is a TLB miss every 4 KiB.
Measured on the 2-core dev CPU (int8 weights of the default model's shapes, 3 rows per call, four
process pairs run alternately): 14.7-17.6 ms per pass on 4 KiB pages, 12.8-13.8 ms on huge pages.

Linux hands out huge pages only to memory that asks for them (THP mode `madvise`, the common
default), and torch and fbgemm allocate with plain malloc. glibc >= 2.35 can ask on their behalf:
the tunable `glibc.malloc.hugetlb=1` makes malloc madvise its large blocks. Tunables are read when
the process starts, so `specd` re-executes itself once with it set. SPECD_HUGEPAGES=0 turns this off.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def thp_mode() -> str | None:
    """The bracketed word of .../transparent_hugepage/enabled: always, madvise or never."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def hugepage_env(environ: dict[str, str], glibc: tuple[int, int] | None, mode: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to gain or it is set already."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("SPECD_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    if glibc is None or glibc < (2, 35) or mode not in ("madvise", "always"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_hugepages() -> None:
    """Replace this process by itself with the tunable set (returns only when that is not needed)."""
    env = hugepage_env(dict(os.environ), glibc_version(), thp_mode())
    if env is None or not sys.executable:  # embedded interpreters have no executable to restart
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:  # serving on 4 KiB pages beats not serving
        print(f"specd: could not restart with {TUNABLE} ({exc}); continuing without huge pages", file=sys.stderr)
