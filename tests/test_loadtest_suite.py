"""The benchmark suite end to end on a micro model and a few requests: it runs, it does not measure.

Every server the real sweep starts (loraplex and both PEFT baselines, as child processes on
127.0.0.1) is started here too, so the suite cannot rot unnoticed; the figures it writes are
checked for presence and consistency, never for speed.
"""

import json
import re

import pytest

from loadtest.suite import main

MICRO = json.dumps(
    {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300,
    }
)  # fmt: skip


@pytest.mark.slow
def test_a_small_sweep_writes_every_ratio_run_and_plot(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    results = main(
        [
            "--model-config", MICRO, "--rank", "4", "--concurrency", "4", "--requests", "12", "--compare-requests", "8",
            "--cold-adapters", "2", "--adapter-counts", "1,64", "--max-seconds", "60", "--out", str(tmp_path / "out"),
            "--benchmarks-md", str(md),
        ]
    )  # fmt: skip
    assert sorted(results.runs) == sorted(
        ["loraplex base only"]
        + [f"loraplex N={n} alpha={a}" for n in (1, 64) for a in (0, 1)]
        + [f"{server} N=64 (compare)" for server in ("loraplex", "PEFT naive", "PEFT mixed")]
    )
    assert all(summary.ok == summary.requests for summary in results.runs.values())
    compare = [results.runs[f"{server} N=64 (compare)"] for server in ("loraplex", "PEFT naive", "PEFT mixed")]
    assert len({summary.output_tokens for summary in compare}) == 1  # one trace, the same tokens asked of all three
    assert [client for client in results.cold_client if 0 < client[0] < client[1]] == results.cold_client
    assert len(results.cold_client) == 2 and results.cold_register[-1][1] == 2

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    section = text[text.index("<!-- suite:cpu-custom -->") :]
    assert "loraplex / PEFT naive (N=64)" in section and "throughput(N=64) / throughput(N=8)" in section
    assert len(re.findall(r"^\| loraplex N=", section, flags=re.MULTILINE)) == 5
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", section):
        assert (md.parent / image).read_bytes()[:4] == b"\x89PNG"
