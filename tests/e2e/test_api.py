"""The OpenAI API through the official SDK against the real server (tiny random-weight model)."""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(model=None, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_completion_basic(client, model_name):
    resp = greedy(client)
    assert resp.object == "text_completion" and resp.model == model_name and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    spec = resp.usage.model_extra["speculative"]  # the specd extension rides along as an extra field
    assert {"steps", "draft_tokens", "accepted_tokens", "mean_acceptance_length"} <= set(spec)


def test_greedy_is_deterministic_and_token_prompts_match_text(client, server_url):
    first, second = greedy(client), greedy(client)
    assert first.choices[0].text == second.choices[0].text
    ids = httpx.post(f"{server_url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = greedy(client, prompt=ids)
    assert by_ids.choices[0].text == first.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    kw = dict(prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1234)
    a = client.completions.create(model=None, **kw)
    b = client.completions.create(model=None, **kw)
    assert a.choices[0].text == b.choices[0].text


def test_completion_stream_matches_non_stream(client):
    expected = greedy(client).choices[0].text
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finishes[0]] and finishes[0] in ("stop", "length")
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0


def test_n_and_multiple_prompts(client):
    resp = client.completions.create(model=None, prompt=["Hello", "Goodbye"], n=2, max_tokens=5, temperature=1.0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)


def test_best_of_returns_n(client):
    resp = client.completions.create(model=None, prompt=PROMPT, n=1, best_of=3, max_tokens=5, temperature=1.0)
    assert len(resp.choices) == 1 and resp.choices[0].logprobs is None


def test_echo_and_logprobs(client):
    resp = greedy(client, max_tokens=5, echo=True, logprobs=2)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    num_prompt = resp.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == num_prompt + resp.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[num_prompt:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[num_prompt:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_string_truncates(client):
    full = greedy(client, max_tokens=24).choices[0].text
    stop = full[6:9]
    if len(stop) < 3 or not stop.strip():
        pytest.skip("random model produced too little text to pick a stop string")
    resp = greedy(client, max_tokens=24, stop=[stop])
    assert resp.choices[0].text == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_chat_and_chat_stream(client, model_name):
    resp = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=10, temperature=0)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    text = resp.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_chat_logprobs_and_max_completion_tokens(client):
    resp = client.chat.completions.create(model=None, messages=MESSAGES, max_completion_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3, n=2)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 4
        assert all(len(t.top_logprobs) == 3 and t.bytes is not None for t in content)


def test_models_endpoint(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name] and models.data[0].owned_by == "specd"


def test_tokenize_detokenize(server_url):
    tok = httpx.post(f"{server_url}/tokenize", json={"prompt": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    assert httpx.post(f"{server_url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hello world"
    chat = httpx.post(f"{server_url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > tok["count"]
    info = httpx.get(f"{server_url}/tokenizer_info").json()
    assert info["vocab_size"] > 0


def test_health_version_metrics(server_url, client):
    greedy(client, max_tokens=2)
    assert httpx.get(f"{server_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server_url}/version").json()["version"]
    metrics = httpx.get(f"{server_url}/metrics").text
    assert "specd_requests_running" in metrics and "specd_generation_tokens_total" in metrics


def test_served_process_asks_for_huge_pages_where_it_can(server):
    """`specd serve` re-executes itself with glibc's huge-page tunable (server/hugepages.py)."""
    from server.hugepages import glibc_version, hugepage_env, thp_mode

    environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    tunable_set = any(e.startswith(b"GLIBC_TUNABLES=") and b"glibc.malloc.hugetlb=1" in e for e in environ)
    inherited = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    supported = hugepage_env({}, glibc_version(), thp_mode()) is not None
    assert tunable_set == (inherited or (supported and os.environ.get("SPECD_HUGEPAGES") != "0"))
