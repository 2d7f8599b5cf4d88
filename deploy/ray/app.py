"""The Ray Serve application: a router in front of `num_replicas` loraplex replicas.

Owns: `RayAppArgs` (what `serve run deploy.ray.app:build_app key=value ...` accepts) and
`build_app`, which turns them into one loraplex `ServerConfig` per replica and binds the
deployments. Run it with `serve run deploy.ray.app:build_app model=DIR adapters=DIR` or
`python -m deploy.ray MODEL ADAPTERS`.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deploy.ray.replica import LoraplexReplica
from deploy.ray.router import Router
from loraplex.config import EngineConfig, ServerConfig
from ray import serve
from ray.serve import Application


class RayAppArgs(BaseModel):
    """The app's settings; `serve run` passes them as strings, pydantic converts them.

    Args:
        model: the base checkpoint directory, readable on every node.
        adapters: the adapter store directory (as `loraplex serve --adapters`), readable on every node.
        served_model_name: the base model's id in the API; the model directory's name by default.
        num_replicas: loraplex replicas, each with its own engine.
        max_loras: adapters one replica holds: its engine's device slots and Ray's multiplexed LRU size.
        replica_cpus / replica_gpus: Ray resources each replica reserves.
        dtype / device / max_model_len / max_num_seqs: the replicas' engine settings.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    adapters: Path
    served_model_name: str | None = None
    num_replicas: int = Field(default=2, ge=1)
    max_loras: int = Field(default=8, ge=1)
    replica_cpus: float = Field(default=1.0, ge=0)
    replica_gpus: float = Field(default=0.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=2)
    max_num_seqs: int = Field(default=32, ge=1)

    def server_config(self) -> ServerConfig:
        engine = EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            max_loras=self.max_loras,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
        )
        return ServerConfig(engine=engine, served_model_name=self.served_model_name, adapters=self.adapters.resolve())


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
