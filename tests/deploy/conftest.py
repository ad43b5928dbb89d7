"""Fixtures for the deployment tests: specd servers (the e2e launcher), a real Prometheus binary."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, launch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def start_server(tiny_model_dir):
    """Factory: start_server(*flags, model_dir=None) -> ServerProcess (tiny model unless told).

    Module-scoped: a module's servers are stopped when it ends, so they do not sit in memory while
    the rest of the suite runs."""
    started: list[ServerProcess] = []

    def start(*flags: str, model_dir: Path | None = None) -> ServerProcess:
        server = launch(model_dir or tiny_model_dir, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    subprocess.run(["apt-get", *lock, "update", "-qq"], check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages],
                   check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def prometheus_bins() -> dict[str, str]:
    """Paths of `prometheus` and `promtool`; installs Debian's `prometheus` package when missing.

    CI is a clean Debian machine where the tests run as root, so apt-get works there. Elsewhere
    (no root, no apt) the tests that need Prometheus skip, saying why; under CI they fail instead.
    """
    def find() -> dict[str, str] | None:
        found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
        return found if all(found.values()) else None

    bins = find()
    if bins is None:
        problem = None
        if shutil.which("apt-get") is None:
            problem = "apt-get is not available"
        elif os.geteuid() != 0:
            problem = "not root (run `sudo apt-get install prometheus`)"
        else:
            try:
                _apt_install("prometheus")
            except (subprocess.SubprocessError, OSError) as exc:
                problem = f"apt-get install prometheus failed: {exc}"
        bins = find()
        if bins is None:
            message = f"Prometheus is not installed and could not be: {problem or 'binaries not on PATH'}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return bins
