"""Hostile adapter uploads: each is refused before anything is stored, naming its problem.

The server of tests/hostile.py takes every upload in the table, built from a real PEFT adapter
with one thing changed: a config number beyond what the engine can hold, a config field that
changes what the adapter computes, a regex that backtracks, a template that never ends, weights
that overflow once scaled. After each one, the store and the adapter list are as they were, the
same name uploads cleanly at once (nothing was half-committed), and no tenant's answer changed.
"""

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hostile import ACME, assert_unharmed, hostile_server
from live_server import LiveServer, server_config, upload
from tiny import make_adapter

BACKTRACKS = "(?:.*?){20}(?!)"  # catastrophic for a backtracking engine on any module name
SPEC = "r4-qv"  # rank 4 on q_proj and v_proj of both layers


@dataclass(frozen=True)
class BadUpload:
    """A real adapter with its config fields replaced, its tensors edited, or its form changed."""

    id: str
    config: dict = field(default_factory=dict)
    config_text: str | None = None  # the whole adapter_config.json, for what json.dumps will not write
    tensors: Callable[[dict], None] | None = None
    form: list[tuple[str, str]] = field(default_factory=list)  # extra (field, value) pairs
    status: int = 422
    keyword: str = ""
    name: str | bytes | None = None  # instead of the test's name (bytes: sent raw, as a form part)

    def send(self, client: httpx.Client, adapter_dir, name: str) -> httpx.Response:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config_bytes = (self.config_text or json.dumps({**config, **self.config})).encode()
        weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
        if self.tensors is not None:
            tensors = load_tensors(weights)
            self.tensors(tensors)
            weights = save_tensors(tensors)
        files = [
            ("config", ("adapter_config.json", io.BytesIO(config_bytes))),
            ("weights", ("adapter_model.safetensors", io.BytesIO(weights))),
        ]
        if isinstance(self.name, bytes):
            files.append(("name", (None, io.BytesIO(self.name))))
        data: dict[str, list[str]] = {}
        named = [] if isinstance(self.name, bytes) else [("name", self.name or name)]
        for key, value in [*named, *self.form]:  # a field given twice is sent twice
            data.setdefault(key, []).append(value)
        return client.post("/v1/adapters", files=files, data=data)


