"""The PEFT baseline servers (`python -m loadtest.baselines`), driven over HTTP as the load generator drives them.

Their greedy text must be exactly PEFT's own one-at-a-time `generate` (the oracle), the mixed server
must really batch concurrent requests, and bad requests must be refused before they reach PEFT, so
that a later mixed batch is still routed right (peft#3475). No timing is asserted.
"""

import json
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import PeftOracle, TinySetup
from loadtest.baselines.app import create_app
from loadtest.baselines.mixed import MixedWorker
from loadtest.baselines.peft_model import generate_streaming, load_peft, remove_stale_routing_hooks, take_over_eos
from loadtest.baselines.request import Request, RowLimits
from loadtest.checkpoints import make_adapters
from test_serve_process import STARTUP_SECONDS
from tiny import make_adapter, make_model

BASE = "tiny-base"
# Adapters whose outputs differ from the base and from each other; 61 more make it 64 in all.
SHARP = {
    "sharp-qv": dict(rank=4, seed=1),
    "sharp-attn": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2),
    "sharp-mlp": dict(rank=8, targets=("gate_proj", "up_proj", "down_proj"), seed=3),
}
NUM_ADAPTERS = 64
MAX_POSITIONS = 64
PROMPTS = [[5, 17, 99, 42, 8], [120, 7, 7, 64], [33, 200, 14, 90, 91, 3, 250]]
EOS_PROMPT = [40, 41, 42]
REPO = Path(__file__).resolve().parents[1]


def made_eos_token(model_dir: Path) -> int:
    """Make a token the base greedily generates for EOS_PROMPT a few steps in the model's EOS."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    inputs = torch.tensor([EOS_PROMPT])
    with torch.no_grad():
        tokens = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, do_sample=False)
    generated = tokens[0, len(EOS_PROMPT) :].tolist()
    stop = next(t for i, t in enumerate(generated) if i >= 2 and t not in generated[:i])
    config = GenerationConfig.from_pretrained(model_dir)
    config.eos_token_id = stop
    config.save_pretrained(model_dir)
    return stop


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> TinySetup:
    """A tiny llama (EOS: see `made_eos_token`) with 64 adapters in one folder, three of them sharp."""
    root = tmp_path_factory.mktemp("baselines")
    model_dir = make_model(root / "base", "llama", seed=11, max_position_embeddings=MAX_POSITIONS)
    adapters = root / "adapters"
    sharp = {name: make_adapter(model_dir, adapters / name, **spec) for name, spec in SHARP.items()}
    make_adapters(model_dir, adapters, NUM_ADAPTERS - len(SHARP), rank=4)
    made_eos_token(model_dir)
    return TinySetup(model_dir, sharp)


@pytest.fixture(scope="module")
def oracle(checkpoint) -> PeftOracle:
    return PeftOracle(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint.model_dir)


def expected_text(oracle, tokenizer, prompt, adapter, max_tokens) -> str:
    tokens, _ = oracle.generate(prompt, adapter, max_tokens)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def stream(url: str, **body) -> list:
    """POST a streamed completion; every SSE payload, parsed (`"[DONE]"` kept as is)."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={"stream": True, **body}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(choice["text"] for event in events[:-1] for choice in event["choices"])


@pytest.fixture(scope="module")
def naive_url(checkpoint):
    """`python -m loadtest.baselines naive` as a process on a free port, until the module ends."""
    args = ["naive", "--model", str(checkpoint.model_dir), "--adapters", str(checkpoint.model_dir.parent / "adapters")]
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.baselines", *args, "--port", "0", "--served-model-name", BASE],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        ready = lines.get(timeout=STARTUP_SECONDS)  # it loads 64 adapters into PEFT first
        assert ready.startswith(f"serving {NUM_ADAPTERS} adapters on http://127.0.0.1:")
        yield ready.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=30)


