"""The benchmark suite end to end on a micro model and a few requests: it runs, it does not measure.

Every server the real sweep starts but vLLM (loraplex and both PEFT baselines, as child processes
on 127.0.0.1) is started here too, so the suite cannot rot unnoticed; the figures it writes are
checked for presence and consistency, never for speed. vLLM needs its own virtualenv (tens of
seconds to start), so it is left out here, as the suite leaves it out without `--vllm-python`;
its command line is test_loadtest_vllm_server.py's.
"""

import json
import re

import pytest

from loadtest.compare import compare_servers
from loadtest.suite import main, parse_args
from loadtest.suite_config import SuiteConfig
from loadtest.workspace import Workspace

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
            "--rounds", "2", "--cold-adapters", "2", "--adapter-counts", "1,64", "--max-seconds", "60",
            "--out", str(tmp_path / "out"), "--benchmarks-md", str(md),
        ]
    )  # fmt: skip
    assert sorted(results.runs) == sorted(["loraplex base only"] + [f"loraplex N={n} alpha={a}" for n in (1, 64) for a in (0, 1)])
    assert sorted((run.server, run.adapters, run.round) for run in results.compare) == sorted(
        [("loraplex", n, r) for n in (0, 8, 64) for r in (1, 2)] + [(peft, 64, r) for peft in ("PEFT naive", "PEFT mixed") for r in (1, 2)]
    )
    summaries = [*results.runs.values(), *(run.summary for run in results.compare)]
    assert all(summary.ok == summary.requests for summary in summaries)
    for round_number in (1, 2):
        at_64 = {run.server: run for run in results.compare if run.adapters == 64 and run.round == round_number}
        assert len({run.summary.output_tokens for run in at_64.values()}) == 1  # one trace, the same tokens asked of all three
        order = [server for server, _ in sorted(at_64.items(), key=lambda item: item[1].position)]
        assert order == (["loraplex", "PEFT naive", "PEFT mixed"] if round_number == 1 else ["PEFT mixed", "PEFT naive", "loraplex"])
    assert [client for client in results.cold_client if 0 < client[0] < client[1]] == results.cold_client
    assert len(results.cold_client) == 2 and results.cold_register[-1][1] == 2

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    section = text[text.index("<!-- suite:cpu-custom -->") :]
    assert "loraplex / PEFT naive, output tok/s, N=64" in section and "throughput(N=64) / throughput(N=8)" in section
    assert "vLLM was left out of this run" in section
    assert len(re.findall(r"^\| loraplex N=\d+ alpha=", section, flags=re.MULTILINE)) == 4
    assert len(re.findall(r"^\| (loraplex|PEFT naive|PEFT mixed) \| \d+ \| [12] \|", section, flags=re.MULTILINE)) == 10
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", section):
        assert (md.parent / image).read_bytes()[:4] == b"\x89PNG"


def test_no_peft_leaves_the_baselines_out_of_the_compare_phase(tmp_path):
    names = [server.name for server in compare_servers(SuiteConfig(), Workspace(tmp_path), None)]
    assert names == ["loraplex", "PEFT naive", "PEFT mixed"]
    names = [server.name for server in compare_servers(SuiteConfig(peft_baselines=False), Workspace(tmp_path), None)]
    assert names == ["loraplex"]
    assert parse_args(["--no-peft"]).peft_baselines is False and parse_args([]).peft_baselines is True
