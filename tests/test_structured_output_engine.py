"""Structured outputs in the engine: constrained requests sample only what their grammar allows.

The oracle is PEFT's model, run on each request alone: each step it masks the logits with
llguidance's byte-per-token mask of the same grammar (`compute_logit_bias`, a path independent of
the engine's packed bitmask) and takes the argmax. In float32 a constrained greedy request must
give the oracle's tokens exactly, whatever shares its batch (the base, several adapters,
unconstrained requests).
"""

import json
import re
import threading
import time

import jsonschema
import llguidance
import pytest
import torch
from transformers import AutoTokenizer

from conftest import PeftOracle
from loraplex.api.structured_output import grammar_for_choice, grammar_for_lark, grammar_for_regex, grammar_for_schema
from loraplex.engine.grammar import grammar_tokenizer
from loraplex.engine.request import Completion, FinishReason, SamplingParams
from loraplex.engine.sampling import apply_token_bitmask
from loraplex.engine.wire import params_from_wire, params_to_wire
from loraplex.errors import RequestInvalid
from test_engine_matches_peft import make_engine, prompt_of
from tiny import VOCAB_SIZE

MAX_NEW = 24
MAX_STEPS = 2_000  # bound on the steps a test here runs
EOS = 1  # the tiny tokenizer's </s>

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
GRAMMARS = {
    "schema": grammar_for_schema(SCHEMA, "schema"),
    "object": grammar_for_schema({"type": "object"}, "schema"),
    "choice": grammar_for_choice(["yes", "no", "maybe"], "choice"),
    "lark": grammar_for_lark('start: "SELECT " /[a-z]{1,6}/ " FROM t"', "grammar"),
    "regex-digits": grammar_for_regex("[0-9]{2,5}", "regex"),
}

# (adapter, prompt length, grammar name or None for unconstrained)
MIXED = [
    (None, 5, "schema"),
    ("r4-qv", 9, "schema"),
    ("r8-attn", 3, "choice"),
    (None, 12, None),
    ("r16-mlp", 7, "lark"),
    ("r8-all-rslora", 4, "object"),
    ("r4-qv", 6, None),
    ("r4-patterns", 11, "regex-digits"),
]


@pytest.fixture(scope="module")
def hf_tokenizer(llama):
    return AutoTokenizer.from_pretrained(llama.model_dir)


@pytest.fixture(scope="module")
def ll_tokenizer(hf_tokenizer):
    return grammar_tokenizer(hf_tokenizer, {EOS})


@pytest.fixture(scope="module")
def peft(llama) -> PeftOracle:
    return PeftOracle(llama)


