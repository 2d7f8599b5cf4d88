"""The ingress: picks the replica for each OpenAI request and relays loraplex's answer unchanged.

Owns: `Router`, which reads the adapter a request names (the `serve_multiplexed_model_id` header,
else the JSON body's `model`) and calls the replica deployment through a handle, with
`multiplexed_model_id` set for a store adapter so Ray routes it to a replica that holds it, and
without it for the base model so base requests stay load-balanced. Status, headers and body
(SSE chunks as they come) are relayed as the replica's loraplex app produced them.
It must not generate, validate adapters or touch the store: names it cannot place go to any
replica unmultiplexed, and loraplex answers them (404 for an unknown model).
"""

import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deploy.ray.bridge import HttpCall
from loraplex.api.errors import error_body
from loraplex.errors import LoraplexError
from loraplex.service.store import check_name
from ray.serve.handle import DeploymentHandle

MULTIPLEX_HEADER = "serve_multiplexed_model_id"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
FORWARDED_PATHS = (*GENERATION_PATHS, "/v1/models", "/health", "/metrics")


class Router:
    """A Ray Serve deployment class; Ray's HTTP proxy hands it every request.

    Args:
        replica: a handle to the `LoraplexReplica` deployment.
        base_model: the served base model's name; requests for it are not multiplexed.
        adapters: the adapter store directory the replicas load from.
    """

    def __init__(self, replica: DeploymentHandle, base_model: str, adapters: str):
        self._replica = replica
        self._base_model = base_model
        self._adapters = Path(adapters)

    def adapter_of(self, request: Request, body: bytes) -> str | None:
        """The store adapter a request names, or None (base model, unknown name, not a generation)."""
        name = request.headers.get(MULTIPLEX_HEADER)
        if name is None and request.method == "POST" and request.url.path in GENERATION_PATHS:
            try:
                payload = json.loads(body)
            except ValueError:
                return None
            name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name or name == self._base_model:
            return None
        try:
            check_name(name)
        except LoraplexError:
            return None
        return name if (self._adapters / name / "adapter_config.json").is_file() else None

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path not in FORWARDED_PATHS:
            message = f"{path} is not served by the Ray app; adapters are managed in the store directory"
            return JSONResponse(error_body(message, "not_found_error"), status_code=404)
        body = await request.body()
        adapter = self.adapter_of(request, body)
        call = HttpCall(request.method, path, request.url.query.encode(), list(request.headers.items()), body)
        options = {"stream": True} | ({"multiplexed_model_id": adapter} if adapter else {})
        parts = self._replica.options(**options).answer.remote(call)
        head = await parts.__anext__()
        headers = {name: value for name, value in head["headers"] if name.lower() != "content-length"}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(parts), status_code=head["status"], headers=headers)
        return Response(b"".join([chunk async for chunk in parts]), status_code=head["status"], headers=headers)


async def _relay(parts):
    try:
        async for chunk in parts:
            yield chunk
    finally:
        parts.cancel()
