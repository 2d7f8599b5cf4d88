"""Errors on the wire: every failure becomes one status code and OpenAI's error shape.

Owns: the single table from loraplex's typed errors to HTTP status codes, and the FastAPI
exception handlers that render `{"error": {"message", "type", "param", "code"}}`. Validation
errors from request parsing (malformed JSON, unknown fields, wrong types) become 400s that name
the field. Anything unexpected reaches `gate.RequestGate`, which logs it and answers a 500 that
leaks no internals.
"""

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from loraplex.errors import (
    AdapterExists,
    AdapterInvalid,
    AdapterMalformed,
    AdapterNotFound,
    AdapterTooLarge,
    EngineUnavailable,
    Forbidden,
    LoraplexError,
    ModelLoadError,
    QueueFull,
    RequestInvalid,
    RequestTooLarge,
    ServerDraining,
    Unauthorized,
)

# Most specific class first: the first match along an exception's MRO wins.
_STATUS: dict[type[LoraplexError], tuple[int, str, str | None]] = {
    AdapterMalformed: (400, "invalid_request_error", "adapter_malformed"),
    RequestInvalid: (400, "invalid_request_error", None),
    Unauthorized: (401, "authentication_error", "invalid_api_key"),
    Forbidden: (403, "permission_error", None),
    AdapterNotFound: (404, "not_found_error", "model_not_found"),
    AdapterExists: (409, "conflict_error", "adapter_exists"),
    AdapterTooLarge: (413, "invalid_request_error", "adapter_too_large"),
    RequestTooLarge: (413, "invalid_request_error", "request_too_large"),
    AdapterInvalid: (422, "invalid_request_error", "adapter_invalid"),
    QueueFull: (429, "rate_limit_error", "queue_full"),
    ServerDraining: (503, "service_unavailable", "draining"),
    ModelLoadError: (503, "service_unavailable", None),
    EngineUnavailable: (503, "service_unavailable", "engine_unavailable"),
}


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def status_of(exc: LoraplexError) -> tuple[int, str, str | None]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500, "internal_error", None


def error_response(exc: LoraplexError, retry_after: int = 1) -> JSONResponse:
    status, error_type, code = status_of(exc)
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    return JSONResponse(error_body(str(exc), error_type, exc.param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A message naming the field at fault, and that field's dotted path as `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # A value refused outright (a lone surrogate) says more than the union shapes it also failed.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        problem = (first.get("ctx") or {}).get("error") or first.get("msg")
        return f"the request body is not valid JSON: {problem}", None
    location = [part for part in first.get("loc", ()) if part != "body"]
    if not location:
        return f"the request body must be a JSON object: {first.get('msg', 'invalid value')}", None
    param = str(location[0])
    path = ".".join(map(str, location))
    if first.get("type") == "extra_forbidden":
        return f"unknown field {path!r}", path
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == [location[0]]]
    if first.get("type") != "value_error" and len(same_field) > 1 and len({str(e["loc"][-1]) for e in same_field}) > 1:
        # Every shape of a union field failed: name the field and the shapes it accepts.
        return f"{param} has an invalid type or value; {_SHAPES.get(param, 'see the API reference')}", param
    return f"{path}: {first.get('msg', 'invalid value')}", path


_SHAPES = {
    "prompt": "expected a non-empty string, a list of strings, a list of token ids (>= 0), or a list of such lists",
    "stop": "expected a string or a list of strings",
    "content": "expected a string or a list of text parts",
}


def install_error_handlers(app: FastAPI, retry_after: int, on_refused: Callable[[Request, int], None]) -> None:
    """Route every exception the app can raise through OpenAI's error shape.

    Args:
        app: the application.
        retry_after: seconds a 429 or 503 asks the client to wait.
        on_refused: told of every request answered with an error status (for metrics).
    """

    @app.exception_handler(LoraplexError)
    async def _loraplex_error(request: Request, exc: LoraplexError) -> JSONResponse:
        response = error_response(exc, retry_after)
        on_refused(request, response.status_code)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        on_refused(request, 400)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):
            message = "the request body is nested too deeply to parse"
        code = getattr(exc, "code", None)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        on_refused(request, exc.status_code)
        return JSONResponse(error_body(message, error_type, code=code), status_code=exc.status_code, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: the 405's own `Allow` names only the first
    matching route's, so GET on a path that also takes POST from another route went missing."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return ", ".join(allowed)