def masked_greedy(peft: PeftOracle, ll_tokenizer, prompt: list[int], adapter: str | None, grammar: str) -> list[int]:
    """The oracle: PEFT's logits of the whole sequence each step, masked by the grammar, argmaxed."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    tokens: list[int] = []
    model = peft.model
    for _ in range(MAX_NEW):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0, -1].float()
            else:
                model.set_adapter(adapter)
                logits = model(input_ids=ids).logits[0, -1].float()
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8) != 0  # [V_tok]
        vocab = logits.shape[0]
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[: min(vocab, allowed.shape[0])] = allowed[:vocab]
        token = int(logits.masked_fill(~keep, float("-inf")).argmax())
        assert matcher.consume_token(token)
        tokens.append(token)
        if token == EOS or matcher.is_stopped():
            break
    return tokens


def params_of(grammar: str | None, max_tokens: int = MAX_NEW) -> SamplingParams:
    if grammar is None:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0, grammar=GRAMMARS[grammar])


def test_constrained_greedy_equals_masked_peft_in_a_mixed_batch(llama, peft, ll_tokenizer):
    """The base and four adapters, constrained by five grammars, with unconstrained requests, in one batch."""
    engine = make_engine(llama)
    prompts = [prompt_of(length, 400 + seed) for seed, (_, length, _) in enumerate(MIXED)]
    completions = engine.generate(prompts, [a for a, _, _ in MIXED], [params_of(g) for _, _, g in MIXED])
    for (adapter, _, grammar), prompt, completion in zip(MIXED, prompts, completions, strict=True):
        if grammar is None:
            expected, _ = peft.generate(prompt, adapter, MAX_NEW)
        else:
            expected = masked_greedy(peft, ll_tokenizer, prompt, adapter, GRAMMARS[grammar])
        assert completion.output_ids == expected, f"{adapter} / {grammar}: tokens differ from the masked oracle"


def test_complete_grammars_end_with_stop_and_satisfy_their_grammar(llama):
    engine = make_engine(llama)
    names = ["schema", "choice", "lark", "regex-digits"]
    completions = engine.generate([prompt_of(5, 500 + i) for i in range(4)], None, [params_of(n, 64) for n in names])
    by_name = dict(zip(names, completions))
    for completion in completions:
        assert completion.finish_reason is FinishReason.STOP
    jsonschema.validate(json.loads(by_name["schema"].text), SCHEMA)
    assert by_name["choice"].text in {"yes", "no", "maybe"}
    assert re.fullmatch(r"SELECT [a-z]{1,6} FROM t", by_name["lark"].text)
    assert re.fullmatch(r"[0-9]{2,5}", by_name["regex-digits"].text.removesuffix("</s>"))


def test_eos_is_allowed_only_where_the_grammar_accepts(llama):
    """A +100 bias on EOS ends the output at the grammar's first accepting point, never before it."""
    engine = make_engine(llama)
    params = SamplingParams(
        max_tokens=MAX_NEW, temperature=0, grammar=GRAMMARS["regex-digits"], logit_bias={EOS: 100.0}
    )
    (completion,) = engine.generate([prompt_of(6, 7)], None, params)
    assert completion.output_ids[-1] == EOS
    assert re.fullmatch(r"[0-9]{2,5}", completion.text)
    assert len(completion.text) <= 3  # the first token that reaches two digits is followed by EOS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_requests_with_penalties_and_bias_still_satisfy_the_schema(llama, seed):
    engine = make_engine(llama)
    params = SamplingParams(
        max_tokens=64, temperature=1.5, seed=seed, presence_penalty=1.0, repetition_penalty=1.3,
        logit_bias={5: 50.0, 40: -100.0}, top_p=0.9, grammar=GRAMMARS["schema"],
    )  # fmt: skip
    completions = engine.generate([prompt_of(4, 600 + seed)] * 2, [None, "r8-attn"], params)
    for completion in completions:
        assert completion.finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_preemption_keeps_each_matcher_in_step_with_its_output(llama):
    """A KV cache too small for every request forces recompute; constrained outputs do not change."""
    requests = [(None, 9, "schema"), ("r4-qv", 12, "lark"), ("r8-attn", 10, "schema"), (None, 11, "object")]
    prompts = [prompt_of(length, 700 + seed) for seed, (_, length, _) in enumerate(requests)]
    adapters = [a for a, _, _ in requests]
    params = [params_of(g) for _, _, g in requests]
    alone = [make_engine(llama).generate([p], [a], [q])[0] for p, a, q in zip(prompts, adapters, params)]
    engine = make_engine(llama, num_kv_blocks=6, block_size=8, max_num_seqs=4)
    together = engine.generate(prompts, adapters, params)
    assert engine.scheduler.num_preemptions > 0
    assert [c.output_ids for c in together] == [c.output_ids for c in alone]


def test_a_grammar_that_cannot_be_built_fails_its_request_alone(llama):
    engine = make_engine(llama)
    events: dict[str, list] = {"bad": [], "good": []}
    bad = SamplingParams(max_tokens=8, temperature=0, grammar='start: "a" undefined_rule')
    engine.add_request(prompt_of(5, 1), None, bad, sink=events["bad"].append)
    engine.add_request(prompt_of(5, 2), "r4-qv", params_of("choice"), sink=events["good"].append)
    for _ in range(200):  # steps, each waiting at most 0.05 s for a matcher's build
        if not engine.step():
            if not engine.has_work():
                break
            engine._wake.wait(0.05)
            engine._wake.clear()
    last = events["bad"][-1]
    assert last.finish_reason is FinishReason.ERROR and last.error_type == "RequestInvalid"
    assert "undefined_rule" in last.error and "grammar" in last.error
    good = Completion.from_events(events["good"], [])
    assert good.finish_reason is FinishReason.STOP and good.text in {"yes", "no", "maybe"}


