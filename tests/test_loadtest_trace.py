"""The load generator's traces: S-LoRA's adapter popularity, gamma arrivals, lengths, JSONL prompts."""

import json

import numpy as np
import pytest

from loadtest.trace import TraceConfig, arrival_times, build_trace, popularity

ADAPTERS = tuple(f"lora-{index}" for index in range(4))


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, [0.25, 0.25, 0.25, 0.25]),
        (1.0, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (1 + 1 / 2 + 1 / 3 + 1 / 4)),
        (2.0, np.array([1, 1 / 4, 1 / 9, 1 / 16]) / (1 + 1 / 4 + 1 / 9 + 1 / 16)),
    ],
)
def test_popularity_is_a_power_law_of_the_adapters_rank(alpha, expected):
    assert popularity(4, alpha) == pytest.approx(expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_adapters_are_drawn_with_their_popularity(alpha):
    specs = build_trace(TraceConfig(num_requests=20_000, adapters=ADAPTERS, alpha=alpha, seed=3))
    counts = np.array([sum(spec.model == name for spec in specs) for name in ADAPTERS])
    assert counts / len(specs) == pytest.approx(popularity(4, alpha), abs=0.015)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_arrival_gaps_have_the_asked_mean_rate_and_burstiness(cv):
    arrivals = arrival_times(50_000, rate=8.0, cv=cv, rng=np.random.default_rng(0))
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_random_prompts_and_outputs_stay_in_their_ranges_and_token_range():
    config = TraceConfig(num_requests=500, prompt_len=(3, 9), output_len=(2, 5), token_ids=(10, 20), seed=1)
    specs = build_trace(config)
    assert {len(spec.prompt) for spec in specs} == set(range(3, 10))
    assert all(spec.prompt_tokens == len(spec.prompt) for spec in specs)
    assert {spec.max_tokens for spec in specs} == set(range(2, 6))
    assert {token for spec in specs for token in spec.prompt} <= set(range(10, 20))


def test_without_adapters_every_request_goes_to_the_base_model():
    specs = build_trace(TraceConfig(num_requests=10, base_model="my-base"))
    assert {spec.model for spec in specs} == {"my-base"}


def test_a_closed_loop_trace_has_no_arrival_times_and_an_open_one_increasing_ones():
    assert {spec.arrival for spec in build_trace(TraceConfig(num_requests=5))} == {0.0}
    arrivals = [spec.arrival for spec in build_trace(TraceConfig(num_requests=50, rate=10.0))]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    config = TraceConfig(num_requests=30, adapters=ADAPTERS, rate=5.0, seed=7)
    assert build_trace(config) == build_trace(config)
    assert build_trace(config) != build_trace(TraceConfig(num_requests=30, adapters=ADAPTERS, rate=5.0, seed=8))


def test_traces_that_differ_only_in_adapters_ask_for_the_same_prompts_and_lengths():
    base = build_trace(TraceConfig(num_requests=50, seed=4))
    spread = build_trace(TraceConfig(num_requests=50, adapters=ADAPTERS, alpha=1.0, seed=4))
    assert [(s.prompt, s.max_tokens) for s in base] == [(s.prompt, s.max_tokens) for s in spread]
    assert {s.model for s in spread} != {s.model for s in base}


def test_jsonl_prompts_are_used_in_order_cycling_with_their_own_max_tokens(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps("plain text"), "", json.dumps({"prompt": "with budget", "max_tokens": 7})]
    path.write_text("\n".join(lines) + "\n")
    specs = build_trace(TraceConfig(num_requests=4, output_len=(3, 3), prompts_file=path))
    assert [(spec.prompt, spec.max_tokens) for spec in specs] == [
        ("plain text", 3), ("with budget", 7), ("plain text", 3), ("with budget", 7)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "content, problem",
    [("", "holds no prompts"), ('{"text": "x"}\n', "expected a string"), ("[1, 2]\n", "expected a string")],
)
def test_a_bad_prompts_file_is_refused_naming_the_problem(tmp_path, content, problem):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        build_trace(TraceConfig(num_requests=1, prompts_file=path))


@pytest.mark.parametrize(
    "fields",
    [{"num_requests": 0}, {"rate": 0.0}, {"cv": 0.0}, {"prompt_len": (5, 2)}, {"token_ids": (4, 4)}],
    ids=["no-requests", "zero-rate", "zero-cv", "inverted-range", "empty-token-range"],
)
def test_impossible_trace_settings_are_refused(fields):
    with pytest.raises(ValueError):
        TraceConfig(**{"num_requests": 1, **fields})
