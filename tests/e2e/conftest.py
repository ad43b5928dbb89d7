"""The real server as a subprocess on 127.0.0.1, serving the tiny random-weight Llama.

`server_url` is one shared server for the whole session; `start_server(model_dir, *flags)` starts
another with custom flags (small queue, API key) for the tests that need one. Also the drafter
training fixtures test_pass.py and test_bpd.py share: a tiny model with structure and its data.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.train.config import DataConfig
from tests.conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(model_dir: Path, *flags: str, env: dict | None = None) -> ServerProcess:
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="specd-e2e-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--kv-cache-tokens", "16384", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, Path(log_file.name))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log()}")


@pytest.fixture(scope="session")
def start_server(tiny_model_dir):
    """Factory: start_server(*flags) -> ServerProcess; every server started is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*flags: str, model_dir: Path | None = None, env: dict | None = None) -> ServerProcess:
        server = launch(model_dir or tiny_model_dir, *flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    return start_server()


@pytest.fixture(scope="session")
def server_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def model_name(tiny_model_dir) -> str:
    return Path(tiny_model_dir).resolve().name


@pytest.fixture
def client(server_url):
    import openai

    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=60)


# ---------------------------------------------------------------- drafter training (test_pass.py, test_bpd.py)

DATA_CONFIG = DataConfig(num_prompts=12, max_tokens=40, batch=6)


@pytest.fixture(scope="session")
def calm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its layer weights halved: its text has structure (runs of a token, then
    another), so a drafter has something to learn, unlike the pure noise of the default tiny model."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_model(tmp_path_factory.mktemp("calm"), tiny_model_dir, seed=0)
    weights = load_file(str(path / "model.safetensors"))
    weights = {k: v * 0.5 if v.dim() > 1 and "embed" not in k else v for k, v in weights.items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tiny_data(calm_model_dir, tmp_path_factory) -> Path:
    from engine.train.data import generate_data

    out = tmp_path_factory.mktemp("data") / "data.jsonl"
    generate_data(str(calm_model_dir), out, DATA_CONFIG,
                  Path(__file__).resolve().parents[1] / "data", progress=False)
    return out


def random_heads_artifact(model_dir: Path, out: Path, num_heads: int = 2, hidden: int = 64) -> Path:
    """Random (seeded) heads: any heads are lossless, and these draft differently from the model."""
    import torch

    from engine.train.artifact import save_artifact, weight_fingerprint

    g = torch.Generator().manual_seed(0)
    return save_artifact(out, {"weight": torch.randn(num_heads, hidden, hidden, generator=g) / hidden ** 0.5,
                               "bias": torch.randn(num_heads, hidden, generator=g)},
                         method="bpd", base_model="tiny", base_model_hash=weight_fingerprint(model_dir), num_heads=num_heads)


def random_recycle_artifact(model_dir: Path, out: Path, vocab: list[int], hidden: int = 64, ffn: int = 32) -> Path:
    """A random (seeded) recyclable module drafting over `vocab`: any module is lossless, and this one
    drafts differently from the model."""
    import torch

    from engine.train.artifact import save_artifact, weight_fingerprint

    g = torch.Generator().manual_seed(0)
    shapes = {"w_in": (hidden, 2 * hidden), "b_in": (hidden,), "w_1": (ffn, hidden), "b_1": (ffn,), "w_2": (hidden, ffn)}
    tensors = {name: torch.randn(*shape, generator=g) / shape[-1] ** 0.5 for name, shape in shapes.items()}
    return save_artifact(out, {**tensors, "vocab": torch.tensor(vocab)}, method="recycle", base_model="tiny",
                         base_model_hash=weight_fingerprint(model_dir), depth=2, vocab_size=len(vocab))


def check_trained_artifact(header: dict, out: Path, method: str, model_dir: Path, **expected) -> None:
    """A training job's artifact names its method, command ("test") and base model, carries the held-out
    evaluation before and after training, and `expected` header fields."""
    from engine.train.artifact import read_header, weight_fingerprint

    assert header["method"] == method and header["command"] == "test", header
    assert all(header[key] == value for key, value in expected.items()), (header, expected)
    assert header["eval"]["untrained"]["step"] == 0 and header["eval"]["trained"]["step"] > 0
    assert read_header(out)["base_model_hash"] == weight_fingerprint(model_dir)
