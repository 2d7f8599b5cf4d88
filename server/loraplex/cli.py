"""The `loraplex` command line: thin commands over the library.

Owns: argument parsing (every `serve` flag also reads a `LORAPLEX_*` environment variable) and
printing. Every command builds one config object and calls library functions; no serving logic
lives here.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="loraplex: many LoRA adapters on one resident base model.", no_args_is_help=True)
console = Console(stderr=True)
MAX_NAMES_SHOWN = 20  # adapter names printed at start-up; GET /v1/adapters lists them all


@app.callback()
def main() -> None:
    """loraplex: many LoRA adapters on one resident base model."""


@app.command()
def generate(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint directory of the base model.")],
    prompt: Annotated[str, typer.Option(help="Text to complete.")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA adapter directory; omit for the base model.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quantize: Annotated[str, typer.Option(help="none, nf4 or int8 (bitsandbytes).")] = "none",
) -> None:
    """Print one completion, for a quick look from the shell."""
    from loraplex.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import SamplingParams
    from loraplex.errors import LoraplexError

    try:
        config = EngineConfig(model=str(model), dtype=dtype, device=device, quantize=quantize, max_loras=1)
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
    from loraplex.merging import merge_adapters
    from loraplex.registry.adapter import read_adapter_dir
    from loraplex.registry.store import AdapterStore

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
def plan(
    model: Annotated[str, typer.Option(help="A checkpoint directory or a config.json; only the config is read.")],
    quantize: Annotated[str, typer.Option(help="none, nf4 or int8 (bitsandbytes).")] = "none",
    dtype: Annotated[str, typer.Option(help="auto (bfloat16, as on a GPU), float32, bfloat16 or float16.")] = "auto",
    max_loras: Annotated[int, typer.Option(help="Device adapter slots.")] = 8,
    max_lora_rank: Annotated[int, typer.Option(help="Rank of the slot stacks.")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: the model's, up to 4096).")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences the KV cache holds at full length.")] = 32,
    adapter_rank: Annotated[int, typer.Option(help="Rank of the adapters counted on the host and in training.")] = 16,
) -> None:
    """Print the memory a deployment needs, from the model's config alone (no weights are loaded)."""
    from rich.table import Table

    from loraplex.plan import plan_memory

    try:
        memory = plan_memory(
            model, quantize=quantize, dtype=dtype, max_loras=max_loras, max_lora_rank=max_lora_rank,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, adapter_rank=adapter_rank,
        )  # fmt: skip
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    table = Table(show_header=False, box=None)
    for label, value in memory.to_table():
        table.add_row(f"[bold]{label}[/bold]", value)
    Console().print(table)


def _option(help_text: str, env: str, **kwargs):
    return typer.Option(help=help_text, envvar=f"LORAPLEX_{env}", show_envvar=True, **kwargs)


@app.command()
def serve(
    model: Annotated[
        Path | None, _option("Hugging Face checkpoint directory of the base model (default: the bundled demo).", "MODEL")
    ] = None,
    served_model_name: Annotated[
        str | None, _option("The base model's id in the API (default: the directory name).", "SERVED_MODEL_NAME")
    ] = None,
    adapters: Annotated[Path, _option("Adapter store directory (created if missing).", "ADAPTERS")] = Path("adapters"),
    quantize: Annotated[str, _option("none, nf4 or int8 (bitsandbytes).", "QUANTIZE")] = "none",
    dtype: Annotated[str, _option("auto, float32, bfloat16 or float16.", "DTYPE")] = "auto",
    device: Annotated[str, _option("auto, cpu or cuda.", "DEVICE")] = "auto",
    host: Annotated[str, _option("Address to listen on.", "HOST")] = "127.0.0.1",
    port: Annotated[int, _option("Port to listen on.", "PORT")] = 8000,
    max_loras: Annotated[int, _option("Device slots: distinct adapters one step may mix.", "MAX_LORAS")] = 8,
    max_lora_rank: Annotated[int, _option("Largest adapter rank accepted.", "MAX_LORA_RANK")] = 64,
    max_num_seqs: Annotated[int, _option("Sequences running in one step at most.", "MAX_NUM_SEQS")] = 32,
    max_model_len: Annotated[
        int | None, _option("Prompt plus generated tokens of one sequence (default: the model's, up to 4096).", "MAX_MODEL_LEN")
    ] = None,
    max_queue: Annotated[int, _option("Requests that may wait; past it, 429.", "MAX_QUEUE")] = 256,
    max_adapter_bytes: Annotated[int, _option("Largest adapter upload, in bytes.", "MAX_ADAPTER_BYTES")] = 1 << 30,
    api_keys: Annotated[Path | None, _option("TOML file of API keys, tenants and roles.", "API_KEYS")] = None,
    lora_roots: Annotated[
        list[Path] | None, _option("Directories /v1/load_lora_adapter may read (default: the store).", "LORA_ROOTS")
    ] = None,
    drain_timeout: Annotated[float, _option("Seconds SIGTERM waits for running requests.", "DRAIN_TIMEOUT")] = 30.0,
    merge_adapter: Annotated[
        str | None, _option("Serve this store adapter merged into the base, under its name, with LoRA off.", "MERGE_ADAPTER")
    ] = None,
    metrics_compat: Annotated[
        str, _option("none, or vllm to also export vLLM's metric names (for the Inference Gateway).", "METRICS_COMPAT")
    ] = "none",
) -> None:
    """Serve the OpenAI-compatible API, adapter management and metrics over HTTP."""
    from pydantic import ValidationError

    from loraplex.config import EngineConfig, ServerConfig
    from loraplex.demo import DEMO_MODEL_DIR
    from loraplex.errors import LoraplexError
    from loraplex.server import build_services, run

    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            console.print("[red]error:[/red] no --model given and the demo model is missing; build it with "
                          "python -m loraplex.demo.build")
            raise typer.Exit(code=2)
        model = DEMO_MODEL_DIR
    try:
        engine_config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            quantize=quantize,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_queue=max_queue,
        )
        config = ServerConfig(
            engine=engine_config,
            served_model_name=served_model_name,
            adapters=adapters,
            host=host,
            port=port,
            max_adapter_bytes=max_adapter_bytes,
            api_keys=api_keys,
            lora_roots=tuple(lora_roots or ()),
            drain_timeout=drain_timeout,
            merge_adapter=merge_adapter,
            metrics_compat=metrics_compat,
        )
        svc, problems = build_services(config)
    except (LoraplexError, ValueError, ValidationError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    base = svc.engine.base
    console.print(f"model: {config.model_name} ({config.engine.model})")
    console.print(f"device: {base.device}, dtype: {str(base.dtype).removeprefix('torch.')}, quantization: {base.quantize}")
    if config.merge_adapter is not None:
        console.print(f"serving adapter {config.merge_adapter} merged into the base: LoRA off, no adapters taken")
    names = svc.catalog.names()
    shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")
    console.print(f"adapters in {config.adapters}: {shown or 'none'}")
    for name, problem in problems:
        console.print(f"[yellow]skipped adapter {name}:[/yellow] {problem}")
    if svc.keys.open_access:
        console.print(
            "[yellow]warning:[/yellow] no --api-keys file: the server is open, every caller is the admin of one "
            "default tenant"
        )
    console.print(f"listening on http://{config.host}:{config.port}")
    run(svc)
