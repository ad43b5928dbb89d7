"""What /v1/completions and /v1/chat/completions share: body parsing, validation against the model,
sampling parameters, running a group of engine requests (JSON or SSE), usage, disconnects.

Streaming responses abort their engine requests whenever the response ends early (client gone,
cancelled task), because `GroupStreamingResponse.__call__` always leaves the group; non-streaming
responses watch the connection while they wait (`collect`) and abort the same way.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams, SpecParams, SpecUsage, TokenLogprob
from server.engine_client import EngineClient, EngineNotReadyError, QueueFullError, RequestGroup
from server.errors import APIError, bad_request, error_body, is_queue_full, queue_full_error
from server.protocol import MAX_SEQUENCES, SpeculativeUsage, Usage, validation_error_info

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


# ---------------------------------------------------------------- request intake


def get_client(request: Request) -> EngineClient:
    """The engine client, or 503 while the model loads or the server drains."""
    client: EngineClient = request.app.state.engine_client
    if client.draining:
        raise APIError(503, "the server is shutting down", code="draining")
    if not client.ready:
        raise APIError(503, "the model is still loading; retry shortly", code="loading", headers={"Retry-After": "1"})
    return client


async def parse_body(request: Request, model_cls: type[BaseModel]) -> Any:
    """Read at most max_body_bytes, then validate; any problem is a 4xx naming the field."""
    limit = getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        return model_cls.model_validate_json(bytes(body))
    except ValidationError as exc:
        message, param = validation_error_info(exc)
        raise bad_request(message, param) from None


def check_model(client: EngineClient, model: str | None) -> None:
    if model and model != client.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{client.model_name}`",
                       param="model", code="model_not_found")


def check_prompt_ids(client: EngineClient, ids: list[int], param: str) -> None:
    if not ids:
        raise bad_request(f"{param} is empty", param)
    try:
        client.tokenizer.check_token_ids(ids)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None
    window = client.max_model_len
    if len(ids) >= window:
        raise bad_request(f"{param} is {len(ids)} tokens long but the context window is {window} tokens "
                          f"(prompt + max_tokens must fit, with room for at least one output token)", param,
                          code="context_length_exceeded")


def resolve_max_tokens(client: EngineClient, requested: int | None, prompt_len: int, default: int | None,
                       param: str = "max_tokens") -> int:
    """An explicit max_tokens must fit in the window (400 otherwise); the default is clipped to it."""
    window = client.max_model_len
    room = window - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if prompt_len + requested > window:
        raise bad_request(f"This model's maximum context length is {window} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                          f"completion). Reduce the prompt or {param}.", param, code="context_length_exceeded")
    return requested


def check_num_sequences(num_prompts: int, per_prompt: int) -> None:
    total = num_prompts * per_prompt
    if total > MAX_SEQUENCES:
        raise bad_request(f"{num_prompts} prompts x {per_prompt} sequences = {total} exceeds the limit of "
                          f"{MAX_SEQUENCES} sequences per request", "n")


def build_sampling(client: EngineClient, req: Any, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
    """SamplingParams for choice `index`; n > 1 with a seed derives one seed per choice so they differ."""
    vocab = client.tokenizer.vocab_size
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        token_id = int(key)
        if not 0 <= token_id < vocab:
            raise bad_request(f"logit_bias: token id {token_id} is out of range [0, {vocab - 1}]", "logit_bias")
        bias[token_id] = float(value)
    for token_id in req.stop_token_ids or ():
        if not 0 <= token_id < vocab:
            raise bad_request(f"stop_token_ids: token id {token_id} is out of range [0, {vocab - 1}]",
                              "stop_token_ids")
    seed = None if req.seed is None else (req.seed + index) % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        seed=seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        stop=req.stop_list,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


def spec_params(req: Any) -> SpecParams:
    s = req.speculative
    return SpecParams() if s is None else SpecParams(method=s.method, num_draft_tokens=s.num_draft_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- per-choice accumulation


@dataclass
class ChoiceState:
    """Everything one engine request produced so far (the deltas, summed)."""

    index: int
    prompt_index: int
    request: EngineRequest
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_output_tokens: int = 0
    spec: SpecUsage = field(default_factory=SpecUsage)

    def update(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.new_logprobs or []
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens, len(self.token_ids))
        # spec usage is cumulative per request (like num_output_tokens); an output that carries
        # none (an abort or error) must not wipe what was counted.
        if out.spec.steps >= self.spec.steps:
            self.spec = out.spec
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.error = out.error

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def spec_usage(specs: Iterable[SpecUsage]) -> SpeculativeUsage:
    total = SpecUsage()
    for s in specs:
        total = SpecUsage(total.steps + s.steps, total.draft_tokens + s.draft_tokens,
                          total.accepted_tokens + s.accepted_tokens)
    return SpeculativeUsage(steps=total.steps, draft_tokens=total.draft_tokens, accepted_tokens=total.accepted_tokens,
                            mean_acceptance_length=round(total.mean_acceptance_length, 4))


def usage(states: list[ChoiceState], prompt_lens: list[int]) -> Usage:
    """Prompt tokens count once per prompt; completion tokens count every generated sequence (best_of too)."""
    prompt_tokens = sum(prompt_lens)
    completion_tokens = sum(s.num_output_tokens for s in states)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, speculative=spec_usage(s.spec for s in states))


def finish_reason_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


# ---------------------------------------------------------------- running


def submit(client: EngineClient, requests: list[EngineRequest]) -> RequestGroup:
    try:
        return client.submit(requests)
    except QueueFullError:
        raise queue_full_error() from None
    except EngineNotReadyError as exc:
        raise APIError(503, str(exc), code="unavailable") from None


def engine_exception(exc: Exception) -> APIError:
    """An exception the engine raised for one request (in add_request) as an HTTP error."""
    if is_queue_full(exc):
        return queue_full_error()
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    log.error("engine rejected a request: %r", exc)
    return APIError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, client: EngineClient, states: list[ChoiceState]) -> bool:
    """Run every choice to the end; False when the client went away first (its requests are aborted)."""
    by_id = {s.request.request_id: s for s in states}
    group = submit(client, [s.request for s in states])

    async def consume() -> None:
        async with group:
            async for out in group:
                by_id[out.request_id].update(out)

    main = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        watcher.cancel()
        main.cancel()
        raise
    watcher.cancel()
    if not main.done():
        main.cancel()  # the client is gone: leaving the group aborts its requests
        await asyncio.gather(main, return_exceptions=True)
        return False
    exc = main.exception()
    if exc is not None:
        raise engine_exception(exc) if isinstance(exc, Exception) else exc
    failed = [s for s in states if s.finish_reason == FinishReason.ERROR]
    if failed:
        raise APIError(500, failed[0].error or "the engine failed this request", code="engine_error")
    return True


def disconnected_response() -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


class GroupStreamingResponse(StreamingResponse):
    """A StreamingResponse that always leaves its request group, even if streaming never started."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.group.__aexit__(None, None, None)


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_events(group: RequestGroup, states: list[ChoiceState],
                     on_output: Callable[[ChoiceState, RequestOutput], Iterable[BaseModel]],
                     on_end: Callable[[], Iterable[BaseModel]]) -> AsyncIterator[str]:
    """The SSE body: a chunk per delta (from on_output), the closing chunks, then [DONE].

    Errors after the 200 went out can only be reported in-band: an OpenAI-shaped error event.
    """
    by_id = {s.request.request_id: s for s in states}
    try:
        async for out in group:
            state = by_id[out.request_id]
            state.update(out)
            for chunk in on_output(state, out):
                yield sse(chunk)
            if out.finish_reason == FinishReason.ERROR:
                yield sse(error_body(500, out.error or "the engine failed this request", code="engine_error"))
        for chunk in on_end():
            yield sse(chunk)
    except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not a cut connection
        err = exc if isinstance(exc, APIError) else engine_exception(exc)
        yield sse(error_body(err.status_code, err.message, err.param, err.code))
    yield "data: [DONE]\n\n"


def stream_response(client: EngineClient, states: list[ChoiceState], make_events) -> GroupStreamingResponse:
    """Submit now (so queue-full is still a 429), stream later; make_events(group) -> AsyncIterator[str]."""
    group = submit(client, [s.request for s in states])
    try:
        return GroupStreamingResponse(make_events(group), group)
    except BaseException:
        group.abort()
        raise
