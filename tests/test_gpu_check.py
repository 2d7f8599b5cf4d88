"""The prepared GPU check runs every path on this CPU with a tiny shape (its figures mean nothing here).

On a lent GPU, `loadtest/gpu_check.sh` runs it with the Llama-3-8B shape; this keeps the script
from rotting between the days a GPU is there.
"""

from loadtest import gpu_check


def test_gpu_check_runs_every_path_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    gpu_check.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--out", str(out), "--json", str(tmp_path / "r.json")])
    table = out.read_text()
    for row in ("loraplex, base only", "loraplex, N = 8", "loraplex, N = 64", "PEFT mixed batch", "decode step, base only",
                "decode step, 4 distinct adapters", "greedy outputs equal to PEFT's"):  # fmt: skip
        assert row in table
    # float32 on CPU: the engine and PEFT give the same greedy tokens
    assert "| 4 / 4 |" in table
