"""Bad input never yields a 500 or hurts the server: every case gets its status and an OpenAI-shaped
error naming the param, and a normal request succeeds afterwards. Also backpressure (429) and auth."""
from __future__ import annotations

import asyncio

import httpx
import pytest

USER = [{"role": "user", "content": "hi"}]
LONG = "word " * 3000  # longer than the tiny model's 2048-token window

CASES = [
    # (path, body, status, param)
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**40}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", ""]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 20, "n": 10}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 20}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "best_of": 1, "n": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "model": "nope"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-5]}, 400, "tokens"),
]


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_is_named(server_url, path, body, status, param):
    assert_openai_error(httpx.post(server_url + path, json=body, timeout=30), status, param)


@pytest.mark.parametrize("raw", [b"{bad json", b"\xff\xfe\x00", b"[]", b"null", b"", b'{"prompt": "x"', b"42"])
def test_malformed_bodies(server_url, raw):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        resp = httpx.post(server_url + path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(resp, 400)


def test_oversized_body_wrong_method_unknown_route(server_url):
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert_openai_error(httpx.post(server_url + "/v1/completions", content=big, timeout=30), 413)
    assert_openai_error(httpx.get(server_url + "/v1/completions"), 405)
    assert_openai_error(httpx.get(server_url + "/v1/nope"), 404)


def test_server_still_serves_and_never_500s(server, server_url):
    resp = httpx.post(server_url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = server.metrics()
    assert 'specd_http_errors_total{status_code="400"}' in metrics
    assert 'status_code="500"' not in metrics


async def _flood(url: str, num: int) -> list[httpx.Response]:
    body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*(c.post(url + "/v1/completions", json=body) for _ in range(num)))


def test_queue_full_gives_429_and_accepted_requests_complete(start_server):
    srv = start_server("--max-queue", "2", "--max-num-seqs", "1")
    responses = asyncio.run(_flood(srv.url, 12))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert_openai_error(r, 429)
    for r in accepted:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_api_key(start_server):
    srv = start_server("--api-key", "sekret")
    body = {"prompt": "x", "max_tokens": 2}
    assert_openai_error(httpx.post(srv.url + "/v1/completions", json=body), 401)
    assert_openai_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    good = {"Authorization": "Bearer sekret"}
    assert httpx.post(srv.url + "/v1/completions", json=body, headers=good, timeout=30).status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/metrics").status_code == 200
