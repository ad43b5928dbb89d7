"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every non-2xx answer.

Every handler below counts the status via the metrics exporter, so dashboards see 4xx/5xx rates.
The catch-all handler exists so that nothing, however malformed, answers with a bare traceback;
tests assert it never fires.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere in request handling; turned into an OpenAI error body by the handler."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {
        "message": message,
        "type": _TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "internal_server_error"),
        "param": param,
        "code": code,
    }}


def count_error(request: Request, status_code: int) -> None:
    client = getattr(request.app.state, "engine_client", None)
    exporter = getattr(client, "exporter", None)
    if exporter is not None and hasattr(exporter, "count_http_error"):
        try:
            exporter.count_http_error(status_code)
        except Exception:  # metrics must never turn an error answer into a 500
            log.exception("count_http_error failed")


def error_response(request: Request, err: APIError) -> JSONResponse:
    count_error(request, err.status_code)
    return JSONResponse(error_body(err.status_code, err.message, err.param, err.code),
                        status_code=err.status_code, headers=err.headers)


def is_queue_full(exc: BaseException) -> bool:
    # Matched by name so the server need not import engine.scheduler (and its import order) to catch it.
    return any(cls.__name__ == "QueueFullError" for cls in type(exc).__mro__)


def queue_full_error(retry_after: int = 1) -> APIError:
    return APIError(429, "the server's request queue is full; retry later", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # Routes parse their own bodies (serving.parse_body); this covers query/path parameters.
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(request, bad_request(first.get("msg", "invalid request"), param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if is_queue_full(exc):
            return error_response(request, queue_full_error())
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
