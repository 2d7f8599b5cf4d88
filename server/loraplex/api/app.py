"""The FastAPI application: routes, error handling, health, metrics, and the engine's lifetime.

Owns: `create_app`, which wires the route modules to one `Services`, starts the engine loop when
the app starts and stops it when the app stops, refuses new `/v1` work with 503 while the server
drains, and serves `GET /health` and `GET /metrics` (both cheap: they read the engine's published
snapshot and never wait for a step) and vLLM's `GET /version`. What `/openapi.json` says is openapi.py's.
"""

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from loraplex import __version__
from loraplex.api import adapters, chat, completions, models, tokenization
from loraplex.api.errors import install_error_handlers
from loraplex.api.gate import RequestGate
from loraplex.api.openapi import install_openapi
from loraplex.api.response_models import Healthy, Unhealthy, VersionInfo
from loraplex.api.services import Services, services
from loraplex.errors import ServerDraining
from loraplex.metrics import INVALID, REJECTED

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def refuse_when_draining(svc: Services = Depends(services)) -> None:
    if svc.draining:
        raise ServerDraining("the server is shutting down; retry on another replica")


def create_app(svc: Services) -> FastAPI:
    """An app serving `svc`'s engine; the engine loop runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.engine.start()
        if svc.store_sync is not None:
            svc.store_sync.start()
        try:
            yield
        finally:
            if svc.store_sync is not None:
                svc.store_sync.stop()
            svc.engine.stop()
            svc.chat_templates.close()

    app = FastAPI(title="loraplex", summary="Multi-LoRA serving with an OpenAI-compatible API", lifespan=lifespan)
    app.state.services = svc

    def on_refused(path: str, status: int) -> None:
        if path not in GENERATION_PATHS:
            return
        if status in (429, 503):
            svc.metrics.request_rejected(REJECTED)
        elif 400 <= status < 500:
            svc.metrics.request_rejected(INVALID)

    install_error_handlers(app, svc.config.retry_after, lambda request, status: on_refused(request.url.path, status))
    config = svc.config
    app.add_middleware(
        RequestGate,
        keys=svc.keys,
        max_request_bytes=config.max_request_bytes,
        max_adapter_bytes=config.max_adapter_bytes,
        protect_metrics=config.metrics_auth == "key",
        on_refused=on_refused,
    )
    admitted = [Depends(refuse_when_draining)]
    for module in (completions, chat, models, adapters, tokenization):
        app.include_router(module.router, dependencies=admitted)

    @app.get(
        "/health",
        response_model=None,
        responses={
            200: {"model": Healthy, "description": "The engine loop runs and the server takes requests."},
            503: {"model": Unhealthy, "description": "Draining, or the engine loop is not running (no Retry-After)."},
        },
    )
    async def health() -> Response:  # on the event loop: no thread-pool hop, nothing to wait for
        if svc.engine.alive and not svc.draining:
            return JSONResponse({"status": "ok"})
        failure = svc.engine.failure
        reason = "draining" if svc.draining else f"engine stopped: {failure}" if failure else "engine loop not running"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/version", response_model=None, responses={200: {"model": VersionInfo, "description": "loraplex's version."}})
    async def version() -> dict:  # open, as vLLM's and /health are: it says nothing about tenants
        return {"version": __version__}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    install_openapi(app, svc)
    return app
