"""What every route needs, in one object: the engine, the adapter catalog, keys, metrics, config.

Owns: the server-wide state the HTTP layer shares (including the draining flag and the count of
generation requests in flight), built once at start-up and handed to `create_app`. Routes reach
it through the `services` dependency; nothing here is a module global.
"""

import time
from dataclasses import dataclass, field

from fastapi import Request

from loraplex.api.auth import ApiKeys
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.config import ServerConfig
from loraplex.engine.client import EngineClient
from loraplex.engine.engine import Engine
from loraplex.metrics import Metrics
from loraplex.service.catalog import AdapterCatalog
from loraplex.service.store_sync import StoreSync


@dataclass(eq=False)
class Services:
    config: ServerConfig
    engine: Engine | EngineClient
    catalog: AdapterCatalog
    keys: ApiKeys
    metrics: Metrics
    chat_templates: ChatTemplateRenderer
    prompts: PromptEncoder
    store_sync: StoreSync | None = None  # polls a store other replicas share; started with the app
    draining: bool = False
    in_flight: int = 0  # generation requests being answered now
    started: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        return self.config.model_name


def services(request: Request) -> Services:
    """FastAPI dependency: the app's `Services`."""
    return request.app.state.services
