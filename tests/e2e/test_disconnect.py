"""Clients that go away abort their engine requests; SIGTERM drains in-flight requests then exits.

Observed through /metrics on a dedicated server: the request finishes with reason "abort" long
before its max_tokens could have been generated, and nothing is left running.
"""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

LONG_BODY = {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True, "temperature": 0}


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for_abort(server, before: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.metrics()
        aborted = metric(text, "specd_request_finished_total", '{finish_reason="abort"}')
        if aborted > before and metric(text, "specd_requests_running") == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"no abort observed within {timeout}s:\n{server.metrics()}")


def aborted_count(server) -> float:
    return metric(server.metrics(), "specd_request_finished_total", '{finish_reason="abort"}')


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server()


def test_stream_disconnect_aborts(srv):
    before = aborted_count(srv)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/completions", json={**LONG_BODY, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            received = [line for _, line in zip(range(6), lines)]
            assert any(line.startswith("data: {") for line in received)
        # leaving the blocks closes the connection mid-stream
    wait_for_abort(srv, before)


def test_chat_stream_disconnect_aborts(srv):
    before = aborted_count(srv)
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 1800,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as resp:
            next(resp.iter_lines())
    wait_for_abort(srv, before)


def test_non_stream_disconnect_aborts(srv):
    before = aborted_count(srv)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={**LONG_BODY, "n": 2}, timeout=0.5)
    wait_for_abort(srv, before)
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_then_exits(start_server):
    server = start_server()
    result = {}

    def request():
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        result["resp"] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    worker = threading.Thread(target=request)
    worker.start()
    deadline = time.monotonic() + 10
    while metric(server.metrics(), "specd_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.terminate()
    worker.join(60)
    resp = result["resp"]
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 200
    server.proc.wait(30)
    assert server.proc.poll() is not None
