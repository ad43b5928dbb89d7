"""The Dockerfile and docker-compose.yml, run for real on a Docker daemon.

Opt-in (`SPECD_DOCKER_TESTS=1`): the build installs torch and the default model (minutes), and CI has
no daemon. With the variable set, a missing daemon fails instead of skipping.

Machines without a registry (this project's dev machines) cannot pull `python:3.11-slim-bookworm`
or `prom/prometheus`; tests/deploy/offline_images.sh builds stand-ins from Debian packages and
prints the two variables that point the tests at them:
- `SPECD_DOCKER_BUILD_FLAGS`: extra `docker build` flags (a base image, a torch wheel index);
- `SPECD_DOCKER_PROMETHEUS_IMAGE`: the image compose runs as its `prometheus` service.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
IMAGE = "specd:0.1.0"  # the tag docker-compose.yml's specd service runs
MODEL = "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.skipif(
    os.environ.get("SPECD_DOCKER_TESTS") != "1",
    reason="SPECD_DOCKER_TESTS=1 runs the image and compose on a Docker daemon (builds for minutes)")


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def logs(container: str) -> str:
    """The container's output: specd logs to stderr, which `docker logs` replays on its own stderr."""
    done = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def wait_healthy(container: str, timeout: float = 300) -> None:
    """Docker's own HEALTHCHECK (the Dockerfile's /health probe) decides, not a probe of ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", container))
        if state["Health"]["Status"] == "healthy":
            return
        assert state["Running"], f"{container} exited: {logs(container)[-2000:]}"
        time.sleep(2)
    raise AssertionError(f"{container} not healthy after {timeout:.0f} s")


def complete(base: str, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("SPECD_DOCKER_TESTS=1 but no Docker daemon answers `docker info`")
    flags = shlex.split(os.environ.get("SPECD_DOCKER_BUILD_FLAGS", ""))
    docker("build", *flags, "-t", IMAGE, str(REPO), timeout=3600)
    return IMAGE


@pytest.fixture
def container(image):
    name, port = f"specd-test-{uuid.uuid4().hex[:8]}", free_port()
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", image)
    try:
        wait_healthy(name)
        yield name, f"http://127.0.0.1:{port}"
    finally:
        docker("rm", "-f", name, check=False)


def test_image_runs_unprivileged_and_serves_the_baked_in_model(container):
    name, base = container
    assert docker("exec", name, "id", "-u") == "10001"
    assert docker("inspect", "--format", "{{.Config.User}}", name) == "specd"
    first = complete(base, "The capital of France is", 16)
    assert first["model"] == MODEL and first["usage"]["completion_tokens"] == 16
    again = complete(base, "The capital of France is", 16)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # greedy: deterministic
    assert "specd_spec_accepted_tokens_total" in httpx.get(f"{base}/metrics").text
    # JSON logs (the CMD's --log-format json): one line per finished request.
    lines = [json.loads(line) for line in logs(name).splitlines() if line.startswith("{")]
    assert sum(line.get("message") == "request finished" for line in lines) == 2


def test_docker_stop_lets_the_in_flight_request_finish(container):
    name, base = container
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(complete(base, "1, 2, 3, 4, 5,", 300)))
    worker.start()
    deadline = time.monotonic() + 60
    while "specd_requests_running 1.0" not in httpx.get(f"{base}/metrics").text.splitlines():
        assert time.monotonic() < deadline and not result, "the request was never seen running"
        time.sleep(0.05)
    docker("stop", "--time", "120", name, timeout=180)  # SIGTERM: drain, then exit
    worker.join(timeout=60)
    assert result["usage"]["completion_tokens"] == 300, result
    assert result["choices"][0]["finish_reason"] == "length"
    assert docker("inspect", "--format", "{{.State.ExitCode}}", name) == "0"


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def test_compose_serves_specd_and_prometheus_scrapes_it(image, tmp_path):
    """`docker compose up` as the README says (specd + Prometheus), with the image just built."""
    for port in (8000, 9090):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: compose publishes specd on 8000, Prometheus on 9090")
    files = ["-f", str(REPO / "docker-compose.yml")]
    if stand_in := os.environ.get("SPECD_DOCKER_PROMETHEUS_IMAGE"):
        override = tmp_path / "prometheus-image.yml"
        override.write_text(f"services:\n  prometheus:\n    image: {stand_in}\n")
        files += ["-f", str(override)]
    compose = [*compose_command(), "-p", f"specdtest{uuid.uuid4().hex[:6]}", *files]

    def run(*args: str, timeout: float = 300) -> str:
        done = subprocess.run([*compose, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("up", "-d", "--no-build", "specd", "prometheus")
    try:
        (specd,) = run("ps", "-q", "specd").split()
        wait_healthy(specd)
        code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):"
        for _ in range(3):  # the compose service serves --spec ngram; code repeats itself
            complete("http://127.0.0.1:8000", code, 48)
        query = 'sum(specd_spec_accepted_tokens_total{job="specd",method="ngram"})'
        deadline, value = time.monotonic() + 90, 0.0
        while value <= 0 and time.monotonic() < deadline:
            result = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query": query}).json()
            value = float(result["data"]["result"][0]["value"][1]) if result["data"]["result"] else 0.0
            time.sleep(2)
        assert value > 0, "Prometheus never scraped accepted ngram drafts from the specd service"
        groups = httpx.get("http://127.0.0.1:9090/api/v1/rules").json()["data"]["groups"]
        assert groups and all(rule["health"] == "ok" for group in groups for rule in group["rules"])
    finally:
        run("down", "-v", timeout=300)
