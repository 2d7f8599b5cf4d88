"""`python -m loadtest`: load any OpenAI-compatible server, or give it random adapters first.

Owns: the command line (typer) of the load generator: `run` (one bounded run, open or closed loop,
writing records, a summary and plots) and `adapters` (random PEFT adapters, uploaded or written to
a store). Thin: it builds configs and calls run.py and provision.py.

    python -m loadtest run --base-url http://127.0.0.1:8000 --adapters 8 --alpha 1 --rate 4
    python -m loadtest run --base-url http://127.0.0.1:8000 --model my-base --concurrency 16
    python -m loadtest adapters --base-config path/to/model --count 64 --upload http://127.0.0.1:8000
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Load generator for OpenAI-compatible (multi-LoRA) servers.", no_args_is_help=True)
console = Console()


def parse_range(text: str, name: str) -> tuple[int, int]:
    """`"16:128"` as (16, 128); a single number as (n, n)."""
    try:
        low, _, high = text.partition(":")
        return int(low), int(high or low)
    except ValueError:
        raise typer.BadParameter(f"{name} must look like LOW:HIGH, got {text!r}") from None


@app.command()
def run(
    base_url: Annotated[str, typer.Option(help="The server's root URL (without /v1).")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="The base model's name: the `model` of every request when --adapters is 0.")] = "base",
    adapters: Annotated[int, typer.Option(help="Spread requests over this many adapters, named PREFIX0, PREFIX1, ...")] = 0,
    adapter_prefix: Annotated[str, typer.Option(help="Adapter name prefix.")] = "lora-",
    alpha: Annotated[float, typer.Option(help="Power-law popularity exponent: 0 uniform, 1 skewed.")] = 1.0,
    rate: Annotated[float | None, typer.Option(help="Open loop: mean requests per second.")] = None,
    cv: Annotated[float, typer.Option(help="Open loop: coefficient of variation of inter-arrival gaps (1 = Poisson).")] = 1.0,
    concurrency: Annotated[int | None, typer.Option(help="Closed loop: concurrent clients.")] = None,
    num_requests: Annotated[int, typer.Option(help="Bound: requests in the run.")] = 200,
    max_seconds: Annotated[float, typer.Option(help="Bound: seconds; requests still running then are cancelled.")] = 300.0,
    prompt_len: Annotated[str, typer.Option(help="Random prompt length range, LOW:HIGH tokens.")] = "16:128",
    output_len: Annotated[str, typer.Option(help="Output length range, LOW:HIGH tokens.")] = "16:64",
    token_ids: Annotated[str, typer.Option(help="Random prompts draw token ids from LOW:HIGH (HIGH excluded).")] = "10:256",
    prompts: Annotated[Path | None, typer.Option(help="JSONL prompts (strings or {prompt, max_tokens}) instead of random ids.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly max_tokens tokens (vLLM's ignore_eos).")] = True,
    api_key: Annotated[str | None, typer.Option(help="Bearer token.", envvar="LOADTEST_API_KEY")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 300.0,
    seed: Annotated[int, typer.Option(help="Seeds the trace.")] = 0,
    label: Annotated[str, typer.Option(help="Names the output files.")] = "run",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("loadtest-results"),
    plots: Annotated[bool, typer.Option(help="Draw PNG plots.")] = True,
) -> None:
    """One bounded run: records (JSON), summary (Markdown) and plots (PNG) in --out."""
    from loadtest.client import ClientConfig
    from loadtest.run import LoadRun, execute
    from loadtest.summary import to_markdown
    from loadtest.trace import TraceConfig

    if (rate is None) == (concurrency is None):
        raise typer.BadParameter("give exactly one of --rate (open loop) and --concurrency (closed loop)")
    try:
        trace = TraceConfig(
            num_requests=num_requests,
            adapters=tuple(f"{adapter_prefix}{index}" for index in range(adapters)),
            base_model=model,
            alpha=alpha,
            rate=rate,
            cv=cv,
            prompt_len=parse_range(prompt_len, "--prompt-len"),
            output_len=parse_range(output_len, "--output-len"),
            token_ids=parse_range(token_ids, "--token-ids"),
            prompts_file=prompts,
            seed=seed,
        )
        load = LoadRun(label, trace, ClientConfig(base_url, api_key, ignore_eos, timeout), concurrency, max_seconds, out, plots)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    summary, _ = execute(load)
    console.print(to_markdown(summary))
    console.print(f"[green]wrote[/green] {out}/")


@app.command("adapters")
def make_adapters(
    base_config: Annotated[str, typer.Option(help="The served base: model dir, config.json, inline JSON or a preset name.")],
    count: Annotated[int, typer.Option(help="Adapters to make.")] = 8,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules, or `all` for the seven projections.")] = "all",
    prefix: Annotated[str, typer.Option(help="Name prefix.")] = "lora-",
    upload: Annotated[str | None, typer.Option(help="Upload to this loraplex server (POST /v1/adapters).")] = None,
    store: Annotated[Path | None, typer.Option(help="Write into this adapter store directory instead.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Bearer token for uploads.", envvar="LOADTEST_API_KEY")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the weights.")] = 0,
) -> None:
    """Random PEFT LoRA adapters for a served base, uploaded or written to a store."""
    from loadtest.checkpoints import ALL_TARGETS
    from loadtest.provision import provision_adapters

    if (upload is None) == (store is None):
        raise typer.BadParameter("give exactly one of --upload and --store")
    target_modules = ALL_TARGETS if targets == "all" else tuple(name.strip() for name in targets.split(",") if name.strip())
    names = provision_adapters(base_config, count, rank, target_modules, prefix, store, upload, api_key, seed)
    console.print(f"[green]made {len(names)} adapters[/green]: {names[0]} ... {names[-1]}")


if __name__ == "__main__":
    app()
