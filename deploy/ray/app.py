"""The Ray Serve application: a router in front of `num_replicas` loraplex replicas.

Owns: `RayAppArgs` (what `serve run deploy.ray.app:build_app key=value ...` accepts: the Ray-only
settings, and the `EngineConfig` / `ServerConfig` fields a replica honours, whose defaults and
bounds stay in loraplex.config) and `build_app`, which turns them into one loraplex `ServerConfig`
per replica and binds the deployments. Run it with `serve run deploy.ray.app:build_app model=DIR
adapters=DIR` or `python -m deploy.ray MODEL ADAPTERS`.
It must not restate a config field's default or bounds.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy.ray.replica import LoraplexReplica
from deploy.ray.router import Router
from loraplex.config import EngineConfig, ServerConfig
from ray import serve
from ray.serve import Application

# Config fields a replica cannot honour, and why; every other EngineConfig / ServerConfig field is a setting.
NOT_RAY_SETTINGS = {
    "engine": "give its fields (model, max_loras, ...) as settings",
    "enable_lora": "adapters are what the replicas multiplex",
    "tenant_weights": "the Ray app has no API keys or tenants",
    "merge_adapter": "adapters are what the replicas multiplex",
    "host": "Ray's proxy listens (serve start --http-host)",
    "port": "Ray's proxy listens (serve start --http-port)",
    "drain_timeout": "Ray Serve drains replicas itself",
    "api_keys": "the Ray app has no API keys or tenants",
    "metrics_auth": "the Ray app has no API keys or tenants",
    "lora_roots": "adapters are loaded from the store only",
    "lora_modules": "adapters are loaded from the store only",
    "api_key": "the Ray app has no API keys or tenants",
}
ENGINE_SETTINGS = tuple(name for name in EngineConfig.model_fields if name not in NOT_RAY_SETTINGS)
SERVER_SETTINGS = tuple(name for name in ServerConfig.model_fields if name not in NOT_RAY_SETTINGS)


class RayAppArgs(BaseModel):
    """The app's settings; `serve run` passes them as strings, pydantic converts them.

    Besides the Ray-only fields below, every name in `ENGINE_SETTINGS` and `SERVER_SETTINGS` is a
    setting (`model` is required), validated and defaulted by `EngineConfig` and `ServerConfig`:
    e.g. `adapters` (the store, as `loraplex serve --adapters`), `served_model_name`, `dtype`,
    `device`, `max_model_len`, `max_num_seqs`, `max_queue`. `model` and `adapters` must be
    readable at the same paths on every node; `max_loras` is both each engine's device slots and
    the size of Ray's multiplexed LRU on each replica.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    num_replicas: int = Field(default=2, ge=1, description="loraplex replicas, each with its own engine.")
    replica_cpus: float = Field(default=1.0, ge=0, description="CPUs each replica reserves from Ray.")
    replica_gpus: float = Field(default=0.0, ge=0, description="GPUs each replica reserves from Ray.")

    @model_validator(mode="after")
    def _check(self) -> "RayAppArgs":
        for name in self.model_extra:
            if name in NOT_RAY_SETTINGS:
                raise ValueError(f"{name} is not a Ray app setting: {NOT_RAY_SETTINGS[name]}")
            if name not in ENGINE_SETTINGS and name not in SERVER_SETTINGS:
                raise ValueError(f"unknown setting {name}")
        return self

    def server_config(self) -> ServerConfig:
        """The config every replica runs with; the store path is made absolute for the replicas' workers."""
        settings: dict[str, Any] = self.model_extra
        engine = EngineConfig.model_validate({name: settings[name] for name in ENGINE_SETTINGS if name in settings})
        config = ServerConfig.model_validate(
            {"engine": engine, **{name: settings[name] for name in SERVER_SETTINGS if name in settings}}
        )
        return config.model_copy(update={"adapters": config.adapters.resolve()})


def build_app(args: dict) -> Application:
    """The application `serve run` / `serve.run` deploys; `args` as `RayAppArgs` takes them."""
    settings = RayAppArgs.model_validate(args)
    config = settings.server_config()
    replica = serve.deployment(
        LoraplexReplica,
        name="LoraplexReplica",
        num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        health_check_period_s=5,
    )
    router = serve.deployment(Router, name="Router", ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(config), config.model_name, str(config.adapters))
