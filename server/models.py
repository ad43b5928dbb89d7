"""/v1/models, /tokenize, /detokenize, /tokenizer_info (the last three as in vLLM's server)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request

from server import serving
from server.chat import chat_prompt_ids
from server.errors import APIError, bad_request
from server.protocol import DetokenizeRequest, TokenizeRequest

router = APIRouter()
_CREATED = int(time.time())


def _model_card(client) -> dict:
    return {"id": client.model_name, "object": "model", "created": _CREATED, "owned_by": "specd",
            "root": client.model_name, "max_model_len": client.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request):
    client = serving.get_client(request)
    return {"object": "list", "data": [_model_card(client)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    client = serving.get_client(request)
    if model_id != client.model_name:
        raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
    return _model_card(client)


@router.post("/tokenize")
async def tokenize(request: Request):
    client = serving.get_client(request)
    req: TokenizeRequest = await serving.parse_body(request, TokenizeRequest)
    serving.check_model(client, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        tokens = client.tokenizer.encode(req.prompt)
    else:
        tokens = chat_prompt_ids(client, req.messages, req.add_generation_prompt)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": client.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request):
    client = serving.get_client(request)
    req: DetokenizeRequest = await serving.parse_body(request, DetokenizeRequest)
    serving.check_model(client, req.model)
    try:
        client.tokenizer.check_token_ids(req.tokens)
    except ValueError as exc:
        raise bad_request(f"tokens: {exc}", "tokens") from None
    return {"prompt": client.tokenizer.decode(req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    client = serving.get_client(request)
    tok = client.tokenizer
    return {
        "model": client.model_name,
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": getattr(tok, "bos_token_id", None),
        "max_model_len": client.max_model_len,
        "chat_template": getattr(tok, "chat_template", None),
    }
