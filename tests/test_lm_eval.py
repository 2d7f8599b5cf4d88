"""lm-evaluation-harness against a live server, as its users run it: `local-completions`, `tokenizer_backend=remote`.

lm-eval tokenizes through the server's `/tokenizer_info`, `/tokenize` and `/detokenize` (no tokenizer
of its own), sends token-id prompts to `/v1/completions` with `echo`, and sums the continuations'
`token_logprobs`. Its per-sample loglikelihoods must equal PEFT's over the same tokens, for the base
and an adapter, and its accuracy must follow from them. The task is a local JSON file: nothing is
downloaded.
"""

import json
import shutil

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from live_server import LiveServer, server_config

DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "world"], "answer": 0},
    {"question": "name: Ada, city:", "choices": ["Paris", "42", "true"], "answer": 0},
    {"question": "hello world, multi-LoRA", "choices": ["serving", "INSERT", "lazy"], "answer": 0},
]

TASK = """task: loraplex_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(llama.adapter_dirs["r8-attn"], store / "r8-attn")
    with LiveServer(server_config(llama.model_dir, store)) as live:
        yield live


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (root / "loraplex_choices.yaml").write_text(TASK.format(data=data))
    return TaskManager(include_path=str(root))


def peft_loglikelihood(oracle, tokenizer, adapter: str | None, context: str, continuation: str) -> float:
    """What the continuation's tokens score after the context's, as lm-eval splits them (no special tokens;
    the choice follows the task's default target delimiter, one space)."""
    continuation = " " + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return sum(oracle.prompt_logprobs(whole, adapter)[context_len - 1 :])


@pytest.mark.parametrize("model", ["tiny-base", "r8-attn"])
def test_lm_eval_local_completions_with_the_remote_tokenizer_scores_as_peft(server, tasks, oracle, tokenizer, model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": model,
            "base_url": server.url + "/v1/completions",
            "tokenizer_backend": "remote",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["loraplex_choices"],
        task_manager=tasks,
        log_samples=True,
    )
    samples = results["samples"]["loraplex_choices"]
    assert len(samples) == len(DOCS)
    adapter = None if model == "tiny-base" else model
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        got = [resp[0][0] for resp in sample["resps"]]
        expected = [peft_loglikelihood(oracle, tokenizer, adapter, doc["question"], choice) for choice in doc["choices"]]
        assert got == pytest.approx(expected, abs=1e-4)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    assert results["results"]["loraplex_choices"]["acc,none"] == pytest.approx(correct / len(DOCS))
