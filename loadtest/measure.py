"""What the suite does to a started server before and while it measures it.

Owns: checking that a server serves every adapter it will be asked for, warming it up, and one
measured closed-loop run of a trace (its per-run files under `<out>/runs`). It must not start or
stop servers, nor keep results (the phases do).
"""

from dataclasses import replace

import httpx

from loadtest.client import ClientConfig
from loadtest.run import LoadRun, execute
from loadtest.suite_config import SuiteConfig
from loadtest.summary import Summary
from loadtest.trace import TraceConfig

WARM_UP_SEED = 99


def check_served(url: str, wanted: int) -> None:
    """Refuse to measure a server that did not take every adapter: its runs would be 404s."""
    served = {model["id"] for model in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    missing = [f"lora-{index}" for index in range(wanted) if f"lora-{index}" not in served]
    if missing:
        raise RuntimeError(f"the server does not serve {len(missing)} of the adapters, e.g. {missing[:3]}; see its log")


def warm_up(config: SuiteConfig, url: str, num_adapters: int = 8) -> None:
    """First calls pay for allocator growth and lazy initialisation; keep them out of the figures.

    Args:
        config: the suite's settings.
        url: the server.
        num_adapters: adapters `lora-0` ... the warm-up spreads over; 0 warms the base only, leaving every adapter unused.
    """
    workload = replace(config.trace(num_adapters, 0.0, 2 * config.concurrency, seed=WARM_UP_SEED), output_len=(4, 8))
    execute(LoadRun("warm-up", workload, ClientConfig(url), config.concurrency, config.max_seconds, quiet=True))


def measure(config: SuiteConfig, url: str, label: str, workload: TraceConfig) -> Summary:
    """Drive `workload` against `url` with the suite's clients; its files go to `<out>/runs/<label>.*`."""
    load = LoadRun(label, workload, ClientConfig(url), config.concurrency, config.max_seconds, config.out / "runs")
    summary, _ = execute(load)
    return summary
