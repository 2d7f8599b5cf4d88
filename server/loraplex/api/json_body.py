"""How JSON request bodies are parsed: strictly, so that two parsers can never read one body two ways.

Owns: `StrictJsonRoute`, the route class every router uses, whose requests parse their body with
`strict_loads`: a key given twice in one object, or a non-standard constant (NaN, Infinity), is a
JSON error (400). Python's parser would take the last duplicate where a gateway in front of the
server may take the first (and route by one `model` while the server serves another), and would
read NaN where no standard parser does. It must not validate fields; the schemas do that.
"""

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def strict_loads(body: bytes | str) -> Any:
    """`json.loads`, refusing duplicate keys and NaN/Infinity with a `json.JSONDecodeError`."""
    try:
        return json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise json.JSONDecodeError(str(exc), text, 0) from None


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """An APIRoute whose handler sees a request that parses JSON with `strict_loads`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJsonRequest(request.scope, request.receive))

        return strict_handler
