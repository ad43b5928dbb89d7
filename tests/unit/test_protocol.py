"""OpenAI request schemas, their 400 mapping, and response shapes (no server, no engine)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.errors import error_body, is_queue_full
from server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatChunkChoice, ChatDelta,
                             CompletionRequest, CompletionResponse, CompletionChoice, ErrorResponse, Usage,
                             validation_error_info)
from server.serving import ChoiceState, spec_usage, usage
from engine.types import EngineRequest, FinishReason, RequestOutput, SpecUsage


def info(model, body) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as exc:
        model.model_validate_json(json.dumps(body) if not isinstance(body, bytes) else body)
    return validation_error_info(exc.value)


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt):
    req = CompletionRequest.model_validate_json(json.dumps({"prompt": prompt}))
    assert req.prompt == prompt and req.max_tokens == 16 and req.n == 1


def test_defaults_and_stop_list():
    req = CompletionRequest.model_validate_json('{"prompt": "x", "stop": "\\n"}')
    assert req.stop_list == ("\n",) and req.temperature is None and not req.include_usage
    req = ChatCompletionRequest.model_validate_json(
        '{"messages": [{"role": "user", "content": "hi", "refusal": null}], "stream_options": {"include_usage": true}}')
    assert req.include_usage and req.max_tokens is None


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "temperature": 2.5}, "temperature", "less than or equal"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than"),
    ({"prompt": "x", "max_tokens": -5}, "max_tokens", "greater than"),
    ({"prompt": "x", "top_p": 0}, "top_p", "greater than"),
    ({"prompt": "x", "n": 0}, "n", "greater than"),
    ({"prompt": "x", "n": 1000}, "n", "less than"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty", "less than"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most"),
    ({"prompt": "x", "stop": 5}, "stop", "stop must be"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"prompt": "x", "echo": "yes"}, "echo", "boolean"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ({"prompt": None}, "prompt", "prompt must be"),
    ({"prompt": "x", "bogus": 1}, "bogus", "Unrecognized request argument"),
    ({"prompt": "x", "speculative": {"num_draft_tokens": 1000}}, "speculative.num_draft_tokens", "less than"),
    ({}, "prompt", "required"),
])
def test_completion_validation_names_the_param(body, param, words):
    message, got = info(CompletionRequest, body)
    assert got == param and words in message


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 25}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_validation_names_the_param(body, param):
    assert info(ChatCompletionRequest, body)[1] == param


@pytest.mark.parametrize("raw,words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"42", "JSON object"),
])
def test_body_level_errors(raw, words):
    message, param = info(CompletionRequest, raw)
    assert words in message and param is None


def test_error_body_shape():
    body = error_body(400, "bad temperature", "temperature", "invalid_value")
    assert ErrorResponse.model_validate(body).error.param == "temperature"
    assert body["error"]["type"] == "invalid_request_error"
    assert error_body(429, "full")["error"]["type"] == "rate_limit_error"
    assert error_body(503, "loading")["error"]["type"] == "service_unavailable"


def test_queue_full_matched_by_class_name():
    class QueueFullError(Exception):
        pass

    class Sub(QueueFullError):
        pass

    assert is_queue_full(QueueFullError()) and is_queue_full(Sub()) and not is_queue_full(ValueError())


def test_chat_delta_drops_unset_fields():
    chunk = ChatCompletionChunk(id="c", model="m", choices=[ChatChunkChoice(index=0, delta=ChatDelta(content="x"))])
    dumped = json.loads(chunk.model_dump_json())
    assert dumped["choices"][0]["delta"] == {"content": "x"}
    assert dumped["object"] == "chat.completion.chunk"


def test_usage_sums_choices_and_speculation():
    states = []
    for k, (steps, drafts, accepted) in enumerate([(4, 8, 6), (2, 4, 0)]):
        s = ChoiceState(index=k, prompt_index=0, request=EngineRequest(f"r{k}", [1, 2]))
        s.update(RequestOutput(f"r{k}", [5, 6], "ab", 2, 2, spec=SpecUsage(steps, drafts, accepted)))
        s.update(RequestOutput(f"r{k}", [7], "c", 2, 3, finish_reason=FinishReason.STOP))  # no spec: kept
        states.append(s)
    u = usage(states, [2])
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2, 6, 8)
    assert (u.speculative.steps, u.speculative.draft_tokens, u.speculative.accepted_tokens) == (6, 12, 6)
    assert u.speculative.mean_acceptance_length == pytest.approx(2.0)
    assert states[0].text == "abc" and states[0].finish_reason == FinishReason.STOP
    assert spec_usage([SpecUsage()]).mean_acceptance_length == 0.0


def test_completion_response_shape_matches_openai_sdk():
    from openai.types import Completion

    resp = CompletionResponse(id="cmpl-1", model="m", usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
                              choices=[CompletionChoice(index=0, text="hi", finish_reason="stop")])
    parsed = Completion.model_validate(json.loads(resp.model_dump_json()))
    assert parsed.choices[0].text == "hi" and parsed.usage.total_tokens == 3


def test_server_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, server.app, server.cli; sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
