"""The structured-output benchmark runs end to end on a bounded workload.

This checks that the script works, not how fast anything is: timings are never asserted.
"""

from loadtest.structured_output import main


def test_benchmark_runs_both_sides_on_the_same_tokens():
    """Constrained requests run to their max_tokens as unconstrained ones do, so both runs generate alike."""
    summary = main(
        ["--requests", "6", "--rounds", "2", "--adapters", "2", "--min-prompt", "4", "--max-prompt", "12",
         "--min-output", "4", "--max-output", "8"]
    )  # fmt: skip
    assert summary["tokens"]["none"] == summary["tokens"]["half"] >= 6 * 4
    assert len(summary["ratios"]) == 2 and summary["ratio"] > 0