class Serving:
    """The mixed server in this process (uvicorn on a free port, in a thread), so tests can see its worker."""

    def __init__(self, checkpoint: TinySetup, max_batch: int):
        adapters = checkpoint.model_dir.parent / "adapters"
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.model_dir)
        model = load_peft(checkpoint.model_dir, {p.name: p for p in sorted(adapters.iterdir())})
        self.worker = MixedWorker(model, take_over_eos(model, tokenizer), tokenizer.pad_token_id, max_batch)
        app = create_app(self.worker, tokenizer, BASE)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the mixed server did not start")
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for(condition, failure: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


@pytest.fixture(scope="module")
def mixed(checkpoint):
    serving = Serving(checkpoint, max_batch=8)
    yield serving
    serving.close()


class Gate(Request):
    """A base-model request whose first token holds the worker's thread until `open`; others queue meanwhile."""

    def __init__(self, worker):
        super().__init__([5, 6], None, 2, True, worker.eos_ids, loop=None)
        self.opened = threading.Event()

    def _post(self, event) -> None:
        self.opened.wait(timeout=120)


def in_one_batch(serving: Serving, bodies: list[dict]) -> list[list]:
    """Stream `bodies` concurrently while the worker is held, so that they all wait for the same batch."""
    gate = Gate(serving.worker)
    serving.worker.submit(gate)
    wait_for(lambda: gate.num_generated == 1, "the worker did not take the gate")
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        futures = [pool.submit(stream, serving.url, **body) for body in bodies]
        wait_for(lambda: serving.worker.num_waiting == len(bodies), "the requests did not queue")
        gate.opened.set()
        return [future.result() for future in futures]


def test_the_sharp_adapters_change_the_output(oracle, tokenizer):
    texts = {adapter: expected_text(oracle, tokenizer, PROMPTS[0], adapter, 8) for adapter in [None, *SHARP]}
    assert len(set(texts.values())) == len(texts)


@pytest.mark.parametrize("adapter", [None, *SHARP])
def test_naive_stream_is_pefts_greedy_text_token_by_token(naive_url, oracle, tokenizer, adapter):
    for prompt, max_tokens in zip(PROMPTS, (8, 5, 12), strict=True):
        events = stream(
            naive_url,
            model=adapter or BASE,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        assert events[-1] == "[DONE]"
        *tokens, final, usage = events[:-1]
        assert len(tokens) == max_tokens
        assert [event["choices"][0]["finish_reason"] for event in tokens] == [None] * max_tokens
        assert final["choices"][0]["finish_reason"] == "length"
        assert usage["choices"] == []
        assert usage["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens, "total_tokens": len(prompt) + max_tokens}
        assert streamed_text(events) == expected_text(oracle, tokenizer, prompt, adapter, max_tokens)
        assert {event["model"] for event in events[:-1]} == {adapter or BASE}


def test_naive_serves_text_prompts_through_the_openai_client(naive_url, oracle, tokenizer):
    client = openai.OpenAI(base_url=naive_url + "/v1", api_key="x", max_retries=0)
    text = "the quick brown fox"
    response = client.completions.create(model="sharp-attn", prompt=text, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    prompt = tokenizer(text)["input_ids"]
    assert response.choices[0].text == expected_text(oracle, tokenizer, prompt, "sharp-attn", 6)
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 6
    assert {model.id for model in client.models.list()} == {BASE, *SHARP, *(f"lora-{i}" for i in range(61))}
    assert httpx.get(naive_url + "/health").status_code == 200


def test_the_openai_client_reads_the_stream_and_its_usage(naive_url, oracle, tokenizer):
    client = openai.OpenAI(base_url=naive_url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        client.completions.create(
            model="sharp-mlp",
            prompt=PROMPTS[1],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == expected_text(oracle, tokenizer, PROMPTS[1], "sharp-mlp", 5)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_mixed_batch_gives_each_request_its_one_at_a_time_text(mixed, oracle, tokenizer):
    jobs = [
        (None, PROMPTS[0], 6),
        ("sharp-qv", PROMPTS[1], 9),
        ("sharp-attn", PROMPTS[2], 3),
        ("sharp-mlp", PROMPTS[0], 12),
        (None, PROMPTS[2], 1),
        ("sharp-qv", PROMPTS[0], 7),
    ]
    bodies = [
        dict(model=adapter or BASE, prompt=prompt, max_tokens=n, ignore_eos=True, stream_options={"include_usage": True})
        for adapter, prompt, n in jobs
    ]
    before = mixed.worker.batch_sizes[len(jobs)]
    results = in_one_batch(mixed, bodies)
    assert mixed.worker.batch_sizes[len(jobs)] == before + 1
    for (adapter, prompt, max_tokens), events in zip(jobs, results, strict=True):
        assert streamed_text(events) == expected_text(oracle, tokenizer, prompt, adapter, max_tokens), adapter
        assert events[-2]["usage"]["completion_tokens"] == max_tokens
        assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_mixed_rows_stop_at_eos_unless_they_ignore_it(mixed, oracle, tokenizer):
    tokens, _ = oracle.generate(EOS_PROMPT, None, 12)
    stop_at = next(i for i, token in enumerate(tokens) if token in mixed.worker.eos_ids)
    body = dict(model=BASE, prompt=EOS_PROMPT, max_tokens=12, stream_options={"include_usage": True})
    stopping, ignoring = in_one_batch(mixed, [body, {**body, "ignore_eos": True}])
    assert streamed_text(stopping) == tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)
    assert stopping[-3]["choices"][0]["finish_reason"] == "stop"
    assert stopping[-2]["usage"]["completion_tokens"] == stop_at + 1
    assert streamed_text(ignoring) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert ignoring[-3]["choices"][0]["finish_reason"] == "length"


BAD_BODIES = [
    ({"model": "no-such-adapter", "prompt": [5, 6]}, 404, "model"),
    ({"model": BASE, "prompt": [5, 6], "temperature": 0.7}, 400, "temperature"),
    ({"model": BASE}, 400, "prompt"),
    ({"model": BASE, "prompt": []}, 400, "prompt"),
    ({"model": BASE, "prompt": ""}, 400, "prompt"),
    ({"model": BASE, "prompt": [5, 100_000]}, 400, "prompt"),
    ({"model": BASE, "prompt": [5, -1]}, 400, "prompt"),
    ({"model": BASE, "prompt": ["t5", "t6"]}, 400, "prompt"),
    ({"model": BASE, "prompt": [5] * MAX_POSITIONS}, 400, "prompt"),
    ({"model": BASE, "prompt": [5, 6], "max_tokens": MAX_POSITIONS}, 400, "max_tokens"),
    ({"model": BASE, "prompt": [5, 6], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": BASE, "prompt": [5, 6], "n": 2}, 400, "n"),
    ({"model": BASE, "prompt": [5, 6], "logprobs": 1}, 400, "logprobs"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_requests_are_refused_in_openais_error_shape(mixed, body, status, param):
    response = httpx.post(mixed.url + "/v1/completions", json={"stream": True, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_a_400(mixed):
    response = httpx.post(mixed.url + "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_mixed_batches_route_right_after_refused_requests(mixed, oracle, tokenizer):
    for body, status, _ in BAD_BODIES:
        assert httpx.post(mixed.url + "/v1/completions", json=body).status_code == status
    jobs = [("sharp-mlp", PROMPTS[1]), (None, PROMPTS[1]), ("sharp-qv", PROMPTS[2])]
    results = in_one_batch(mixed, [dict(model=a or BASE, prompt=p, max_tokens=6, ignore_eos=True) for a, p in jobs])
    for (adapter, prompt), events in zip(jobs, results, strict=True):
        assert streamed_text(events) == expected_text(oracle, tokenizer, prompt, adapter, 6), adapter


def test_a_client_leaving_mid_stream_harms_no_one(mixed, oracle, tokenizer):
    body = {"model": "sharp-qv", "prompt": PROMPTS[0], "max_tokens": 30, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", mixed.url + "/v1/completions", json=body, timeout=120) as response:
        next(response.iter_lines())
    response = httpx.post(mixed.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=120)
    assert response.json()["choices"][0]["text"] == expected_text(oracle, tokenizer, PROMPTS[0], "sharp-qv", 5)


def test_a_failed_mixed_generate_leaves_peft_routing_right(checkpoint, oracle):
    """peft#3475: PEFT leaves its `adapter_names` hooks behind when a mixed-batch call raises."""
    model = load_peft(checkpoint.model_dir, checkpoint.adapter_dirs)
    model.generation_config.eos_token_id = None
    expected, _ = oracle.generate(PROMPTS[0], "sharp-qv", 4)
    out_of_vocab = torch.tensor([[5, 100_000]])
    with pytest.raises(IndexError), torch.no_grad():
        model.generate(input_ids=out_of_vocab, adapter_names=["sharp-mlp"], max_new_tokens=2)
    assert remove_stale_routing_hooks(model) > 0  # the bug is there: PEFT left its hooks behind

    with pytest.raises(IndexError):
        request = Request([5, 100_000], "sharp-mlp", 2, True, frozenset(), loop=None)
        generate_streaming(
            model,
            out_of_vocab,
            torch.ones_like(out_of_vocab),
            RowLimits([request], 2, model.device),
            2,
            on_step=lambda tokens: None,
            adapter_names=["sharp-mlp"],
        )
    assert remove_stale_routing_hooks(model) == 0  # generate_streaming removed them itself
    model.set_adapter("sharp-qv")
    inputs = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        tokens = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=4, do_sample=False)
    assert tokens[0, len(PROMPTS[0]) :].tolist() == expected
