"""How well the LoRA cost model picks, on this machine: each strategy timed, per layer shape.

Owns: timing `add_lora_delta` under each forced strategy for layer shapes of the suite's presets and
step mixes from decode over a few slots to prefill, and printing, beside the times, the strategy
`auto` picks (`ops.lora.strategy_cost`) and how much slower it is than the fastest one (its regret).
A regret above a few tens of percent on a new machine says the constants at the top of
`engine/ops/lora.py` need refitting there. Before timing, it checks that the three strategies give
the same delta. It must not change the constants; the test suite runs it once with one repeat,
as a smoke test, and never reads its timings.
"""

import random
import time

import torch
import typer

from loraplex.engine.ops.lora import add_lora_delta, build_lora_batch

# (in, out) of the presets' projections: tiny attention/MLP, small MLP, 0.3b attention/MLP.
LAYER_SHAPES = ((128, 344), (512, 512), (512, 1376), (1024, 1024), (1024, 4096), (4096, 1024))
# (tokens, slot range, tokens per sequence): decode over few and many slots, then prefill chunks.
STEP_MIXES = ((8, 4, 1), (16, 16, 1), (32, 64, 1), (64, 64, 1), (256, 8, 64))
TIMED_STRATEGIES = ("dense", "gather", "segment")


def _seconds(call, repeats: int) -> float:
    """Best of three means over `repeats` calls, after a warm-up."""
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main(
    rank: int = typer.Option(16, help="Adapter and stack rank."),
    slots: int = typer.Option(64, help="Device slots (the stacks' size)."),
    repeats: int = typer.Option(30, min=1, max=10_000, help="Calls per timing."),
    threads: int = typer.Option(1, min=1, max=256, help="torch threads, as the servers in the suite use."),
) -> None:
    torch.set_num_threads(threads)
    rng = random.Random(0)
    print(f"{'in x out':>11} {'T':>4} {'hi':>3} {'runs':>4} " + " ".join(f"{s:>9}" for s in TIMED_STRATEGIES)
          + "   auto picks   regret")  # fmt: skip
    worst = 0.0
    for d_in, d_out in LAYER_SHAPES:
        lora_a = torch.randn(slots + 1, rank, d_in) * 0.01  # [S + 1, R, in]
        lora_b = torch.randn(slots + 1, rank, d_out) * 0.01  # [S + 1, R, out]
        for tokens, slot_range, per_seq in STEP_MIXES:
            seqs = sorted(rng.choices(range(slot_range), k=tokens // per_seq))
            token_slots = [s for s in seqs for _ in range(per_seq)]
            ranks = {s: rank for s in seqs}
            x = torch.randn(len(token_slots), d_in)  # [T, in]
            y = torch.zeros(len(token_slots), d_out)  # [T, out]
            timings, deltas = {}, {}
            for strategy in TIMED_STRATEGIES:
                batch = build_lora_batch(token_slots, ranks, rank, x.device, strategy)
                deltas[strategy] = torch.zeros_like(y)
                add_lora_delta(deltas[strategy], x, lora_a, lora_b, batch)
                timings[strategy] = _seconds(lambda b=batch: add_lora_delta(y, x, lora_a, lora_b, b), repeats)
            for strategy in TIMED_STRATEGIES[1:]:  # the timings compare equal work, or they mean nothing
                torch.testing.assert_close(deltas[strategy], deltas[TIMED_STRATEGIES[0]], rtol=1e-4, atol=1e-5)
            auto_batch = build_lora_batch(token_slots, ranks, rank, x.device)
            auto, runs = auto_batch.strategy_for(d_in + d_out), len(auto_batch.segments)
            regret = timings[auto] / min(timings.values()) - 1
            worst = max(worst, regret)
            print(f"{d_in:>5}x{d_out:<5} {tokens:>4} {slot_range:>3} {runs:>4} "
                  + " ".join(f"{timings[s] * 1e6:>7.0f}us" for s in TIMED_STRATEGIES)
                  + f"   {auto:>10}   {regret:>6.0%}")  # fmt: skip
    print(f"worst regret: {worst:.0%}")


if __name__ == "__main__":
    typer.run(main)