def scale_first(which: str, factor: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        key = next(k for k in sorted(tensors) if f"lora_{which}" in k)
        tensors[key] = tensors[key] * factor

    return edit


def set_first(which: str, value: float, dtype: torch.dtype | None = None) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        key = next(k for k in sorted(tensors) if f"lora_{which}" in k)
        tensor = tensors[key].clone()
        tensor[0, 0] = value
        tensors[key] = tensor if dtype is None else tensor.to(dtype)

    return edit


def duplicate_a_module(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key.replace(".lora_A.weight", ".lora_A.default.weight")] = tensors[key].clone()


def nested(depth: int) -> str:
    return '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "x": ' + "[" * depth + "]" * depth + "}"


CONFIG_NUMBERS = [
    BadUpload("alpha-nan", config_text=None, config={"lora_alpha": float("nan")}, keyword="lora_alpha"),
    BadUpload("alpha-infinity", config={"lora_alpha": float("inf")}, keyword="lora_alpha"),
    BadUpload("alpha-1e300", config={"lora_alpha": 1e300}, keyword="lora_alpha"),
    BadUpload("alpha-overflows-once-scaled", config={"lora_alpha": 1e6}, keyword="scaled by"),
    BadUpload("alpha-negative", config={"lora_alpha": -8}, keyword="lora_alpha"),
    BadUpload("r-fractional", config={"r": 4.5}, keyword="r must be a positive integer"),
    BadUpload("r-a-string", config={"r": "4"}, keyword="r must be a positive integer"),
    BadUpload("r-true", config={"r": True}, keyword="r must be a positive integer"),
    BadUpload("r-2^70", config={"r": 2**70}, keyword="r must be a positive integer"),
    BadUpload("rank-pattern-nan", config={"rank_pattern": {"q_proj": float("nan")}}, keyword="rank_pattern"),
    BadUpload("alpha-pattern-1e300", config={"alpha_pattern": {"q_proj": 1e300}}, keyword="alpha_pattern"),
    BadUpload("use-rslora-a-string", config={"use_rslora": "yes"}, keyword="use_rslora"),
    BadUpload("layers-to-transform-a-string", config={"layers_to_transform": "all"}, keyword="layers_to_transform"),
    BadUpload("layers-to-transform-2^70", config={"layers_to_transform": [2**70]}, keyword="layers_to_transform"),
]

CONFIG_SEMANTICS = [
    BadUpload("layers-to-transform-excludes-a-tensor", config={"layers_to_transform": [0]}, keyword="layers_to_transform"),
    BadUpload("layers-pattern-matches-no-layer", config={"layers_to_transform": [0, 1], "layers_pattern": "blocks"},
              keyword="do not select"),  # fmt: skip
    BadUpload("target-modules-leave-out-a-tensor", config={"target_modules": ["v_proj"]}, keyword="do not select"),
    BadUpload("exclude-modules-cover-a-tensor", config={"exclude_modules": ["q_proj"]}, keyword="do not select"),
    BadUpload("dora", config={"use_dora": True}, keyword="DoRA"),
    BadUpload("pissa-init", config={"init_lora_weights": "pissa"}, keyword="rewrites the base weights"),
    BadUpload("activated-lora", config={"alora_invocation_tokens": [1, 2]}, keyword="alora_invocation_tokens"),
    BadUpload("layer-replication", config={"layer_replication": [[0, 2]]}, keyword="layer_replication"),
    BadUpload("target-parameters", config={"target_parameters": ["weight"]}, keyword="target_parameters"),
    BadUpload("qalora", config={"use_qalora": True}, keyword="QALoRA"),
]

UNBOUNDED_WORK = [
    BadUpload("rank-pattern-backtracks", config={"rank_pattern": {BACKTRACKS: 4}}, keyword="take more than"),
    BadUpload("target-modules-regex-backtracks", config={"target_modules": BACKTRACKS}, keyword="take more than"),
    BadUpload("rank-pattern-not-a-regex", config={"rank_pattern": {"q_proj[": 4}}, keyword="not a valid regular expression"),
    BadUpload("rank-pattern-key-too-long", config={"rank_pattern": {"q" * 300: 4}}, keyword="longer than"),
    BadUpload("config-nested-50-deep", config_text=nested(50), status=400, keyword="nested"),
    BadUpload("config-nested-100000-deep", config_text=nested(100000), status=400, keyword="nested"),
    BadUpload("template-divides-by-zero", form=[("chat_template", "{{ 1/0 }}")], keyword="ZeroDivisionError"),
    BadUpload("template-never-ends", keyword="longer than",
              form=[("chat_template", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")]),
    BadUpload("template-allocates-a-gigabyte", form=[("chat_template", "{{ 'x' * 10**9 }}")], keyword="chat template"),
    BadUpload("template-too-long", form=[("chat_template", "{{ messages }}" * 30000)], keyword="chat template"),
]  # fmt: skip

WEIGHTS = [
    BadUpload("a-nan", tensors=set_first("A", float("nan")), keyword="non-finite"),
    BadUpload("b-infinity", tensors=set_first("B", float("inf")), keyword="non-finite"),
    BadUpload("b-overflows-float32-once-scaled", tensors=scale_first("B", 2.5e38), keyword="non-finite values once scaled"),
    BadUpload("a-huge", tensors=scale_first("A", 1e6), keyword="reaches"),
    BadUpload("a-integers", tensors=lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "lora_A" in k}),
              keyword="float dtype"),  # fmt: skip
    BadUpload("a-module-twice", tensors=duplicate_a_module, keyword="are both lora_A"),
]

FORMS = [
    BadUpload("name-twice", form=[("name", "again")], status=400, keyword="more than once"),
    BadUpload("overwrite-twice", form=[("overwrite", "true"), ("overwrite", "false")], status=400, keyword="more than once"),
    BadUpload("an-unknown-field", form=[("colour", "red")], status=400, keyword="colour"),
    BadUpload("overwrite-not-a-flag", form=[("overwrite", "maybe")], status=400, keyword="overwrite"),
    BadUpload("name-of-an-api-path", name="merge", status=400, keyword="reserved"),
    BadUpload("name-of-the-base-model", name="tiny-base", status=400, keyword="base model"),
    BadUpload("name-not-utf8", name=b"\xff\xfeadapter", status=400, keyword="invalid"),
    BadUpload("name-with-a-nul", name="ad\x00apter", status=400, keyword="invalid"),
    BadUpload("name-a-path", name="../escape", status=400, keyword="invalid"),
]

TABLE = [pytest.param(upload_case, id=f"{group}-{upload_case.id}") for group, cases in (
    ("numbers", CONFIG_NUMBERS), ("semantics", CONFIG_SEMANTICS), ("unbounded", UNBOUNDED_WORK), ("weights", WEIGHTS),
    ("form", FORMS),
) for upload_case in cases]  # fmt: skip


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    with hostile_server(llama, tmp_path_factory.mktemp("hostile-adapters")) as live:
        yield live


def stored(server) -> list[str]:
    return sorted(path.name for path in server.live.config.adapters.iterdir())


@pytest.mark.parametrize("bad", TABLE)
def test_a_hostile_upload_is_refused_naming_its_problem_and_nothing_is_stored(server, llama, bad):
    before = stored(server)
    with server.client(ACME) as client:
        listed = client.get("/v1/adapters").json()
        started = time.monotonic()
        response = bad.send(client, llama.adapter_dirs[SPEC], "tenant-upload")
        elapsed = time.monotonic() - started

        assert response.status_code == bad.status, response.text
        assert bad.keyword.lower() in response.json()["error"]["message"].lower(), response.text
        assert elapsed < 15, "refused in bounded time"
        assert stored(server) == before and client.get("/v1/adapters").json() == listed
        retried = upload(client, "tenant-upload", llama.adapter_dirs[SPEC])
        assert retried.status_code == 201, f"nothing was half-committed: {retried.text}"
        assert client.delete("/v1/adapters/tenant-upload").status_code == 200
    assert_unharmed(server)


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("layers-to-transform", dict(layers_to_transform=[1])),
        ("all-linear", dict(targets="all-linear")),
        ("layers-pattern", dict(layers_to_transform=[0], layers_pattern="layers")),
    ],
)
def test_adapters_that_select_their_modules_by_config_serve_exactly_what_peft_serves(
    server, llama, oracle, tmp_path, name, fields
):
    targets = fields.pop("targets", ("q_proj", "v_proj", "down_proj"))
    adapter_dir = make_adapter(llama.model_dir, tmp_path / name, rank=4, targets=targets, seed=21, **fields)
    oracle.model.load_adapter(adapter_dir, adapter_name=name)
    prompt = [17, 42, 99, 5, 130, 64]
    try:
        expected, _ = oracle.generate(prompt, name, 8)
    finally:
        oracle.model.delete_adapter(name)
    with server.client(ACME) as client:
        assert upload(client, name, adapter_dir).status_code == 201
        body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert client.delete(f"/v1/adapters/{name}").status_code == 200
    assert text == server.engine.base.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_stored_adapter_whose_patterns_backtrack_is_skipped_at_start_up_in_bounded_time(llama, tmp_path):
    """The store is re-validated at every start: the operator's bad adapter costs seconds, not the server."""
    store = tmp_path / "store"
    bad = make_adapter(llama.model_dir, store / "backtracks", rank=4, targets=("q_proj",), seed=3)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {BACKTRACKS: 4}}))
    make_adapter(llama.model_dir, store / "fine", rank=4, targets=("q_proj",), seed=4)

    started = time.monotonic()
    with LiveServer(server_config(llama.model_dir, store)) as live:
        elapsed = time.monotonic() - started
        assert dict(live.problems).keys() == {"backtracks"}
        assert "take more than" in dict(live.problems)["backtracks"]
        assert live.services.catalog.names() == ["fine"]
    assert elapsed < 60
