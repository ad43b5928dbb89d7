"""/v1/completions: prompts (text, texts, token ids, lists of token ids) x n -> engine requests ->
an OpenAI `text_completion` JSON body or an SSE stream of the same objects.

best_of (OpenAI legacy): best_of >= n sequences are generated per prompt and the n with the highest
cumulative logprob are returned (logprobs are computed internally for the ranking, and only shown
when asked for). As with OpenAI, best_of > n cannot be streamed.
echo: the prompt's text is prepended; with logprobs its tokens come first with a null logprob
(the engine computes no prompt logprobs).
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from engine.types import EngineRequest, RequestOutput, TokenLogprob
from server import serving
from server.errors import bad_request
from server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse)
from server.serving import ChoiceState

router = APIRouter()


def _prompts(client, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """[(token ids, text or None)] per prompt; the text is kept so echo returns it verbatim."""
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise bad_request("prompt is empty", "prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        ids = client.tokenizer.encode(item) if isinstance(item, str) else list(item)
        serving.check_prompt_ids(client, ids, param)
        out.append((ids, item if isinstance(item, str) else None))
    return out


def _plan(client, req: CompletionRequest, cmpl_id: str, prompts) -> list[ChoiceState]:
    best_of = req.best_of or req.n
    if best_of < req.n:
        raise bad_request(f"best_of ({best_of}) must be >= n ({req.n})", "best_of")
    if req.stream and best_of > req.n:
        raise bad_request("best_of > n cannot be streamed", "best_of")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    serving.check_num_sequences(len(prompts), best_of)
    # Ranking best_of candidates needs their logprobs even when the user asked for none.
    logprobs = req.logprobs if best_of == req.n else (req.logprobs or 0)
    states = []
    for p_idx, (ids, _) in enumerate(prompts):
        max_tokens = serving.resolve_max_tokens(client, req.max_tokens, len(ids), default=16)
        for k in range(best_of):
            sampling = serving.build_sampling(client, req, max_tokens, logprobs, k)
            engine_req = EngineRequest(f"{cmpl_id}-{p_idx}-{k}", ids, sampling, serving.spec_params(req))
            states.append(ChoiceState(index=len(states), prompt_index=p_idx, request=engine_req))
    return states


class _Formatter:
    """Turns token ids / logprobs into the legacy completions logprobs object, tracking text_offset."""

    def __init__(self, client, req: CompletionRequest, prompts):
        self.client, self.req, self.prompts = client, req, prompts
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    def echo_text(self, state: ChoiceState) -> str:
        ids, text = self.prompts[state.prompt_index]
        return text if text is not None else self.client.tokenizer.decode(ids)

    def logprobs(self, state: ChoiceState, lps: list[TokenLogprob | None], echo: bool) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        tok = self.client.tokenizer
        out = CompletionLogprobs()
        offset = self.offsets.get(state.index, 0)
        if echo:
            for token_id in self.prompts[state.prompt_index][0]:
                text = tok.id_to_token(token_id)
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(offset)
                offset += len(text)
        for lp in lps:
            if lp is None:
                continue
            text = tok.id_to_token(lp.token_id)
            top = {tok.id_to_token(t): v for t, v in lp.top[: self.req.logprobs]}
            top.setdefault(text, lp.logprob)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self.offsets[state.index] = offset
        return out


def _select_best(states: list[ChoiceState], n: int, num_prompts: int) -> list[ChoiceState]:
    picked = []
    for p_idx in range(num_prompts):
        candidates = [s for s in states if s.prompt_index == p_idx]
        picked += sorted(candidates, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
    return picked


def _response(client, req, cmpl_id, prompts, states) -> CompletionResponse:
    fmt = _Formatter(client, req, prompts)
    choices = []
    for i, s in enumerate(_select_best(states, req.n, len(prompts))):
        prefix = fmt.echo_text(s) if req.echo else ""
        choices.append(CompletionChoice(
            index=i, text=prefix + s.text, logprobs=fmt.logprobs(s, s.logprobs, req.echo),
            finish_reason=serving.finish_reason_str(s.finish_reason), speculative=serving.spec_usage([s.spec])))
    return CompletionResponse(id=cmpl_id, model=client.model_name, choices=choices,
                              usage=serving.usage(states, [len(ids) for ids, _ in prompts]))


def _stream(client, req, cmpl_id, prompts, states):
    fmt = _Formatter(client, req, prompts)
    started: set[int] = set()
    prompt_lens = [len(ids) for ids, _ in prompts]

    def chunk(choices, usage=None) -> CompletionResponse:
        return CompletionResponse(id=cmpl_id, model=client.model_name, choices=choices, usage=usage)

    def on_output(state: ChoiceState, out: RequestOutput):
        echo = req.echo and state.index not in started
        started.add(state.index)
        text = (fmt.echo_text(state) if echo else "") + out.new_text
        if not text and not out.new_token_ids and not out.finished and not echo:
            return
        spec = serving.spec_usage([state.spec]) if out.finished else None
        choice = CompletionChoice(index=state.index, text=text, logprobs=fmt.logprobs(state, out.new_logprobs or [], echo),
                                  finish_reason=serving.finish_reason_str(out.finish_reason), speculative=spec)
        continuous = req.stream_options and req.stream_options.continuous_usage_stats
        yield chunk([choice], serving.usage(states, prompt_lens) if continuous else None)

    def on_end():
        if req.include_usage:
            yield chunk([], serving.usage(states, prompt_lens))

    return lambda group: serving.sse_events(group, states, on_output, on_end)


@router.post("/v1/completions")
async def create_completion(request: Request):
    client = serving.get_client(request)
    req: CompletionRequest = await serving.parse_body(request, CompletionRequest)
    serving.check_model(client, req.model)
    cmpl_id = serving.new_id("cmpl")
    prompts = _prompts(client, req)
    states = _plan(client, req, cmpl_id, prompts)
    if req.stream:
        return serving.stream_response(client, states, _stream(client, req, cmpl_id, prompts, states))
    if not await serving.collect(request, client, states):
        return serving.disconnected_response()
    return _response(client, req, cmpl_id, prompts, states)
