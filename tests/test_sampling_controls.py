"""Sampling and output controls: penalties, logit_bias, min_p, min_tokens, stop strings kept, special tokens.

The tensor functions row by row (each control alone, different values in one batch, a row with none
left bit-for-bit as it was), the engine on a tiny model, and the API through the openai SDK.
"""

import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from live_server import LiveServer, server_config
from loraplex.engine.request import FinishReason, Request, SamplingParams
from loraplex.engine.sampling import apply_controls, apply_min_p, apply_penalties, sample
from loraplex.engine.wire import params_from_wire, params_to_wire
from loraplex.errors import RequestInvalid
from test_engine_behaviour import make_engine
from test_engine_matches_peft import prompt_of

VOCAB = 8
EOS = 7


def logits_rows(n: int) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(0))


def request(params: SamplingParams, prompt=(1, 2), output=()) -> Request:
    req = Request("r", list(prompt), None, params)
    req.output_ids = list(output)
    return req


def test_a_step_with_no_controls_returns_the_logits_themselves():
    logits = logits_rows(3)
    requests = [request(SamplingParams(temperature=0)), request(SamplingParams(top_k=2)), request(SamplingParams())]
    assert apply_controls(logits, requests, {EOS}) is logits


CONTROLLED = [
    # (params, prompt, output, expected change of row: token -> new logit from old logit x and count)
    (SamplingParams(presence_penalty=0.5), (1,), (3, 3, 4), {3: lambda x: x - 0.5, 4: lambda x: x - 0.5}),
    (SamplingParams(frequency_penalty=0.25), (1,), (3, 3, 4), {3: lambda x: x - 0.5, 4: lambda x: x - 0.25}),
    (
        SamplingParams(repetition_penalty=2.0),
        (1,),
        (3,),
        {t: (lambda x: x / 2 if x > 0 else x * 2) for t in (1, 3)},
    ),
    (SamplingParams(logit_bias={5: 100.0, 2: -3.0}), (1,), (), {5: lambda x: x + 100, 2: lambda x: x - 3}),
    (SamplingParams(min_tokens=3, stop_token_ids=(6,)), (1,), (2,), {6: lambda x: -math.inf, EOS: lambda x: -math.inf}),
    (SamplingParams(min_tokens=1), (1,), (2,), {}),  # min_tokens reached: nothing masked
    (SamplingParams(min_tokens=3, ignore_eos=True), (1,), (), {}),  # EOS is not a stop: nothing masked
]


@pytest.mark.parametrize("params, prompt, output, changes", CONTROLLED)
def test_each_control_changes_only_its_tokens(params, prompt, output, changes):
    logits = logits_rows(1)
    got = apply_controls(logits, [request(params, prompt, output)], {EOS})[0]
    want = logits[0].clone()
    for token, change in changes.items():
        want[token] = change(logits[0, token].item())
    torch.testing.assert_close(got, want)


def test_rows_with_different_controls_in_one_batch_match_each_row_alone_and_a_plain_row_is_untouched():
    rows = [(p, prompt, out) for p, prompt, out, _ in CONTROLLED] + [(SamplingParams(temperature=0), (1, 3), (3,))]
    logits = logits_rows(len(rows))
    together = apply_controls(logits, [request(*row) for row in rows], {EOS})
    for index, row in enumerate(rows):
        alone = apply_controls(logits[index : index + 1], [request(*row)], {EOS})[0]
        torch.testing.assert_close(together[index], alone)
    assert torch.equal(together[-1], logits[-1])  # bit for bit


def test_repetition_penalty_matches_transformers_processor():
    vocab = 50
    ids = [3, 7, 7, 12, 40, 3]
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1)) * 4
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([ids]), logits.clone())
    got = apply_controls(logits, [request(SamplingParams(repetition_penalty=1.7), ids[:3], ids[3:])], set())
    torch.testing.assert_close(got, want)


