"""The load generator against a live loraplex server on 127.0.0.1: a short smoke run of each mode.

`python -m loadtest` is driven through its command line (typer's runner, in this process), with
random adapters it made and uploaded itself. Nothing here asserts a wall-clock budget: runs are
checked for what they recorded (the time bound against the run's own pace), and cross-checked
against the server's own counters.
"""

import json

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from live_server import LiveServer, server_config
from loadtest.__main__ import app
from loadtest.provision import provision_adapters

RANDOM_ADAPTERS = 3
PROMPT = [17, 42, 99, 5, 130, 64]


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("store"), max_loras=2)
    with LiveServer(config) as live:
        provision_adapters(str(llama.model_dir), RANDOM_ADAPTERS, rank=4, upload_url=live.url)
        yield live


def generated_tokens(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "loraplex_generation_tokens_total":
                return sample.value
    raise KeyError("loraplex_generation_tokens_total")


def loadtest(*args: str) -> None:
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output


def records(path) -> tuple[dict, list[dict]]:
    document = json.loads(path.read_text())
    return document["run"], document["requests"]


def test_made_adapters_are_peft_adapters_the_server_serves_like_peft(server, llama, tokenizer, tmp_path):
    store = tmp_path / "made"
    provision_adapters(str(llama.model_dir), 1, rank=4, prefix="check-", store=store, seed=0)
    base = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, store / "check-0").eval()
    peft.generation_config.eos_token_id = None
    with torch.no_grad():
        want = peft.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0, len(PROMPT) :]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    # lora-0 was uploaded by the fixture from the same seed: the same weights as check-0.
    got = client.completions.create(model="lora-0", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 6
    assert got.choices[0].text == tokenizer.decode(want.tolist(), skip_special_tokens=True)


def test_a_closed_loop_run_records_every_request_and_matches_the_servers_counters(server, tmp_path):
    before = generated_tokens(server.url)
    loadtest(
        "--base-url", server.url, "--adapters", str(RANDOM_ADAPTERS), "--alpha", "1", "--concurrency", "4",
        "--num-requests", "12", "--prompt-len", "4:12", "--output-len", "3:6", "--out", str(tmp_path), "--label", "smoke",
    )  # fmt: skip
    run, requests = records(tmp_path / "smoke.json")
    assert (run["mode"], run["concurrency"], run["num_adapters"]) == ("closed", 4, RANDOM_ADAPTERS)
    assert len(requests) == 12 and {r["status"] for r in requests} == {"ok"}
    assert all(r["output_tokens"] == r["max_tokens"] for r in requests)
    assert all(0 < r["ttft"] <= r["latency"] for r in requests)
    assert all(len(r["itl"]) <= r["output_tokens"] - 1 for r in requests)
    assert {r["adapter"] for r in requests} <= {f"lora-{i}" for i in range(RANDOM_ADAPTERS)}
    assert generated_tokens(server.url) - before == sum(r["output_tokens"] for r in requests)
    summary = (tmp_path / "smoke.md").read_text()
    assert "smoke" in summary and "TTFT" in summary
    pngs = sorted(tmp_path.glob("smoke-*.png"))
    assert len(pngs) == 4 and all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)


def test_an_open_loop_run_stops_at_its_time_bound_and_cancels_what_still_runs(server, tmp_path):
    bound = 2.0
    loadtest(
        "--base-url", server.url, "--model", "tiny-base", "--rate", "40", "--num-requests", "1000",
        "--max-seconds", str(bound), "--prompt-len", "4:8", "--output-len", "200:240", "--out", str(tmp_path),
        "--label", "bounded", "--no-plots",
    )  # fmt: skip
    run, requests = records(tmp_path / "bounded.json")
    assert run["mode"] == "open" and 0 < len(requests) < 1000  # the trace is 25 s long: the bound stopped it
    assert {r["adapter"] for r in requests} == {"tiny-base"}
    assert all(r["sent"] < bound for r in requests)  # checked on the very clock reading recorded as `sent`
    assert {r["status"] for r in requests} <= {"ok", "cancelled"}
    cancelled = [r for r in requests if r["status"] == "cancelled"]
    assert cancelled and all(r["latency"] is None for r in cancelled)
    # Waiting for them instead would take a step per token one still owed, at this run's pace.
    gaps = [gap for r in requests for gap in r["itl"]]
    assert gaps, "no request streamed a second token before the bound"
    step = sum(gaps) / len(gaps)
    finishing = max(r["max_tokens"] - (r["ttft"] is not None) - len(r["itl"]) for r in cancelled) * step
    assert run["duration"] < bound + finishing / 2


def test_refused_requests_are_recorded_with_the_servers_status_and_message(server, tmp_path):
    loadtest(
        "--base-url", server.url, "--adapters", "2", "--adapter-prefix", "missing-", "--concurrency", "2",
        "--num-requests", "4", "--out", str(tmp_path), "--label", "refused", "--no-plots",
    )  # fmt: skip
    _, requests = records(tmp_path / "refused.json")
    assert {r["status"] for r in requests} == {"http_404"}
    assert all("does not exist" in r["error"] for r in requests)
    assert "http_404" in (tmp_path / "refused.md").read_text()


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--concurrency", "2", "--rate", "3"], "exactly one of"),
        ([], "exactly one of"),
        (["--concurrency", "2", "--prompt-len", "a:b"], "LOW:HIGH"),
    ],
)
def test_contradictory_options_are_refused_before_anything_is_sent(args, problem, tmp_path):
    result = CliRunner().invoke(app, ["run", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert problem in result.output
