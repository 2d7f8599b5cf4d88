"""The engine benchmark script runs end to end on a toy shape and reports PEFT-identical outputs.

This checks that the script works, not how fast anything is: timings are never asserted.
"""

import json

from loadtest.bench_engine import main


def test_benchmark_runs_and_matches_peft(tmp_path):
    out = tmp_path / "bench.json"
    main(
        [
            "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "2",
            "--num-heads", "4", "--num-kv-heads", "2", "--vocab-size", "512",
            "--num-requests", "4", "--min-prompt", "4", "--max-prompt", "12", "--max-tokens", "6",
            "--num-adapters", "2", "--rank", "4", "--json", str(out),
        ]
    )
    summary = json.loads(out.read_text())
    assert summary["b_equals_d_requests"] == summary["num_requests"] == 4
    assert summary["c_equals_d_requests"] == 4
    assert set(summary["ratios"]) == {"(b)/(a)", "(b)/(c)", "(b)/(d)"}
