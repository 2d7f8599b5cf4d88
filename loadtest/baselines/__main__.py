"""`python -m loadtest.baselines {naive,mixed}`: serve a base and every adapter under a folder through PEFT.

Owns: the command line, loading the model and the adapters, building the chosen worker and the
app, and running uvicorn until interrupted. It prints one line once the server listens.

    python -m loadtest.baselines mixed --model DIR --adapters DIR [--max-batch 32]
        [--served-model-name base] [--host 127.0.0.1] [--port 8100] [--device cpu] [--dtype float32]
"""

import argparse
import asyncio
from pathlib import Path

import torch
import uvicorn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loadtest.baselines.app import create_app
from loadtest.baselines.mixed import MixedWorker
from loadtest.baselines.naive import NaiveWorker
from loadtest.baselines.peft_model import find_adapters, load_peft, take_over_eos
from loadtest.baselines.worker import Worker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("naive", "mixed"), help="one request at a time, or static mixed batches")
    parser.add_argument("--model", type=Path, required=True, help="the base checkpoint directory")
    parser.add_argument("--adapters", type=Path, required=True, help="a folder of PEFT adapter directories")
    parser.add_argument("--max-batch", type=int, default=32, help="the most requests in one mixed batch")
    parser.add_argument("--served-model-name", default="base", help="the model name that selects the base model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    return args


def build_worker(args: argparse.Namespace) -> tuple[Worker, PreTrainedTokenizerBase]:
    """The worker over the loaded model, and the checkpoint's tokenizer.

    Args:
        args: the parsed command line.
    """
    adapter_dirs = find_adapters(args.adapters)
    if not adapter_dirs:
        raise SystemExit(f"no adapter (a directory holding adapter_config.json) under {args.adapters}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_peft(args.model, adapter_dirs, DTYPES[args.dtype], args.device)
    eos_ids = take_over_eos(model, tokenizer)
    if args.kind == "naive":
        return NaiveWorker(model, eos_ids), tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return MixedWorker(model, eos_ids, pad_id, args.max_batch), tokenizer


async def serve(server: uvicorn.Server, num_adapters: int) -> None:
    """Run `server`, printing where it listens once it does."""
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        print(f"serving {num_adapters} adapters on http://{host}:{port}", flush=True)
    await serving


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worker, tokenizer = build_worker(args)
    app = create_app(worker, tokenizer, args.served_model_name)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    asyncio.run(serve(server, len(worker.adapters)))


if __name__ == "__main__":
    main()
