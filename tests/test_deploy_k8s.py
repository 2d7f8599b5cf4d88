"""The Kubernetes manifests in deploy/k8s and deploy/gateway: valid, consistent with each other and with the server.

Offline. Built-in kinds are validated against the Kubernetes JSON schemas bundled with
kubernetes-validate (its newest version, strict: unknown fields fail). Custom resources
(ServiceMonitor, InferencePool, HTTPRoute) and the endpoint picker's EndpointPickerConfig have no
bundled schema, so the fields loraplex relies on are checked instead. Metric names come from the
server's own exposition (`Metrics` with `--metrics-compat vllm`), the drain timeout from `ServerConfig`.
"""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client.parser import text_string_to_metric_families

from loraplex.config import ServerConfig
from loraplex.engine.stats import EngineSnapshot
from loraplex.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
GATEWAY = DEPLOY / "gateway"
YAML_FILES = sorted([*K8S.glob("*.y*ml"), *GATEWAY.glob("*.y*ml")])

CUSTOM_KINDS = {"ServiceMonitor", "InferencePool", "HTTPRoute"}
CONFIG_KINDS = {"Kustomization", "EndpointPickerConfig"}  # read by kustomize and the picker, not the API server
POOL_GROUP = "inference.networking.k8s.io"
ENGINE_LABEL = "llm-d.ai/engine-type"
SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"}
# The picker's built-in `vllm` mapping, used for pods without the engine-type label.
VLLM_DEFAULT_SPECS = (
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
)  # fmt: skip


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects(directory: Path) -> list[tuple[Path, dict]]:
    """(file, object) for every Kubernetes object in `directory`, kustomizations and picker configs aside."""
    return [
        (path, doc)
        for path in YAML_FILES
        if path.parent == directory
        for doc in documents(path)
        if "apiVersion" in doc and "kind" in doc and doc["kind"] not in CONFIG_KINDS
    ]


ALL_OBJECTS = objects(K8S) + objects(GATEWAY)


