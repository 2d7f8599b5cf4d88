"""The `loraplex` command line: thin commands over the library.

Owns: argument parsing and printing. Every command builds one `EngineConfig` and calls library
functions; no serving logic lives here.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="loraplex: many LoRA adapters on one resident base model.", no_args_is_help=True)
console = Console(stderr=True)


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
