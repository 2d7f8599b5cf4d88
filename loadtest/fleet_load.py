"""The fleet benchmark's load part: N distinct adapters, all resident on the host or under a budget.

Owns: one measured run (`fleet_run`): a fresh loraplex on a store of exactly N adapters, its host
tier budget `--max-cpu-lora-bytes` either large enough for all N (`ALL_RESIDENT`) or a fraction of
their bytes (`BUDGETED`); every adapter asked for one token once (least popular first), which
brings the host tier to its steady state; then the suite's closed-loop load on a power-law trace.
Which requests were cold is told by a model of the two tiers (`tag_cold`), checked against the
server's own count of loads into the larger one (`server_loads`). It must not build stores or
render results.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.client import ClientConfig
from loadtest.driver import drive
from loadtest.fleet_startup import EXITED, LOG_TAIL, OVER_MEMORY, FleetStore, StartFailed, guarded_server
from loadtest.measure import warm_up
from loadtest.records import RequestRecord
from loadtest.run import LoadRun, execute
from loadtest.servers import free_port, histogram_delta, histogram_quantile, loraplex_args, scrape_counter, scrape_histogram
from loadtest.suite_config import SuiteConfig
from loadtest.summary import Summary, distribution
from loadtest.trace import RequestSpec

BUDGET_FLAG = "--max-cpu-lora-bytes"
ALL_RESIDENT, BUDGETED = "all-resident", "budgeted"
VARIANTS = (ALL_RESIDENT, BUDGETED)
TIER_LOADS = "loraplex_adapter_tier_loads"  # counter by tier: host (store to host memory), device (host to slot)
TIER_LOAD_SECONDS = "loraplex_adapter_tier_load_seconds"  # histogram by tier
SLOT_LOAD_SECONDS = "loraplex_adapter_load_seconds"  # host to slot, on every server
TIERS = ("host", "device")
PRIME_PROMPT = [11, 12, 13, 14]


class FlagRefused(Exception):
    """The server does not take `BUDGET_FLAG`: it predates the host tier budget.

    Args:
        log: the tail of the server's log, where it says so.
    """

    def __init__(self, log: str):
        super().__init__(f"the server refuses {BUDGET_FLAG} (it predates the host tier budget)")
        self.log = log


def budget_bytes(variant: str, store: FleetStore, fraction: float) -> int:
    """The host budget of `variant`: twice the working set for `ALL_RESIDENT`, `fraction` of it for `BUDGETED`.

    The working set is every adapter of the store, each `store.adapter_bytes` (its safetensors file).
    """
    working_set = store.adapters * store.adapter_bytes
    return 2 * working_set if variant == ALL_RESIDENT else max(1, int(working_set * fraction))


def tag_cold(primed: list[str], records: list[RequestRecord], capacity: int) -> list[bool]:
    """Whether each record's adapter was outside an LRU of `capacity` adapters when it was sent.

    The LRU sees the primed adapters in priming order, then the records in the order they were
    sent. It models the host tier and the device slots together: an adapter is warm if either
    holds it, i.e. if it is among the `capacity = max(budget // adapter bytes, max_loras)`
    adapters used last.

    Returns:
        One flag per record, in the order of `records`.
    """
    recent: OrderedDict[str, None] = OrderedDict((name, None) for name in primed[-capacity:] if capacity > 0)
    cold: dict[int, bool] = {}
    for record in sorted(records, key=lambda record: record.sent):
        cold[record.index] = record.adapter not in recent
        recent[record.adapter] = None
        recent.move_to_end(record.adapter)
        while len(recent) > capacity:
            recent.popitem(last=False)
    return [cold[record.index] for record in records]


@dataclass
class FleetRun:
    """One measured run of one variant.

    Args:
        model_config, adapters, alpha, variant, round: what ran (round 1-based).
        position: 1 if this variant ran first in its round, else 2.
        budget_bytes: the `BUDGET_FLAG` it ran with.
        status: `ok`, or why it has no figures (a `fleet_startup` status; `OVER_MEMORY` or `server stopped
            answering` during the load).
        startup_seconds: spawn to ready.
        primed: adapters the priming pass reached (of `adapters`) and its seconds.
        host_capacity: adapters the host budget holds (budget // the server's `size_bytes` of one).
        device_slots: `--max-loras`.
        requests, ok, output_tokens_per_s, ttft_p50: of the measured run.
        cold_requests, warm_requests, cold_ttft_p50, warm_ttft_p50: its ok requests split by `tag_cold`.
        tier_loads: the server's loads per tier during the measured run; None where it has no such counter.
        tier_load_p50: their median seconds (from the histogram); None where absent.
        slot_loads, slot_load_p50: host-to-slot copies (`loraplex_adapter_load_seconds`) during the measured run.
        server_loads: the server's loads into the tier that holds more adapters (`server_loads`), the
            count to hold the cold requests against; None where the server does not count them.
        log: the tail of the server's log when it failed.
    """

    model_config: str
    adapters: int
    alpha: float
    variant: str
    round: int
    position: int
    budget_bytes: int
    status: str = "ok"
    startup_seconds: float | None = None
    primed: int = 0
    prime_seconds: float = 0.0
    host_capacity: int = 0
    device_slots: int = 0
    requests: int = 0
    ok: int = 0
    output_tokens_per_s: float | None = None
    ttft_p50: float | None = None
    cold_requests: int = 0
    warm_requests: int = 0
    cold_ttft_p50: float | None = None
    warm_ttft_p50: float | None = None
    tier_loads: dict[str, float | None] = field(default_factory=dict)
    tier_load_p50: dict[str, float | None] = field(default_factory=dict)
    slot_loads: float = 0.0
    slot_load_p50: float | None = None
    server_loads: float | None = None
    log: str | None = None

    @property
    def capacity(self) -> int:
        """Adapters `tag_cold` holds warm: those in the host tier or in a slot."""
        return max(self.host_capacity, self.device_slots)


def prime(url: str, config: SuiteConfig, names: list[str], max_seconds: float) -> tuple[list[str], float]:
    """Ask every adapter of `names` for one token, last name first; returns those that answered, in order, and the seconds."""
    specs = [RequestSpec(index, 0.0, name, PRIME_PROMPT, len(PRIME_PROMPT), 1) for index, name in enumerate(reversed(names))]
    started = time.monotonic()
    records, _ = drive(specs, ClientConfig(url), max_seconds, config.concurrency, "priming", quiet=True)
    return [record.adapter for record in sorted(records, key=lambda record: record.sent) if record.ok], time.monotonic() - started


def _scrape(url: str) -> dict:
    return {
        "loads": {tier: scrape_counter(url, TIER_LOADS, tier=tier) for tier in TIERS},
        "seconds": {tier: scrape_histogram(url, TIER_LOAD_SECONDS, tier=tier) for tier in TIERS},
        "slot": scrape_histogram(url, SLOT_LOAD_SECONDS),
    }


def _server_loads(run: FleetRun, before: dict, after: dict) -> None:
    for tier in TIERS:
        earlier, later = before["loads"][tier], after["loads"][tier]
        run.tier_loads[tier] = None if later is None else later - (earlier or 0.0)
        run.tier_load_p50[tier] = histogram_quantile(histogram_delta(before["seconds"][tier], after["seconds"][tier]), 0.5)
    slot = histogram_delta(before["slot"], after["slot"])
    run.slot_loads = slot[-1][1] if slot else 0.0
    run.slot_load_p50 = histogram_quantile(slot, 0.5)
    run.server_loads = server_loads(run)


def server_loads(run: FleetRun) -> float | None:
    """The loads `tag_cold`'s cold requests stand for: into the host tier when it holds more adapters
    than the slots, else into the slots (by the tier counter, or else `loraplex_adapter_load_seconds`)."""
    if run.host_capacity > run.device_slots:
        return run.tier_loads.get("host")
    device = run.tier_loads.get("device")
    return device if device is not None else run.slot_loads


def _refused_flag(log: str) -> bool:
    return BUDGET_FLAG in log and "No such option" in log


def _drive(
    url: str, store: FleetStore, config: SuiteConfig, run: FleetRun, prime_seconds: float
) -> tuple[list[str], Summary, list[RequestRecord]] | None:
    """Prime the server at `url` and drive the run's trace; None if the server stopped answering."""
    size = httpx.get(f"{url}/v1/adapters/lora-0", timeout=30).json().get("size_bytes") or store.adapter_bytes
    run.host_capacity, run.device_slots = run.budget_bytes // size, config.max_loras
    warm_up(config, url, num_adapters=0)  # the base only: every adapter stays unused until the priming
    primed, run.prime_seconds = prime(url, config, store.names(), prime_seconds)
    run.primed = len(set(primed))
    before = _scrape(url)
    label = f"{run.model_config} N={run.adapters} alpha={run.alpha:g} {run.variant} round {run.round}"
    trace = config.trace(run.adapters, run.alpha, config.requests, seed=run.round)
    summary, records = execute(LoadRun(label, trace, ClientConfig(url), config.concurrency, config.max_seconds))
    if httpx.get(url + "/health", timeout=10).status_code != 200:
        return None
    _server_loads(run, before, _scrape(url))
    return primed, summary, records


def fleet_run(model: Path, store: FleetStore, config: SuiteConfig, run: FleetRun, startup_timeout: float, max_rss: int) -> FleetRun:
    """Start loraplex on `store` with `run.budget_bytes`, prime it, drive the trace of `run.round`, fill in `run`.

    Args:
        model: the base checkpoint.
        store: exactly the run's N adapters.
        config: the suite's settings (device, slots, clients, requests, time bound, lengths, seed).
        run: what to run; its figures are filled in and it is returned.
        startup_timeout: seconds the server may take to be ready.
        max_rss: resident bytes of the server's processes at which it is killed.

    Raises:
        FlagRefused: the server does not take `BUDGET_FLAG`.
    """
    port = free_port()
    args = loraplex_args(model, store.path, port, config.device, config.dtype, config.max_loras, config.concurrency)
    args += [BUDGET_FLAG, str(run.budget_bytes)]
    try:
        with guarded_server(f"loraplex-fleet-{run.variant}", args, port, config.server_env, startup_timeout, max_rss) as started:
            run.startup_seconds = started.seconds
            try:
                measured = _drive(started.server.url, store, config, run, startup_timeout)
            except httpx.TransportError:
                measured = None
            if measured is None:  # the guard killed it, or it died on its own
                run.status = OVER_MEMORY if started.guard.tripped_at is not None else "server stopped answering"
                run.log = started.server.log.read_text()[-LOG_TAIL:]
                return run
    except StartFailed as failure:
        if failure.status == EXITED and _refused_flag(failure.log):
            raise FlagRefused(failure.log[-600:]) from None
        run.status, run.startup_seconds, run.log = failure.status, failure.seconds, failure.log
        return run
    primed, summary, records = measured
    run.requests, run.ok = summary.requests, summary.ok
    run.output_tokens_per_s, run.ttft_p50 = summary.output_tokens_per_s, summary.ttft.p50
    cold = tag_cold(primed, records, run.capacity)
    split = {flag: [record.ttft for record, tagged in zip(records, cold) if tagged == flag and record.ok and record.ttft is not None]
             for flag in (True, False)}  # fmt: skip
    run.cold_requests, run.warm_requests = len(split[True]), len(split[False])
    run.cold_ttft_p50, run.warm_ttft_p50 = distribution(split[True]).p50, distribution(split[False]).p50
    return run
