"""The fleet benchmark (loadtest/fleet.py): its stores, its model of cold adapters, and its start-up part on a live server."""

import pytest

from loadtest.fleet_load import tag_cold
from loadtest.fleet_startup import READY, WEIGHTS, build_store, measure_startup
from loadtest.processes import available_memory
from loadtest.records import RequestRecord
from loadtest.suite_config import SuiteConfig
from loadtest.workspace import save_base

ADAPTERS = 20


def test_a_store_is_a_few_written_adapters_and_hard_links_to_them(tmp_path):
    config = SuiteConfig()
    base = save_base(config, tmp_path / "base")
    store = build_store(base, config, tmp_path / "store", ADAPTERS, distinct=4)
    assert store.written == 4 and sorted(path.name for path in store.path.iterdir()) == sorted(store.names())
    linked = store.path / f"lora-{ADAPTERS - 1}"
    assert (linked / WEIGHTS).stat().st_ino == (store.path / "lora-3" / WEIGHTS).stat().st_ino
    assert (linked / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "primed, sent, capacity, cold",
    [
        ([], ["a", "a", "b", "a"], 1, [True, False, True, True]),
        (["c", "b", "a"], ["a", "b", "c"], 2, [False, False, True]),  # c was primed first, so evicted first
        (["b", "a"], ["a", "b", "c", "a"], 8, [False, False, True, False]),  # all fit: only the unprimed one is cold
        (["a"], ["a", "a"], 0, [True, True]),
    ],
)
def test_an_adapter_is_cold_when_it_is_not_among_the_capacity_used_last(primed, sent, capacity, cold):
    records = [RequestRecord(index, adapter, index, float(index), 4) for index, adapter in enumerate(sent)]
    assert tag_cold(primed, records, capacity) == cold


def test_a_server_on_a_linked_store_lists_every_adapter_and_reports_its_peak_memory(tmp_path):
    config = SuiteConfig()  # the suite's default shape
    base = save_base(config, tmp_path / "base")
    store = build_store(base, config, tmp_path / "store", ADAPTERS)
    start = measure_startup(tmp_path / "base", store, config, startup_timeout=120, max_rss=available_memory() // 2)
    assert start.status == READY, start.log
    assert start.models_listed == ADAPTERS
    assert start.server_peak_rss > 0 and start.engine_peak_rss > 0
    assert 0 < start.seconds < 120
