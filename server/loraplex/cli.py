"""The `loraplex` command line: thin commands over the library.

Owns: argument parsing and printing. The options that set a config field (every `serve` flag,
the engine options of `plan` and `generate`) are derived from `EngineConfig` and `ServerConfig`
by cli_options.py, so their defaults, bounds and help live in config.py alone; every `serve` flag
also reads a `LORAPLEX_*` environment variable. Every command builds one config object and calls
library functions; no serving logic lives here.
"""

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from loraplex.cli_options import build_config, field_option, field_options, with_options
from loraplex.config import EngineConfig, ServerConfig

app = typer.Typer(help="loraplex: many LoRA adapters on one resident base model.", no_args_is_help=True)
console = Console(stderr=True)
MAX_NAMES_SHOWN = 20  # adapter names printed at start-up; GET /v1/adapters lists them all
ENV_PREFIX = "LORAPLEX_"
ENGINE_PANEL = "Engine (EngineConfig)"
SERVER_PANEL = "Server (ServerConfig)"
PLAN_ENGINE_FIELDS = (
    "quantize", "dtype", "max_loras", "max_lora_rank", "max_model_len", "max_num_seqs", "block_size", "num_kv_blocks",
)  # fmt: skip
PLAN_NOTES = {
    "dtype": "The plan is for a GPU: here auto is bfloat16.",
    "max_num_seqs": "The plan's KV cache holds this many sequences at full length.",
}


@app.callback()
def main() -> None:
    """loraplex: many LoRA adapters on one resident base model."""