def test_matchers_are_freed_at_finish_and_on_cancel(llama):
    engine = make_engine(llama)
    events: list = []
    cancelled = engine.add_request(prompt_of(5, 3), None, params_of("schema"), sink=events.append)
    engine.cancel(cancelled)
    engine.generate([prompt_of(5, 4)], None, params_of("choice"))
    assert events[-1].finish_reason is FinishReason.ABORT
    assert engine.grammars.pending == 0
    assert not engine._live and not engine.scheduler.has_work()


def test_a_request_waiting_for_its_matcher_counts_as_waiting(llama):
    """Metrics and /health see a constrained request while its grammar is built, not only once it is queued."""
    engine = make_engine(llama)
    built = threading.Event()
    build = engine.grammars._matcher
    engine.grammars._matcher = lambda grammar: built.wait(60) and build(grammar)
    events: list = []
    engine.add_request(prompt_of(5, 3), None, params_of("choice"), sink=events.append)
    engine.step()  # takes the request in and starts its build, which waits
    assert engine.grammars.pending == 1 and not engine.scheduler.waiting
    assert engine.snapshot.num_waiting == 1 and engine.has_work()
    built.set()
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            break
        if not engine.step():
            time.sleep(0.01)  # the build finishes on its own thread
    assert events[-1].finish_reason is FinishReason.STOP and engine.snapshot.num_waiting == 0


def test_a_repeated_grammar_is_built_once(llama):
    engine = make_engine(llama)
    engine.generate([prompt_of(5, i) for i in range(3)], None, params_of("schema"))
    assert list(engine.grammars._templates) == [GRAMMARS["schema"]]


def test_bitmask_masks_only_constrained_rows_and_tokens_past_its_width():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 2, dtype=torch.int32)  # 64 tokens: ids 64..69 are past the mask
    bitmask[0, 0] = (1 << 3) - (1 << 31)  # tokens 3 and 31 (bit 31 is the sign bit of an int32)
    bitmask[0, 1] = 1 << 1  # token 33
    out = apply_token_bitmask(logits, torch.tensor([1]), bitmask)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed == [3, 31, 33]
    assert torch.equal(out[1, allowed], logits[1, allowed])


def test_the_grammar_crosses_the_wire_to_the_engine_process():
    params = SamplingParams(max_tokens=4, grammar=GRAMMARS["choice"], logit_bias={3: 1.0})
    assert params_from_wire(params_to_wire(params)) == params


@pytest.mark.parametrize("grammar", ["", 7, "x" * ((1 << 20) + 1)])
def test_a_grammar_must_be_a_bounded_string(grammar):
    with pytest.raises(RequestInvalid) as caught:
        SamplingParams(grammar=grammar)
    assert caught.value.param == "grammar"


def test_logprobs_of_a_constrained_request_stay_the_raw_models(llama, peft):
    """In raw_logits mode the full-vocabulary alternatives are PEFT's unmasked logits, refused tokens included."""
    engine = make_engine(llama)
    prompt = prompt_of(6, 800)
    params = SamplingParams(max_tokens=6, temperature=0, grammar=GRAMMARS["regex-digits"], logprobs=VOCAB_SIZE)
    (completion,) = engine.generate([prompt], ["r8-attn"], params)
    peft.model.set_adapter("r8-attn")
    for step, alternatives in enumerate(completion.top_logprobs):
        with torch.no_grad():
            raw = peft.model(input_ids=torch.tensor([prompt + completion.output_ids[:step]])).logits[0, -1].float()
        returned = torch.full((VOCAB_SIZE,), float("nan"))
        for token, value in alternatives:
            returned[token] = value
        assert torch.isfinite(returned).all(), "a token the grammar refuses lost its raw logit"
        assert (returned - raw).abs().max().item() <= 1e-4


def test_a_seeded_constrained_request_draws_the_same_tokens_whatever_shares_its_step(llama):
    engine = make_engine(llama)
    target = SamplingParams(max_tokens=40, temperature=1.0, seed=11, grammar=GRAMMARS["schema"])
    prompt = prompt_of(7, 900)
    (alone,) = engine.generate([prompt], ["r16-mlp"], target)
    company = [params_of("lark"), params_of(None), SamplingParams(max_tokens=30, temperature=0.8, seed=3, grammar=GRAMMARS["object"])]
    crowd = engine.generate(
        [prompt_of(5, 901), prompt_of(9, 902), prompt_of(3, 903), prompt],
        [None, "r4-qv", "r8-attn", "r16-mlp"],
        [*company, target],
    )
    assert crowd[-1].output_ids == alone.output_ids
