"""The deployment files, checked offline (nothing here runs Docker): promtool accepts the Prometheus
config, the compose stack wires loraplex, Prometheus and Grafana together, Grafana's provisioning
loads the dashboard folder compose mounts, every metric a dashboard query names is one a live server
exports, the dashboard covers each topic the operators asked for, and the Dockerfile has what the
image needs."""

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_promtool
from live_server import LiveServer, server_config, upload
from loraplex.config import ServerConfig

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
GPU_COMPOSE = COMPOSE_DIR / "docker-compose.gpu.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
PROVISIONING = COMPOSE_DIR / "grafana" / "provisioning"
DASHBOARD = REPO / "deploy" / "grafana" / "loraplex-dashboard.json"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = DOCKERFILE.with_name("Dockerfile.dockerignore")

SERVICES = ("loraplex", "prometheus", "grafana")
ADAPTER_STORE = "/adapters"
GRID_WIDTH = 24
METRIC = re.compile(r"\bloraplex_[a-z0-9_]+")
# Grafana's variables, as Prometheus would see them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s", "$instance": ".*"}


def run_promtool(*args: str) -> None:
    result = subprocess.run([require_promtool(), *args], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def service(name: str, compose: Path = COMPOSE) -> dict:
    return load_yaml(compose)["services"][name]


def mounts(name: str) -> dict[str, str]:
    """A compose service's volumes: container path -> host path (resolved) or named volume."""
    found = {}
    for volume in service(name)["volumes"]:
        source, target = volume.split(":")[:2]
        found[target] = str((COMPOSE_DIR / source).resolve()) if source.startswith((".", "/")) else source
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels() -> list[dict]:
    """Every panel that draws queries (rows only group them), nested row panels included."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def exprs(panel: dict) -> list[str]:
    return [target["expr"] for target in panel["targets"]]


def queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    variables = [var["definition"] for var in dashboard()["templating"]["list"] if var["type"] == "query"]
    return [expr for panel in graph_panels() for expr in exprs(panel)] + variables


# ----- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool():
    run_promtool("check", "config", str(PROMETHEUS_CONFIG))


def test_prometheus_scrapes_loraplex_metrics_every_5_seconds():
    (job,) = [job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if job["job_name"] == "loraplex"]

    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [target for group in job["static_configs"] for target in group["targets"]] == ["loraplex:8000"]


def test_prometheus_service_reads_the_config_file():
    config_flag = next(arg for arg in service("prometheus")["command"] if arg.startswith("--config.file="))

    assert mounts("prometheus")[config_flag.removeprefix("--config.file=")] == str(PROMETHEUS_CONFIG)


# ----- compose ------------------------------------------------------------------------------------


def test_compose_runs_loraplex_prometheus_and_grafana():
    assert set(SERVICES) <= set(load_yaml(COMPOSE)["services"])


def test_loraplex_service_builds_the_dockerfile_from_the_repository():
    build = service("loraplex")["build"]

    assert (COMPOSE_DIR / build["context"]).resolve() == REPO
    assert REPO / build["dockerfile"] == DOCKERFILE


def test_loraplex_service_publishes_8000_and_keeps_the_adapter_store_in_a_volume():
    loraplex = service("loraplex")

    assert "8000:8000" in loraplex["ports"]
    assert mounts("loraplex")[ADAPTER_STORE] in load_yaml(COMPOSE)["volumes"]


def test_loraplex_service_runs_on_cpu_without_the_gpu_override():
    loraplex = service("loraplex")

    device = loraplex["environment"]["LORAPLEX_DEVICE"]

    assert "deploy" not in loraplex
    assert re.sub(r"^\$\{LORAPLEX_DEVICE:-(\w+)\}$", r"\1", device) in ("auto", "cpu")


def test_gpu_override_reserves_an_nvidia_gpu_and_requires_cuda():
    loraplex = service("loraplex", GPU_COMPOSE)
    (device,) = loraplex["deploy"]["resources"]["reservations"]["devices"]

    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert loraplex["environment"]["LORAPLEX_DEVICE"] == "cuda"


def test_loraplex_stops_only_after_the_server_has_drained():
    grace = service("loraplex")["stop_grace_period"]

    assert grace.endswith("s") and float(grace.removesuffix("s")) > ServerConfig.model_fields["drain_timeout"].default


# ----- Grafana provisioning -----------------------------------------------------------------------


def test_grafana_datasource_is_prometheus_under_a_fixed_uid():
    (datasource,) = [
        source for path in sorted((PROVISIONING / "datasources").glob("*.yml")) for source in load_yaml(path)["datasources"]
    ]

    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["uid"] and "$" not in datasource["uid"]
    assert datasource["isDefault"] is True


def test_grafana_mounts_the_provisioning_folder():
    assert mounts("grafana")["/etc/grafana/provisioning"] == str(PROVISIONING)


def test_grafana_loads_the_dashboard_folder_that_compose_mounts():
    (provider,) = [
        provider for path in sorted((PROVISIONING / "dashboards").glob("*.yml")) for provider in load_yaml(path)["providers"]
    ]

    assert provider["type"] == "file"
    assert mounts("grafana")[provider["options"]["path"]] == str(DASHBOARD.parent)


def test_grafana_home_page_is_the_mounted_dashboard():
    home = Path(service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])

    assert mounts("grafana")[str(home.parent)] == str(DASHBOARD.parent)
    assert home.name == DASHBOARD.name


# ----- the dashboard ------------------------------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_fit_the_grid():
    panels = dashboard()["panels"]
    ids = [panel["id"] for panel in panels] + [nested["id"] for panel in panels for nested in panel.get("panels", [])]

    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]


def test_every_graph_panel_queries_prometheus_through_the_datasource_variable():
    for panel in graph_panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_dashboard_picks_its_datasource_from_a_variable_so_it_imports_anywhere():
    variables = {var["name"]: var for var in dashboard()["templating"]["list"]}

    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = []
    for index, query in enumerate(queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        if query.startswith("label_values("):  # Grafana's own function; the metric inside is PromQL
            query = query.removeprefix("label_values(").split(",")[0]
        rules.append({"record": f"dashboard:query_{index}", "expr": query})
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    run_promtool("check", "rules", str(rules_file))


@pytest.fixture(scope="module")
def exported_samples(llama, tmp_path_factory) -> set[str]:
    """The sample names a live server exports after an upload and a completion through the adapter."""
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("adapters"))
    with LiveServer(config) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        assert upload(http, "r4-qv", llama.adapter_dirs["r4-qv"]).status_code == 201
        response = http.post("/v1/completions", json={"model": "r4-qv", "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200, response.text
        text = http.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_dashboard_queries_is_exported_by_the_server(exported_samples):
    named = {name for query in queries() for name in METRIC.findall(query)}

    assert named, "the dashboard names no loraplex metric"
    assert sorted(named - exported_samples) == []


def quantile_panel(metric: str) -> bool:
    """Some panel draws p50, p90 and p99 of `metric` with histogram_quantile over the rate of its buckets."""
    pattern = re.compile(rf"histogram_quantile\((0\.\d+), sum by \(le\b[^)]*\) \(rate\({metric}_bucket\{{")
    return any({"0.5", "0.9", "0.99"} <= {m.group(1) for expr in exprs(panel) if (m := pattern.search(expr))} for panel in graph_panels())


@pytest.mark.parametrize(
    "metric",
    ["loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds", "loraplex_e2e_request_latency_seconds"],
)
def test_dashboard_draws_latency_percentiles(metric):
    assert quantile_panel(metric)


# Each topic: the metrics (or fragments of a query) that one panel's queries must all contain.
TOPICS = {
    "requests running and waiting": ("loraplex_num_requests_running", "loraplex_num_requests_waiting"),
    "prompt and generation tokens per second": ("rate(loraplex_prompt_tokens_total", "rate(loraplex_generation_tokens_total"),
    "tokens per tenant": ("by (tenant", "loraplex_tenant_tokens_total"),
    "adapter loads and evictions": ("rate(loraplex_adapter_loads_total", "rate(loraplex_adapter_evictions_total"),
    "adapter cache hit ratio": ("loraplex_adapter_cache_hits_total", ") / sum(rate(loraplex_adapter_cache_lookups_total"),
    "slots used vs total": ("loraplex_adapter_slots_used", "loraplex_adapter_slots_total"),
    "KV cache use": ("loraplex_kv_cache_usage_ratio",),
    "prefix cache hit ratio": ("loraplex_prefix_cache_hits_total", ") / sum(rate(loraplex_prefix_cache_queries_total"),
    "429 rate": ('status="rejected"', "rate(loraplex_requests_total"),
    "adapter load latency": ("histogram_quantile(", "loraplex_adapter_load_seconds_bucket"),
    "adapter registration latency": ("histogram_quantile(", "loraplex_adapter_register_seconds_bucket"),
    "adapters per tier": ("by (tier)", "loraplex_adapter_tier_adapters"),
    "bytes per tier": ("by (tier)", "loraplex_adapter_tier_bytes"),
    "loads and evictions per tier": ("loraplex_adapter_tier_loads_total", "loraplex_adapter_tier_evictions_total"),
    "hits and misses per tier": ("loraplex_adapter_tier_hits_total", "loraplex_adapter_tier_misses_total"),
    "load latency per tier": ("histogram_quantile(", "by (le, tier)", "loraplex_adapter_tier_load_seconds_bucket"),
}


@pytest.mark.parametrize("fragments", TOPICS.values(), ids=TOPICS.keys())
def test_dashboard_covers_topic(fragments):
    assert any(all(fragment in "\n".join(exprs(panel)) for fragment in fragments) for panel in graph_panels())


# ----- the Dockerfile -----------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    parsed, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped.removesuffix("\\") + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
        pending = ""
    return parsed


def arguments(keyword: str) -> list[str]:
    return [args for key, args in instructions() if key == keyword]


def base_image() -> str:
    """The image of the last FROM, with the ARG defaults declared before it filled in."""
    defaults = {}
    for key, args in instructions():
        if key == "FROM":
            image = args.split()[0]
        elif key == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            defaults[name] = default
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], image)


def test_image_starts_from_a_cuda_runtime():
    assert re.fullmatch(r"nvidia/cuda:1\d\.\d+(\.\d+)?-runtime-ubuntu\d\d\.04", base_image())


def test_image_installs_torch_from_the_pytorch_index_before_the_package():
    runs = arguments("RUN")
    torch = next(index for index, run in enumerate(runs) if "torch==" in run)
    package = next(index for index, run in enumerate(runs) if "pip install" in run and "torch" not in run)

    assert torch < package
    assert "--index-url" in runs[torch]
    assert any(arg.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/") for arg in arguments("ARG"))


def test_image_runs_as_a_non_root_user():
    (user,) = arguments("USER")

    assert user.split(":")[0] not in ("root", "0")


def test_image_serves_on_all_interfaces_at_8000():
    assert arguments("EXPOSE") == ["8000"]
    assert json.loads(arguments("ENTRYPOINT")[-1]) == ["loraplex", "serve"]
    assert any("LORAPLEX_HOST=0.0.0.0" in env.split() for env in arguments("ENV"))


def test_image_checks_health_on_the_health_endpoint():
    (healthcheck,) = arguments("HEALTHCHECK")

    assert "/health" in healthcheck and "CMD" in healthcheck.split()


def test_image_keeps_the_adapter_store_in_a_volume():
    assert json.loads(arguments("VOLUME")[-1]) == [ADAPTER_STORE]
    assert any(f"LORAPLEX_ADAPTERS={ADAPTER_STORE}" in env.split() for env in arguments("ENV"))


def test_build_context_holds_every_path_the_image_copies():
    patterns = DOCKERIGNORE.read_text().splitlines()
    kept = {pattern.removeprefix("!") for pattern in patterns if pattern.startswith("!")}
    copied = {source for args in arguments("COPY") for source in args.split()[:-1] if not source.startswith("--")}

    assert "*" in patterns  # everything else (.venv, .git, benchmark runs) stays out
    assert sorted(copied - kept) == []
    assert all((REPO / source).exists() for source in copied)