def test_penalties_are_per_row_tensors():
    logits = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, 2.0]])
    counts = torch.tensor([[2, 1, 0], [0, 0, 0]])
    prompt = torch.tensor([[False, False, True], [True, True, False]])
    got = apply_penalties(logits, counts, prompt, torch.tensor([2.0, 4.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([[0.5 - 1 - 1, -2.0 - 0.5 - 1, 1.0], [0.25, -4.0, 2.0]]))


def test_token_counts_catch_up_with_appended_tokens():
    params = SamplingParams(frequency_penalty=1.0)
    req = request(params, (1,), (2,))
    logits = torch.zeros(1, VOCAB)
    assert apply_controls(logits, [req], set())[0, 2].item() == -1.0
    req.output_ids += [2, 4]
    got = apply_controls(logits, [req], set())[0]
    assert (got[2].item(), got[4].item()) == (-2.0, -1.0)


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_min_p(logits, torch.tensor([0.5, 0.0])))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_min_p_one_samples_only_the_best_token():
    logits = logits_rows(4)
    params = [SamplingParams(min_p=1.0, seed=s) for s in range(4)]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    assert sample(logits, params, generators).tolist() == logits.argmax(dim=-1).tolist()


INVALID = [
    ("presence_penalty", 2.5),
    ("presence_penalty", math.nan),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", "1"),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.inf),
    ("min_p", 1.5),
    ("min_p", True),
    ("min_tokens", -1),
    ("min_tokens", 17),  # above max_tokens (16)
    ("min_tokens", 1.0),
    ("logit_bias", {1: 101.0}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {t: 1.0 for t in range(301)}),
    ("logit_bias", [(1, 2, 3)]),
    ("include_stop_str_in_output", 1),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_values_are_refused_naming_the_field(name, value):
    with pytest.raises(RequestInvalid, match=name) as caught:
        SamplingParams(**{name: value})
    assert caught.value.param == name


def test_logit_bias_is_stored_as_sorted_pairs_and_crosses_the_wire():
    params = SamplingParams(logit_bias={9: 1.5, 2: -4}, repetition_penalty=1.2, min_tokens=2, skip_special_tokens=False)
    assert params.logit_bias == ((2, -4.0), (9, 1.5))
    assert params_from_wire(params_to_wire(params)) == params
    assert params_from_wire([list(x) if isinstance(x, tuple) else x for x in params_to_wire(params)]) == params


# The engine on the tiny llama.

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama):
    return make_engine(llama)


def greedy_ids(engine, prompt, max_tokens=8, **controls) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **controls)
    return engine.generate([prompt], [None], params)[0].output_ids


def test_repetition_penalty_changes_greedy_output_as_transformers_generates_it(engine, llama):
    prompt = prompt_of(6, 4)  # its greedy output repeats a token within 24
    plain, penalised = greedy_ids(engine, prompt, 24), greedy_ids(engine, prompt, 24, repetition_penalty=5.0)
    assert penalised != plain
    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, torch_dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=5.0, eos_token_id=None, pad_token_id=0
    )
    assert penalised == out[0, len(prompt) :].tolist()


def test_logit_bias_of_100_makes_greedy_pick_the_token(engine):
    prompt = prompt_of(5, 4)
    target = next(t for t in range(5, 50) if t not in greedy_ids(engine, prompt))
    assert greedy_ids(engine, prompt, logit_bias={target: 100.0}) == [target] * 8


def test_min_tokens_holds_back_a_stop_token(engine):
    prompt = prompt_of(5, 5)
    first = greedy_ids(engine, prompt)[0]
    stop = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,))
    early = engine.generate([prompt], [None], stop)[0]
    assert (early.output_ids, early.finish_reason) == ([first], FinishReason.STOP)
    held = engine.generate([prompt], [None], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,), min_tokens=3))[0]
    assert len(held.output_ids) >= 3 and first not in held.output_ids[:3]


def test_controlled_and_plain_requests_share_a_step_and_plain_ones_are_unchanged(engine):
    prompts = [prompt_of(6, 3), prompt_of(5, 4), prompt_of(7, 6)]
    plain = [greedy_ids(engine, prompt) for prompt in prompts]
    mixed = [
        GREEDY,
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=5.0, frequency_penalty=1.0),
        SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True, presence_penalty=1.5, min_p=0.1),
    ]
    together = engine.generate(prompts, [None] * 3, mixed)
    assert together[0].output_ids == plain[0]
    assert together[1].output_ids == greedy_ids(engine, prompts[1], repetition_penalty=5.0, frequency_penalty=1.0)
    assert together[2].output_ids == engine.generate([prompts[2]], [None], mixed[2])[0].output_ids


# The API through the openai SDK.


@pytest.fixture(scope="module")
def client(llama, tmp_path_factory):
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("store"))
    with LiveServer(config) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completions_take_the_controls(client):
    plain = client.completions.create(model="tiny-base", prompt="hello there", max_tokens=6, temperature=0)
    token = 42
    biased = client.completions.create(
        model="tiny-base",
        prompt="hello there",
        max_tokens=6,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={str(token): 100},
        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 6, "skip_special_tokens": True},
    )
    assert biased.usage.completion_tokens == 6
    assert biased.choices[0].text != plain.choices[0].text or plain.usage.completion_tokens != 6


def test_chat_takes_the_controls(client):
    chat = client.chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        frequency_penalty=-1.0,
        extra_body={"repetition_penalty": 0.8, "min_tokens": 4, "include_stop_str_in_output": True},
    )
    assert chat.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("min_tokens", 100),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {str(1 << 30): 1}),
        ("logit_bias", {str(t): 1 for t in range(301)}),
    ],
)
def test_out_of_range_controls_are_a_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-base", prompt="hi", max_tokens=8, extra_body={field: value})
    assert field in str(caught.value.body)
