"""Give a server the adapters a run needs: random PEFT adapters, uploaded or written to a store.

Owns: `provision_adapters`, which builds N random adapters of a rank and targets for the served
base's config (see checkpoints.py) and either uploads each through loraplex's
`POST /v1/adapters` or leaves them in a store directory that `loraplex serve --adapters` (or a
baseline server) reads at start-up. It must not drive load.
"""

import shutil
import tempfile
from pathlib import Path

import httpx
from rich.progress import track

from loadtest.checkpoints import ALL_TARGETS, make_random_adapters, model_config


def upload_adapter(client: httpx.Client, name: str, adapter_dir: Path, overwrite: bool = True) -> None:
    """POST one PEFT adapter directory to `/v1/adapters`; raises with the server's message on refusal."""
    files = {
        "config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
    }
    data = {"name": name, "overwrite": str(overwrite).lower(), "shared": "true"}
    response = client.post("/v1/adapters", files=files, data=data)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"upload of {name} refused with {response.status_code}: {response.text}")


def provision_adapters(
    base_config: str,
    count: int,
    rank: int,
    targets: tuple[str, ...] = ALL_TARGETS,
    prefix: str = "lora-",
    store: Path | None = None,
    upload_url: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Make `count` random adapters for the base and put them where the server finds them.

    Args:
        base_config: the served base's config: a model directory, a `config.json`, inline JSON or
            a preset name (see `checkpoints.model_config`).
        count: adapters to make, named `{prefix}0` ... `{prefix}{count - 1}`.
        rank: their LoRA rank (alpha is twice the rank).
        targets: module names they wrap.
        prefix: the name prefix.
        store: write them into this store directory (one sub-directory each).
        upload_url: upload them to this loraplex server instead (shared with every tenant, which
            needs an admin key when the server has keys).
        api_key: bearer token for the uploads.
        seed: seeds the weights.

    Returns:
        The adapter names, in order.
    """
    if (store is None) == (upload_url is None):
        raise ValueError("give exactly one of store and upload_url")
    config = model_config(base_config, max_positions=4096)
    if store is not None:
        return list(make_random_adapters(config, store, count, rank, targets, prefix, seed))
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-adapters-"))
    try:
        paths = make_random_adapters(config, workdir, count, rank, targets, prefix, seed)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(base_url=upload_url, headers=headers, timeout=120) as client:
            for name, path in track(paths.items(), description="uploading adapters"):
                upload_adapter(client, name, path)
        return list(paths)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