@app.command()
@with_options(field_options(EngineConfig, ("model", "dtype", "device", "quantize"), panel=ENGINE_PANEL))
def generate(
    prompt: Annotated[str, typer.Option(help="Text to complete.")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA adapter directory; omit for the base model.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    **engine_options: Any,
) -> None:
    """Print one completion, for a quick look from the shell."""
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import SamplingParams
    from loraplex.errors import LoraplexError

    try:
        config = build_config(EngineConfig, {**engine_options, "max_loras": 1})
        engine = Engine(config)
        name = None
        if adapter is not None:
            name = adapter.name
            loaded = engine.load_adapter(name, adapter)
            console.print(f"adapter {name}: rank {loaded.rank}, targets {', '.join(loaded.target_modules)}")
        prompt_ids = engine.base.tokenizer(prompt)["input_ids"]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        completion = engine.generate([prompt_ids], [name], params)[0]
    except (LoraplexError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    typer.echo(completion.text)
    console.print(f"[{len(completion.output_ids)} tokens, finish reason: {completion.finish_reason.value}]")


@app.command()
def export(
    adapter: Annotated[str, typer.Option(help="Adapter name in the store, or a PEFT adapter directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write the merged checkpoint to (new or empty).")],
    model: Annotated[Path | None, typer.Option(help="The base's full-precision checkpoint (default: the bundled demo).")] = None,
    adapters: Annotated[Path, typer.Option(help="Adapter store that names are looked up in.")] = Path("adapters"),
    dtype: Annotated[str, typer.Option(help="auto (keep the checkpoint's), float32, bfloat16 or float16.")] = "auto",
    quantize: Annotated[str, typer.Option(help="none, or nf4 / int8 to save it pre-quantized (bitsandbytes).")] = "none",
) -> None:
    """Merge one adapter into the base and write a standard Hugging Face checkpoint."""
    from loraplex.demo import DEMO_MODEL_DIR
    from loraplex.errors import LoraplexError
    from loraplex.export import export_merged

    adapter_dir = Path(adapter) if Path(adapter).is_dir() else adapters / adapter
    try:
        report = export_merged(model or DEMO_MODEL_DIR, adapter_dir, out, dtype=dtype, quantize=quantize)
    except (LoraplexError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(
        f"merged {adapter_dir.name} into {report.merged_modules} weights; wrote {report.shards} shard(s), "
        f"{report.bytes_written / 2**20:.1f} MiB, to {report.out_dir}"
    )


@app.command()
def merge(
    adapters_to_merge: Annotated[str, typer.Option("--adapters", help="Comma-separated store adapter names, e.g. a,b,c.")],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per adapter, e.g. 0.6,0.4.")],
    out: Annotated[str, typer.Option(help="Name of the new adapter in the store.")],
    method: Annotated[str, typer.Option(help="linear, cat, svd, ties, dare_linear or dare_ties.")] = "linear",
    density: Annotated[float | None, typer.Option(help="Fraction of entries kept (ties, dare_*).")] = None,
    rank: Annotated[int | None, typer.Option(help="Rank of the result (svd).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random pruning.")] = 0,
    model: Annotated[Path | None, typer.Option(help="The base checkpoint the adapters belong to (default: the bundled demo).")] = None,
    store: Annotated[Path, typer.Option(help="The adapter store.")] = Path("adapters"),
    overwrite: Annotated[bool, typer.Option(help="Replace an adapter of the same name.")] = False,
) -> None:
    """Merge store adapters into a new one in the store (shared, as adapters placed by an operator are)."""
    import json

    from safetensors.torch import save as save_safetensors

    from loraplex.demo import DEMO_MODEL_DIR
    from loraplex.errors import LoraplexError
    from loraplex.export import module_shapes, tensor_shapes, weight_files
    from loraplex.lora.adapter import read_adapter_dir
    from loraplex.merging import merge_adapters
    from loraplex.service.store import AdapterStore

    names = [name.strip() for name in adapters_to_merge.split(",") if name.strip()]
    try:
        factors = [float(weight) for weight in weights.split(",")]
        shapes = module_shapes(tensor_shapes(weight_files(model or DEMO_MODEL_DIR)))
        sources = [read_adapter_dir(store / name) for name in names]
        config, tensors = merge_adapters(sources, factors, method, shapes, density, rank, seed)
        stored = AdapterStore(store).save(out, json.dumps(config, indent=2).encode(), save_safetensors(tensors), None, overwrite=overwrite)
    except (LoraplexError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"merged {', '.join(names)} ({method}) into {stored.name}: rank {config['r']}, in {stored.path}")


@app.command()
@with_options([field_option(EngineConfig, name, panel=ENGINE_PANEL, note=PLAN_NOTES.get(name, "")) for name in PLAN_ENGINE_FIELDS])
def plan(
    model: Annotated[str, typer.Option(help="A checkpoint directory or a config.json; only the config is read.")],
    adapter_rank: Annotated[int, typer.Option(help="Rank of the adapters counted on the host and in training.")] = 16,
    **engine_options: Any,
) -> None:
    """Print the memory a deployment needs, from the model's config alone (no weights are loaded)."""
    from rich.table import Table

    from loraplex.plan import plan_memory

    try:
        engine = build_config(EngineConfig, {"model": model, **engine_options})
        memory = plan_memory(model, adapter_rank=adapter_rank, **engine.model_dump(include=set(PLAN_ENGINE_FIELDS)))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    table = Table(show_header=False, box=None)
    for label, value in memory.to_table():
        table.add_row(f"[bold]{label}[/bold]", value)
    Console().print(table)


# Every config field is a serve flag but enable_lora (internal: --merge-adapter turns it off) and
# engine (built from the engine flags); --model has a default of its own, the bundled demo.
NOT_FLAGS = ("model", "enable_lora", "tenant_weights")  # model has its own option; the others are set by code
SERVE_ENGINE_FIELDS = tuple(name for name in EngineConfig.model_fields if name not in NOT_FLAGS)
SERVE_SERVER_FIELDS = tuple(name for name in ServerConfig.model_fields if name != "engine")
SERVE_OPTIONS = [
    field_option(
        EngineConfig, "model", env_prefix=ENV_PREFIX, panel=ENGINE_PANEL, default=None, shown_default="the bundled demo"
    ),
    *field_options(EngineConfig, SERVE_ENGINE_FIELDS, env_prefix=ENV_PREFIX, panel=ENGINE_PANEL),
    *field_options(ServerConfig, SERVE_SERVER_FIELDS, env_prefix=ENV_PREFIX, panel=SERVER_PANEL),
]


def serve_config(options: Mapping[str, Any]) -> ServerConfig:
    """The config `loraplex serve` runs with, from its option values by field name.

    Args:
        options: a value (None: unset) for `model` and each of `SERVE_ENGINE_FIELDS` and
            `SERVE_SERVER_FIELDS`; without `model`, the bundled demo base is served.

    Raises:
        OptionError: for values the configs refuse, naming the flags.
        ValueError: when the demo is to be served but has not been built.
    """
    from loraplex.demo import DEMO_MODEL_DIR

    model = options["model"]
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ValueError("no --model given and the demo model is missing; build it with python -m loraplex.demo.build")
        model = str(DEMO_MODEL_DIR)
    engine = build_config(EngineConfig, {"model": model, **{name: options[name] for name in SERVE_ENGINE_FIELDS}})
    return build_config(ServerConfig, {"engine": engine, **{name: options[name] for name in SERVE_SERVER_FIELDS}})


def _names(names: list[str]) -> str:
    """At most MAX_NAMES_SHOWN names, and how many there are in all past that."""
    more = f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else ""
    return ", ".join(names[:MAX_NAMES_SHOWN]) + more


@app.command()
@with_options(SERVE_OPTIONS)
def serve(**options: Any) -> None:
    """Serve the OpenAI-compatible API, adapter management and metrics over HTTP."""
    from loraplex.errors import LoraplexError
    from loraplex.server import build_services, run

    try:
        config = serve_config(options)
        svc, problems = build_services(config)
    except (LoraplexError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    base = svc.engine.base
    console.print(f"model: {config.model_name} ({config.engine.model})")
    console.print(
        f"device: {base.device}, dtype: {str(base.dtype).removeprefix('torch.')}, quantization: {base.quantize}, "
        f"kernels: {svc.engine.kernel_backend}"
    )
    console.print(f"kv cache: {svc.engine.kv_summary}")
    if config.merge_adapter is not None:
        console.print(f"serving adapter {config.merge_adapter} merged into the base: LoRA off, no adapters taken")
    modules = [name for name, _ in config.lora_module_paths()]
    stored = [name for name in svc.catalog.names() if name not in modules]
    store = config.adapters.resolve()
    console.print(f"adapters in {store}: {_names(stored) or 'none'}")
    if modules:
        console.print(f"adapters from --lora-modules: {_names(modules)}")
    for name, problem in problems:
        console.print(f"[yellow]skipped adapter {name}:[/yellow] {problem}")
    if config.merge_adapter is None and not stored and not problems:
        relative = "" if config.adapters.is_absolute() else f" (--adapters {config.adapters} is relative to where serve runs)"
        console.print(f"[yellow]warning:[/yellow] the adapter store {store} holds no adapter{relative}")
    if svc.keys.open_access:
        console.print(
            "[yellow]warning:[/yellow] no --api-keys file or --api-key: the server is open, every caller is the admin "
            "of one default tenant"
        )
    console.print(f"listening on http://{config.host}:{config.port}")
    status = run(svc)
    # The engine is stopped and every connection closed. The interpreter's own teardown of the
    # model and its libraries takes seconds, which a drain timeout has no room for: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
