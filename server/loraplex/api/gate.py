"""What every HTTP request passes before a route sees it, and the last resort after.

Owns: `RequestGate`, a pure ASGI middleware that, in this order and before one byte of the body is
read:
  1. refuses a request carrying more than one `Authorization` header (400: which one would count?);
  2. authenticates `/v1` routes and vLLM's top-level tokenizer routes (and `/metrics` with
     `--metrics-auth key`) from the headers alone, so an unknown caller's 300 MiB body is never
     read (401), and a metrics-only key may do nothing else (403); the principal is left in the
     request state for the `caller` dependency;
  3. refuses a declared `Content-Length` over the route's limit (413), and counts the bytes of a
     body sent without one, stopping at the limit (413 as well);
and, after the route: turns any exception no handler took into a 500 in OpenAI's error shape
*without* closing the client's keep-alive connection (Starlette's own last resort re-raises, so
uvicorn drops the connection). It must not parse bodies or know what routes do.
"""

import json
import logging
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.api.auth import ApiKeys
from loraplex.api.errors import error_body, status_of
from loraplex.errors import AdapterTooLarge, Forbidden, LoraplexError, RequestInvalid, RequestTooLarge

log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/adapters"
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})  # vLLM's, outside /v1


def needs_key(path: str) -> bool:
    """Whether `path` is one the gate authenticates as a /v1 route (it may still be open: no keys)."""
    return path.startswith("/v1/") or path == "/v1" or path in KEYED_PATHS

FORM_OVERHEAD = 1 << 20  # room in an upload for the config, the template and multipart framing


class RequestGate:
    """Authenticate and bound every request before its body is read; answer what nothing else did.

    Args:
        app: the application behind the gate.
        keys: the server's API keys.
        max_request_bytes: the body limit of every route but the adapter upload.
        max_adapter_bytes: the upload's weights limit (the upload's body may be `FORM_OVERHEAD` more).
        protect_metrics: whether `/metrics` needs an admin or metrics key.
        on_refused: told (path, status) of every request the gate itself answers with an error.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        max_request_bytes: int,
        max_adapter_bytes: int,
        protect_metrics: bool,
        on_refused: Callable[[str, int], None],
    ):
        self.app = app
        self._keys = keys
        self._max_request_bytes = max_request_bytes
        self._max_adapter_bytes = max_adapter_bytes
        self._protect_metrics = protect_metrics
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            limit, too_large = self._admit(scope)
            await self.app(scope, _limited(receive, limit, too_large(self._limit_message(scope, limit))), tracked_send)
        except LoraplexError as exc:  # refused at the gate: the route never ran
            status, error_type, code = status_of(exc)
            self._on_refused(scope["path"], status)
            await _send_json(send, status, error_body(str(exc), error_type, exc.param, code))
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                self._on_refused(scope["path"], 500)
                await _send_json(send, 500, error_body("internal server error", "internal_error"))

    def _admit(self, scope: Scope) -> tuple[int, type[LoraplexError]]:
        """Check the headers; returns the body limit and the error past it. Raises a LoraplexError to refuse."""
        path: str = scope["path"]
        authorization = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(authorization) > 1:
            raise RequestInvalid("send exactly one Authorization header; this request has several")
        header = authorization[0].decode("latin-1") if authorization else None
        if needs_key(path):
            principal = self._keys.authenticate(header)
            if principal.role == "metrics":
                raise Forbidden("this key may only read /metrics")
            scope.setdefault("state", {})["principal"] = principal
        elif path == "/metrics" and self._protect_metrics:
            principal = self._keys.authenticate(header)
            if principal.role not in ("admin", "metrics"):
                raise Forbidden("/metrics needs an admin or metrics key (--metrics-auth key)")
        upload = path == UPLOAD_PATH
        limit = self._max_adapter_bytes + FORM_OVERHEAD if upload else self._max_request_bytes
        too_large = AdapterTooLarge if upload else RequestTooLarge
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise too_large(self._limit_message(scope, limit, declared))
        return limit, too_large

    def _limit_message(self, scope: Scope, limit: int, declared: int | None = None) -> str:
        size = f"the request body is {declared} bytes" if declared is not None else "the request body is too large"
        flag = "--max-adapter-bytes, plus 1 MiB for the form" if scope["path"] == UPLOAD_PATH else "--max-request-bytes"
        return f"{size}; the limit is {limit} bytes ({flag})"


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without a declared length passes its limit.

    An HTTPException passes through FastAPI's body parsing unchanged, on to the error handler,
    which answers `status_code` with `error`'s message and code.
    """

    def __init__(self, error: LoraplexError):
        status, _, code = status_of(error)
        super().__init__(status, detail=str(error))
        self.code = code


def _limited(receive: Receive, limit: int, error: LoraplexError) -> Receive:
    """`receive`, raising `BodyTooLarge(error)` once the body passes `limit` bytes."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        event = await receive()
        if event["type"] == "http.request":
            received += len(event.get("body", b""))
            if received > limit:
                raise BodyTooLarge(error)
        return event

    return limited_receive
