"""OpenAI-style errors for the HTTP API: the error body, the exception -> HTTP status mapping, FastAPI handlers.

Every error answers `{"error": {"message", "type", "param", "code"}}` with:

    InvalidRequest, TokenizerError, request validation, malformed JSON  400 invalid_request_error
    wrong or missing API key                                             401 invalid_request_error / invalid_api_key
    unknown model                                                        404 invalid_request_error / model_not_found
    unknown route / wrong method                                         404 / 405 invalid_request_error
    body over the size limit                                             413 invalid_request_error / request_too_large
    QueueFull                                                            429 rate_limit_error (+ Retry-After)
    EngineUnavailable, a generation that ended in "error" or "abort"     503 server_error
    anything else                                                        500 server_error, generic message (the
                                                                             traceback goes to the server log only)

`api_error_from(exc)` is the mapping itself; other front ends (gRPC) follow the same table.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_shards.tokenizer import TokenizerError

from ..engine.engine import EngineUnavailable, QueueFull
from ..engine.sampling import InvalidRequest

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
INTERNAL_MESSAGE = "The server had an internal error while processing the request."


class APIError(Exception):
    """An HTTP error with OpenAI's error body; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def generation_failed(out=None) -> APIError:
    """A request the engine finished with "error" (shard failure) or "abort" (shutdown). The engine's messages are
    written for users; those of unexpected exceptions ("internal error: ...") stay in the server log."""
    message = "Generation failed in the model backend; retry the request."
    if out is not None and out.finish_reason == "timeout":
        return APIError(504, f"Request timed out: {out.error}.", "server_error", code="timeout")
    if out is not None and out.finish_reason == "abort":
        message = "The server is shutting down; retry the request."
    elif out is not None and out.error and not out.error.startswith("internal error"):
        message = f"Generation failed: {out.error}; retry the request."
    return APIError(503, message, "server_error", code="generation_failed")


def internal_error() -> APIError:
    return APIError(500, INTERNAL_MESSAGE, "server_error", code="internal_error")


def api_error_from(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, TokenizerError):
        return APIError(400, str(exc))
    if isinstance(exc, QueueFull):
        return APIError(429, f"The server is busy ({exc}); retry later.", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"The model is unavailable: {exc}", "server_error", code="engine_unavailable")
    return internal_error()


# ---- request validation errors ---------------------------------------------------------------------------------
def _field_path(loc) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def validation_error(errors: list[dict]) -> APIError:
    """pydantic/FastAPI validation errors -> one 400 naming the (first) bad field in `param` and the message."""
    if not errors:
        return APIError(400, "Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}).", code="invalid_json")
    parts, param = [], None
    for err in errors[:3]:
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        path = _field_path(loc)
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if not path:
            if err.get("type") in ("model_attributes_type", "dict_type", "model_type", "missing"):
                msg = "the request body must be a JSON object (send Content-Type: application/json)"
            path = "body"
        param = param or path
        parts.append(f"{path}: {msg}")
    more = f" (and {len(errors) - 3} more errors)" if len(errors) > 3 else ""
    return APIError(400, "; ".join(parts) + more, param=None if param == "body" else param)


# ---- FastAPI handlers ----------------------------------------------------------------------------------------------
async def _on_mapped(request: Request, exc: Exception) -> JSONResponse:
    return api_error_from(exc).response()


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(list(exc.errors())).response()


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if exc.status_code == 404:
        err = APIError(404, f"Unknown route: {request.method} {path}", code="not_found")
    elif exc.status_code == 405:
        err = APIError(405, f"Method {request.method} is not allowed for {path}", code="method_not_allowed")
    else:
        err = APIError(exc.status_code, str(exc.detail),
                       "server_error" if exc.status_code >= 500 else "invalid_request_error")
    err.headers = dict(exc.headers) if exc.headers else None  # e.g. Allow on a 405
    return err.response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware sends this, then re-raises exc so the server (uvicorn, Ray Serve) logs it
    return internal_error().response()


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (APIError, InvalidRequest, TokenizerError, QueueFull, EngineUnavailable):
        app.add_exception_handler(exc_type, _on_mapped)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)  # Starlette's ServerErrorMiddleware: always a 500
