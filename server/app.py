"""The FastAPI application: routers, OpenAI-shaped errors, auth, lifespan, /health /metrics /version.

`build_app(engine_client)` does not load anything itself: the lifespan starts the client's engine
thread, which loads the model while /health answers 503, and on shutdown drains it.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server import chat, completions, models
from server.engine_client import EngineClient
from server.errors import APIError, install_error_handlers
from server.serving import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)


def specd_version() -> str:
    try:
        from importlib.metadata import version

        return version("specd")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"


def _auth_dependency(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided" if header else "Missing bearer API key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def build_app(engine_client: EngineClient, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 30.0) -> FastAPI:
    """An app serving `engine_client`; api_key protects every route except /health /metrics /version."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_client.start()
        yield
        await engine_client.shutdown(timeout=drain_timeout)

    app = FastAPI(title="specd", version=specd_version(), lifespan=lifespan)
    app.state.engine_client = engine_client
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)

    protected = APIRouter(dependencies=[Depends(_auth_dependency(api_key))])
    for router in (completions.router, chat.router, models.router):
        protected.include_router(router)
    app.include_router(protected)
    app.include_router(_ops_router())
    return app


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request):
        client: EngineClient = request.app.state.engine_client
        if client.ready and not client.draining:
            return {"status": "ok"}
        status = "draining" if client.draining else ("failed" if client.load_error else "loading")
        return JSONResponse({"status": status}, status_code=503)

    @router.get("/metrics")
    async def metrics(request: Request):
        exporter = request.app.state.engine_client.exporter
        if exporter is not None:
            body, content_type = exporter.render()
        else:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body, content_type = generate_latest(), CONTENT_TYPE_LATEST
        return Response(body, media_type=content_type)

    @router.get("/version")
    async def version():
        return {"version": specd_version()}

    return router
