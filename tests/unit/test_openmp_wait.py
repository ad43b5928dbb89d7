"""engine/__init__.py: OpenMP threads spin briefly by default, and an explicit setting wins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOW = "import os, engine; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _import_engine(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, "None 10000"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ({"GOMP_SPINCOUNT": "50"}, "None 50"),
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "7"}, "ACTIVE 7"),
])
def test_wait_policy(env, expected):
    assert _import_engine(**env) == expected
