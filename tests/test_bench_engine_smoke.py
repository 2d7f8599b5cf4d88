"""The engine benchmark scripts run end to end: bench_engine on a toy shape with PEFT-identical outputs,
lora_strategies over its shapes on equal work.

This checks that the scripts work, not how fast anything is: timings are never asserted.
"""

import json

from loadtest.bench_engine import main
from loadtest.lora_strategies import LAYER_SHAPES, STEP_MIXES, TIMED_STRATEGIES
from loadtest.lora_strategies import main as strategies_main


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


def test_lora_strategy_timings_run_on_equal_work_and_report_autos_pick(capsys):
    """Every shape and step mix: the three strategies' deltas agree, and auto's pick is printed."""
    strategies_main(rank=8, slots=64, repeats=1, threads=1)
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 + len(LAYER_SHAPES) * len(STEP_MIXES) and rows[-1].startswith("worst regret: ")
    assert all(row.split()[-2] in TIMED_STRATEGIES for row in rows[1:-1])
