"""schemathesis in this process against a live server, and the hook that keeps its valid requests valid.

`run_schemathesis` runs every phase `schemathesis run` has (examples, coverage, fuzzing,
stateful) with the schema's own config and collects what failed; `ServerRules` is a `map_case`
hook for the rules a document can only state in words.
"""

import collections
import dataclasses
import json
import zlib
from pathlib import Path

import schemathesis
from schemathesis.engine import Status, StopReason, events

from live_server import LiveServer
from loraplex.tenancy import Principal


class ServerRules:
    """A `map_case` hook: schemathesis's *valid* requests, kept within the rules the document
    states in words because no schema can, and pointed at things that exist. Invalid requests
    are sent as generated.

      - a prompt, counted in tokens (text through this server's tokenizer, chat messages through
        its chat template), plus max_tokens must fit max_model_len (what /tokenize takes, too);
      - best_of must equal n, and a completions request's prompts x n must fit the queue;
      - a merge has one weight per adapter;
      - a named tool_choice names one of the tools, and with required or a named function every
        tool's parameters is a schema the grammar library enforces (a generated dict seldom is:
        each becomes a function without arguments).
    And it points them at things that exist, which a schema cannot know: `model` names the base
    model or an adapter the server has now, a merge merges adapters it has, and every other upload
    sends a real adapter's files (the rest send generated ones). Generated names and files are
    still sent by the coverage phase and the invalid cases.
    """

    def __init__(self, server: LiveServer, base: str, adapter_dir: Path):
        engine = server.engine
        self.base = base
        self.tokenizer = engine.base.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_queue = engine.config.max_queue
        self.catalog = server.services.catalog
        self.config = json.loads((adapter_dir / "adapter_config.json").read_text())
        self.weights = (adapter_dir / "adapter_model.safetensors").read_bytes()

    def __call__(self, case):
        meta = case.meta
        if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
            return case
        body, path = case.body, case.operation.path
        draw = zlib.crc32(repr(sorted(body.items(), key=str)).encode())  # a deterministic "random" choice
        if path == "/v1/completions":
            body["model"] = self.pick([self.base, *self.adapters()], draw)
            self.fit_completion(body)
        elif path == "/v1/chat/completions":
            # An adapter's own chat template would render the messages differently: only those without one.
            body["model"] = self.pick([self.base, *self.adapters(with_template=False)], draw)
            self.fit_tools(body)
            self.fit_chat(body)
        elif path in ("/tokenize", "/detokenize"):
            if body.get("model") is not None:  # absent or null: the base model
                body["model"] = self.pick([self.base, *self.adapters(with_template=False)], draw)
            if path == "/tokenize":
                self.fit_tokenize(body)
        elif path == "/v1/adapters/merge" and self.adapters():
            body["adapters"] = [self.pick(self.adapters(), draw + i) for i in range(len(body["adapters"]))]
            body["weights"] = (body["weights"] + [1.0] * len(body["adapters"]))[: len(body["adapters"])]
        elif path == "/v1/adapters" and case.method.upper() == "POST" and draw % 2:
            body["config"], body["weights"] = dict(self.config), self.weights
        return case

    def adapters(self, with_template: bool = True) -> list[str]:
        records = self.catalog.visible_to(Principal("operators", "admin"))
        return [r.name for r in records if with_template or r.chat_template is None]

    @staticmethod
    def pick(names: list[str], draw: int) -> str:
        return names[draw % len(names)]

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def fit_completion(self, body: dict) -> None:
        prompt = body["prompt"]
        many = isinstance(prompt, list) and isinstance(prompt[0], (str, list))
        prompts = [self.shorten(p) if isinstance(p, str) else p for p in (prompt if many else [prompt])]
        body["prompt"] = prompts if many else prompts[0]
        longest = max(self.tokens(p) if isinstance(p, str) else len(p) for p in prompts)
        wanted = body.get("max_tokens", 16)  # absent is 16; null is whatever the context leaves
        if wanted is not None and longest + wanted > self.max_model_len:
            body["max_tokens"] = self.max_model_len - longest
        n = body.get("n", 1)
        if len(prompts) * n > self.max_queue:
            body["n"] = n = max(1, self.max_queue // len(prompts))
        if body.get("best_of") is not None:
            body["best_of"] = n

    def shorten(self, text: str) -> str:
        while self.tokens(text) >= self.max_model_len:
            text = text[: len(text) // 2]
        return text

    def fit_tokenize(self, body: dict) -> None:
        """A prompt or messages of at most max_model_len tokens (a prompt's own tokens are fewer still)."""
        if isinstance(body.get("prompt"), str):
            body["prompt"] = self.shorten(body["prompt"])
        elif isinstance(body.get("messages"), list):
            self.fit_chat(body)

    @staticmethod
    def fit_tools(body: dict) -> None:
        choice, tools = body.get("tool_choice"), body.get("tools")
        if not tools or not (choice == "required" or isinstance(choice, dict)):
            return
        for tool in tools:
            tool["function"]["parameters"] = {"type": "object", "properties": {}, "additionalProperties": False}
        if isinstance(choice, dict):
            choice["function"]["name"] = tools[0]["function"]["name"]

    def fit_chat(self, body: dict) -> None:
        messages = body["messages"]
        while self.rendered(body) >= self.max_model_len:
            if len(messages) > 1:
                del messages[1:]
            else:
                text = _text(messages[0].get("content"))
                messages[0]["content"] = text[: len(text) // 2]
        room = self.max_model_len - self.rendered(body)
        for field in ("max_tokens", "max_completion_tokens"):
            if body.get(field) is not None:
                body[field] = min(body[field], room)

    def rendered(self, body: dict) -> int:
        """The prompt's tokens as the server renders it (the tiny tokenizer's template)."""
        messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True)
        )
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _text(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@dataclasses.dataclass
class FuzzReport:
    problems: list[str] = dataclasses.field(default_factory=list)
    responses: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (method, path, status)
    stop_reason: StopReason | None = None
    links: int = 0  # links between operations the stateful phase followed (inferred from the document)
    seconds: float = 0.0


def run_schemathesis(schema) -> FuzzReport:
    """Every phase `schemathesis run` has (examples, coverage, fuzzing, stateful), in this process."""
    report = FuzzReport()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                if interaction.response is not None:
                    operation = recorder.cases[case_id].value.operation
                    report.responses[(operation.method.upper(), operation.path, interaction.response.status_code)] += 1
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE:
                        info = check.failure_info
                        report.problems.append(
                            f"[{recorder.label}] {check.name}: {info.failure.title}\n{info.failure.message}\n{info.code_sample}"
                        )
        elif isinstance(event, events.PhaseStarted) and event.payload is not None:
            report.links = event.payload.transitions_selected
        elif isinstance(event, events.NonFatalError):
            report.problems.append(f"[{event.label}] error: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            report.problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            report.stop_reason, report.seconds = event.stop_reason, event.running_time
            report.problems.extend(f"after the run: {failure.title}: {failure.message}" for failure in event.failures)
    return report
