"""/v1/chat/completions: messages -> the tokenizer's chat template -> n engine requests -> an OpenAI
`chat.completion` JSON body, or an SSE stream of `chat.completion.chunk` objects (a role delta
first, then content deltas, then one with the finish_reason).

max_tokens / max_completion_tokens: either may be given (the smaller wins when both are); without
them a chat may use the rest of the context window, as with OpenAI.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from engine.types import EngineRequest, RequestOutput, TokenLogprob
from server import serving
from server.errors import bad_request
from server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessage, ChatResponseMessage,
                             ChatTokenLogprob, TopLogprob)
from server.serving import ChoiceState

router = APIRouter()


def messages_to_dicts(messages: list[ChatMessage], param: str = "messages") -> list[dict]:
    """Plain {role, content, name} dicts for the chat template; content parts must be text."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content part type {part.type!r} is not supported (text only)",
                                      f"{param}[{i}].content[{j}].type")
                texts.append(part.text)
            content = "".join(texts)
        item = {"role": m.role, "content": content}
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def chat_prompt_ids(client, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    try:
        return client.tokenizer.encode_chat(messages_to_dicts(messages), add_generation_prompt)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported by this server", "tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported by this server", "tool_choice")
    if req.response_format and req.response_format.get("type") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


def _plan(client, req: ChatCompletionRequest, chat_id: str, ids: list[int]) -> list[ChoiceState]:
    serving.check_prompt_ids(client, ids, "messages")
    serving.check_num_sequences(1, req.n)
    limits = [(v, p) for v, p in ((req.max_tokens, "max_tokens"), (req.max_completion_tokens, "max_completion_tokens"))
              if v is not None]
    requested, param = min(limits) if limits else (None, "max_tokens")
    max_tokens = serving.resolve_max_tokens(client, requested, len(ids), default=None, param=param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    states = []
    for k in range(req.n):
        sampling = serving.build_sampling(client, req, max_tokens, logprobs, k)
        engine_req = EngineRequest(f"{chat_id}-{k}", ids, sampling, serving.spec_params(req))
        states.append(ChoiceState(index=k, prompt_index=0, request=engine_req))
    return states


def _logprobs(client, req: ChatCompletionRequest, lps: list[TokenLogprob | None]) -> ChatLogprobs | None:
    if not req.logprobs:
        return None
    tok = client.tokenizer
    content = []
    for lp in lps:
        if lp is None:
            continue
        top = [TopLogprob(token=tok.id_to_token(t), logprob=v, bytes=tok.token_bytes(t))
               for t, v in lp.top[: req.top_logprobs or 0]]
        content.append(ChatTokenLogprob(token=tok.id_to_token(lp.token_id), logprob=lp.logprob,
                                        bytes=tok.token_bytes(lp.token_id), top_logprobs=top))
    return ChatLogprobs(content=content)


def _response(client, req, chat_id, ids, states) -> ChatCompletionResponse:
    choices = [ChatChoice(index=s.index, message=ChatResponseMessage(content=s.text),
                          logprobs=_logprobs(client, req, s.logprobs),
                          finish_reason=serving.finish_reason_str(s.finish_reason),
                          speculative=serving.spec_usage([s.spec])) for s in states]
    return ChatCompletionResponse(id=chat_id, model=client.model_name, choices=choices,
                                  usage=serving.usage(states, [len(ids)]))


def _stream(client, req, chat_id, ids, states):
    started: set[int] = set()
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chat_id, model=client.model_name, choices=choices, usage=usage)

    def on_output(state: ChoiceState, out: RequestOutput):
        if state.index not in started:
            started.add(state.index)
            yield chunk([ChatChunkChoice(index=state.index, delta=ChatDelta(role="assistant", content=""))])
        if not out.new_text and not out.new_token_ids and not out.finished:
            return
        # The closing chunk has an empty delta ({}), as OpenAI sends it, unless it carries text.
        content = out.new_text if out.new_text or not out.finished else None
        choice = ChatChunkChoice(
            index=state.index, delta=ChatDelta(content=content),
            logprobs=_logprobs(client, req, out.new_logprobs or []),
            finish_reason=serving.finish_reason_str(out.finish_reason),
            speculative=serving.spec_usage([state.spec]) if out.finished else None)
        yield chunk([choice], serving.usage(states, [len(ids)]) if continuous else None)

    def on_end():
        if req.include_usage:
            yield chunk([], serving.usage(states, [len(ids)]))

    return lambda group: serving.sse_events(group, states, on_output, on_end)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    client = serving.get_client(request)
    req: ChatCompletionRequest = await serving.parse_body(request, ChatCompletionRequest)
    serving.check_model(client, req.model)
    _check_unsupported(req)
    chat_id = serving.new_id("chatcmpl")
    ids = chat_prompt_ids(client, req.messages, req.add_generation_prompt)
    states = _plan(client, req, chat_id, ids)
    if req.stream:
        return serving.stream_response(client, states, _stream(client, req, chat_id, ids, states))
    if not await serving.collect(request, client, states):
        return serving.disconnected_response()
    return _response(client, req, chat_id, ids, states)