def the(kind: str, directory: Path, name: str | None = None) -> dict:
    found = [doc for _, doc in objects(directory) if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {directory}, found {len(found)}"
    return found[0]


def config(directory: Path, kind: str) -> dict:
    found = [doc for path in YAML_FILES if path.parent == directory for doc in documents(path) if doc.get("kind") == kind]
    assert len(found) == 1
    return found[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` arguments as {name: value}."""
    parsed, pending = {}, None
    for arg in args:
        if pending is not None:
            parsed[pending], pending = arg, None
        elif arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            parsed[name] = value
        elif arg.startswith("--"):
            pending = arg[2:]
    return parsed


def is_subset(labels: dict, of: dict) -> bool:
    return bool(labels) and all(of.get(key) == value for key, value in labels.items())


SERVER = the("Deployment", K8S, "loraplex")
SERVER_POD = SERVER["spec"]["template"]["spec"]
SERVER_CONTAINER = container(SERVER)
SERVER_PORTS = {port["name"]: port["containerPort"] for port in SERVER_CONTAINER["ports"]}
SERVER_ARGS = flags(SERVER_CONTAINER["args"])
PICKER_CONFIG = config(GATEWAY, "EndpointPickerConfig")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name a server started with --metrics-compat vllm exposes."""
    text = Metrics(lambda: EngineSnapshot(), "vllm", "base").render()[0].decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


# ----- every file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_yaml_file_parses(path):
    assert documents(path)


@pytest.mark.parametrize(
    "doc", [doc for _, doc in ALL_OBJECTS if doc["kind"] not in CUSTOM_KINDS], ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}"
)
def test_built_in_kinds_validate_strictly_against_the_newest_bundled_kubernetes(doc):
    kubernetes_validate.validate(doc, latest_version(), strict=True)


@pytest.mark.parametrize("doc", [doc for _, doc in ALL_OBJECTS if doc["kind"] in CUSTOM_KINDS], ids=lambda doc: doc["kind"])
def test_custom_resources_name_their_api_version_kind_and_name(doc):
    assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/v\w+", doc["apiVersion"])
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("directory", [K8S, GATEWAY], ids=lambda path: path.name)
def test_each_kustomization_lists_exactly_its_directorys_manifests(directory):
    kustomization = config(directory, "Kustomization")
    assert set(kustomization["resources"]) == {path.name for path, _ in objects(directory)}
    generated = [file for generator in kustomization.get("configMapGenerator", []) for file in generator["files"]]
    assert all((directory / file.split("=")[-1]).is_file() for file in generated)


# ----- the model server ---------------------------------------------------------------------------


def test_the_server_gets_one_gpu():
    assert SERVER_CONTAINER["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_host_tier_budget_leaves_most_of_the_memory_limit_to_the_process():
    limit = SERVER_CONTAINER["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert 0 < int(SERVER_ARGS["max-cpu-lora-bytes"]) <= int(limit[:-2]) * (1 << 30) // 2


def test_the_server_listens_on_all_interfaces_at_its_container_port():
    assert SERVER_ARGS["host"] == "0.0.0.0"
    assert int(SERVER_ARGS["port"]) == SERVER_PORTS["http"] == 8000


def test_the_server_exports_vllms_metric_names_so_a_stock_picker_works():
    assert SERVER_ARGS["metrics-compat"] == "vllm"


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_health_on_the_http_port(probe):
    check = SERVER_CONTAINER[probe]["httpGet"]
    assert check["path"] == "/health"
    assert check["port"] in ("http", SERVER_PORTS["http"])


def test_the_startup_probe_allows_ten_minutes_for_the_model_to_load():
    probe = SERVER_CONTAINER["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_the_grace_period_outlasts_the_prestop_sleep_and_the_drain():
    drain = float(SERVER_ARGS.get("drain-timeout", ServerConfig.model_fields["drain_timeout"].default))
    pre_stop = SERVER_CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert SERVER_POD["terminationGracePeriodSeconds"] > pre_stop + drain


def test_the_server_runs_as_a_non_root_user():
    context = SERVER_POD["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert SERVER_CONTAINER["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_adapter_store_is_a_shared_claim_mounted_where_the_server_looks():
    mounts = {mount["name"]: mount["mountPath"] for mount in SERVER_CONTAINER["volumeMounts"]}
    volumes = [volume for volume in SERVER_POD["volumes"] if "persistentVolumeClaim" in volume]
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in volumes}
    (volume,) = [name for name, path in mounts.items() if path == SERVER_ARGS["adapters"]]
    claim = the("PersistentVolumeClaim", K8S, claims[volume])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_the_model_comes_from_a_read_only_claim():
    (mount,) = [mount for mount in SERVER_CONTAINER["volumeMounts"] if SERVER_ARGS["model"].startswith(mount["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [volume for volume in SERVER_POD["volumes"] if volume["name"] == mount["name"]]
    the("PersistentVolumeClaim", K8S, volume["persistentVolumeClaim"]["claimName"])


def test_the_service_selects_the_server_pods_and_names_its_port_http():
    service = the("Service", K8S, "loraplex")
    assert is_subset(service["spec"]["selector"], pod_labels(SERVER))
    (port,) = [port for port in service["spec"]["ports"] if port["name"] == "http"]
    assert port["port"] == 8000 and port["targetPort"] in ("http", SERVER_PORTS["http"])


def test_the_service_monitor_scrapes_metrics_every_5s_on_a_port_the_service_has():
    monitor, service = the("ServiceMonitor", K8S), the("Service", K8S, "loraplex")
    assert is_subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "5s")


def test_the_hpa_scales_the_server_on_a_metric_it_exports(exported):
    hpa = the("HorizontalPodAutoscaler", K8S)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "loraplex"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] in exported


def test_prometheus_adapter_exposes_the_hpas_metric_per_pod():
    name = the("HorizontalPodAutoscaler", K8S)["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = [rule for rule in documents(K8S / "prometheus-adapter-values.yaml")[0]["rules"]["custom"] if rule["name"]["as"] == name]
    assert len(rules) == 1 and rules[0]["seriesQuery"].startswith(name + "{")
    assert {"namespace", "pod"} <= set(rules[0]["resources"]["overrides"])


def test_the_disruption_budget_covers_the_server_pods():
    assert is_subset(the("PodDisruptionBudget", K8S)["spec"]["selector"]["matchLabels"], pod_labels(SERVER))


# ----- the inference gateway ----------------------------------------------------------------------


def test_the_pool_selects_the_server_pods_on_their_container_port():
    pool = the("InferencePool", GATEWAY)
    assert pool["apiVersion"] == f"{POOL_GROUP}/v1"
    assert is_subset(pool["spec"]["selector"]["matchLabels"], pod_labels(SERVER))
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [SERVER_PORTS["http"]]


def test_the_pool_points_at_the_pickers_service_and_grpc_port():
    reference = the("InferencePool", GATEWAY)["spec"]["endpointPickerRef"]
    service = the("Service", GATEWAY, reference["name"])
    assert reference["port"]["number"] in {port["port"] for port in service["spec"]["ports"]}
    assert is_subset(service["spec"]["selector"], pod_labels(the("Deployment", GATEWAY)))


def test_the_route_sends_generation_to_the_pool_and_the_rest_to_the_service():
    route, pool = the("HTTPRoute", GATEWAY), the("InferencePool", GATEWAY)
    backends = [backend for rule in route["spec"]["rules"] for backend in rule["backendRefs"]]
    assert {"group": POOL_GROUP, "kind": "InferencePool", "name": pool["metadata"]["name"]} in backends
    assert {"kind": "Service", "name": "loraplex", "port": 8000} in backends


def test_the_picker_serves_the_pool_with_the_config_the_kustomization_generates():
    picker = the("Deployment", GATEWAY)
    args = flags(container(picker)["args"])
    assert args["pool-name"] == the("InferencePool", GATEWAY)["metadata"]["name"]
    assert args["pool-group"] == POOL_GROUP
    (generator,) = config(GATEWAY, "Kustomization")["configMapGenerator"]
    (config_file,) = generator["files"]
    (volume,) = [volume for volume in picker["spec"]["template"]["spec"]["volumes"] if "configMap" in volume]
    (mount,) = [mount for mount in container(picker)["volumeMounts"] if mount["name"] == volume["name"]]
    assert volume["configMap"]["name"] == generator["name"]
    assert args["config-file"] == f"{mount['mountPath']}/{config_file}"
    assert documents(GATEWAY / config_file) == [PICKER_CONFIG]


def test_the_picker_may_read_what_it_watches():
    picker_pod = the("Deployment", GATEWAY)["spec"]["template"]["spec"]
    account = the("ServiceAccount", GATEWAY, picker_pod["serviceAccountName"])["metadata"]["name"]
    binding = the("RoleBinding", GATEWAY)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    rules = the("Role", GATEWAY, binding["roleRef"]["name"])["rules"]
    granted = {(group, resource) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {("", "pods"), (POOL_GROUP, "inferencepools")} <= granted


def test_the_picker_outlasts_the_servers_drain():
    picker_pod = the("Deployment", GATEWAY)["spec"]["template"]["spec"]
    assert picker_pod["terminationGracePeriodSeconds"] >= SERVER_POD["terminationGracePeriodSeconds"]


# ----- the endpoint picker's configuration --------------------------------------------------------


def plugins() -> dict[str, dict]:
    """The picker's plugins by name (a plugin's name defaults to its type)."""
    return {plugin.get("name", plugin["type"]): plugin for plugin in PICKER_CONFIG["plugins"]}


def extractor() -> dict:
    (found,) = [plugin for plugin in PICKER_CONFIG["plugins"] if plugin["type"] == "core-metrics-extractor"]
    return found["parameters"]


def test_the_picker_config_is_an_endpoint_picker_config():
    assert PICKER_CONFIG["apiVersion"] in ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
    assert PICKER_CONFIG["kind"] == "EndpointPickerConfig"


def test_the_engine_label_the_picker_reads_names_a_mapping_for_the_server_pods():
    label = extractor()["engineLabelKey"]
    assert label == ENGINE_LABEL
    assert pod_labels(SERVER)[label] in {engine["name"] for engine in extractor()["engineConfigs"]}


@pytest.mark.parametrize("field", ["queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"])
def test_every_metric_the_picker_maps_is_exported_under_loraplexs_own_name(field, exported):
    (engine,) = [engine for engine in extractor()["engineConfigs"] if engine["name"] == pod_labels(SERVER)[ENGINE_LABEL]]
    name = engine[field].split("{")[0]
    assert name.startswith("loraplex_") and name in exported


@pytest.mark.parametrize("name", VLLM_DEFAULT_SPECS)
def test_the_pickers_vllm_fallback_names_are_exported_too(name, exported):
    assert name in exported


def test_the_default_profile_scores_by_lora_affinity_queue_and_kv_cache():
    (profile,) = PICKER_CONFIG["schedulingProfiles"]
    used = {plugins()[entry["pluginRef"]]["type"] for entry in profile["plugins"]}
    assert SCORERS <= used


def test_every_plugin_reference_names_a_plugin():
    references = [entry["pluginRef"] for profile in PICKER_CONFIG["schedulingProfiles"] for entry in profile["plugins"]]
    for source in PICKER_CONFIG["dataLayer"]["sources"]:
        references += [source["pluginRef"], *(entry["pluginRef"] for entry in source["extractors"])]
    assert set(references) <= set(plugins())
