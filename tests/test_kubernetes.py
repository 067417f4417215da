"""deploy/kubernetes: every kustomization renders with ``kubectl kustomize``, its core objects validate strictly
against the Kubernetes API's schemas (kubernetes-validate), and the rendered objects keep the promises the
manifests make: probe paths, the GPU limit, read-only mounts, the grace period against the service's own drain.

No cluster is reachable here. The KEDA ScaledObject and the Prometheus Operator's ServiceMonitor are custom
resources whose schemas kubernetes-validate does not carry: they are checked field by field below instead.

``scripts/kubernetes-tools.sh`` installs the tools; without them these tests skip, or fail when
``RERANKER_REQUIRE_KUBERNETES_TOOLS=1`` (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings
from app.metrics import QUEUE_DEPTH
from tests.utils import REPO_ROOT

KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
RENDERED = ("base", "overlays/gpu", "overlays/cpu")
OVERLAYS = ("overlays/gpu", "overlays/cpu")
# The oldest minor the managed offerings still run and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
MIN_KUBECTL_MINOR = 27  # kustomize v5: components, inline patches
SERVER_CONTAINER = "bge-reranker"


def missing_tool(reason: str) -> None:
    if os.environ.get("RERANKER_REQUIRE_KUBERNETES_TOOLS") == "1":
        pytest.fail(f"{reason} and RERANKER_REQUIRE_KUBERNETES_TOOLS=1 (run scripts/kubernetes-tools.sh)")
    pytest.skip(f"{reason} (scripts/kubernetes-tools.sh installs it)")


def kubectl_minor(binary: str) -> int | None:
    try:
        out = subprocess.run([binary, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
        return int(re.sub(r"\D", "", json.loads(out.stdout)["clientVersion"]["minor"]))
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        return None


@cache
def find_kubectl() -> str | None:
    """The first kubectl recent enough: $RERANKER_KUBECTL, .tools/bin (scripts/kubernetes-tools.sh), PATH."""
    candidates = [os.environ.get("RERANKER_KUBECTL"), str(REPO_ROOT / ".tools" / "bin" / "kubectl")]
    candidates.append(shutil.which("kubectl"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            minor = kubectl_minor(candidate)
            if minor is not None and minor >= MIN_KUBECTL_MINOR:
                return candidate
    return None


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed")
    return kubernetes_validate


@cache
def rendered_text(kustomization: str) -> str:
    kubectl = find_kubectl()
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES_DIR / kustomization)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # A deprecated field would print a warning here: the manifests use none.
    assert result.stderr.strip() == "", result.stderr
    return result.stdout


def render(kustomization: str) -> list[dict[str, Any]]:
    if find_kubectl() is None:
        missing_tool(f"no kubectl >= 1.{MIN_KUBECTL_MINOR} (with kustomize v5)")
    return [document for document in yaml.safe_load_all(rendered_text(kustomization)) if document]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [item for item in objects if item["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(pod_spec: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["initContainers" if init else "containers"] if c["name"] == name]
    return found


def settings_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    config_map = only(objects, "ConfigMap")
    assert config_map["metadata"]["name"].startswith("bge-reranker-settings-"), "generated with a content hash"
    return dict(config_map["data"])


def setting(objects: list[dict[str, Any]], name: str) -> int:
    """A service setting as the replicas get it: the ConfigMap's value, else the service's own default."""
    value = settings_of(objects).get(f"RERANKER_{name.upper()}")
    return int(value) if value is not None else int(Settings.model_fields[name].default)


def every_container(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for item in objects:
        if item["kind"] in ("Deployment", "Job"):
            spec = item["spec"]["template"]["spec"]
            for each in spec.get("initContainers", []) + spec["containers"]:
                found.append((f"{item['kind']}/{each['name']}", each))
    return found


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- rendering and schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", RENDERED)
def test_every_kustomization_renders_to_the_expected_objects(kustomization: str) -> None:
    objects = render(kustomization)
    kinds = sorted(item["kind"] for item in objects)
    core = ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    expected = core if kustomization == "base" else sorted([*core, "ScaledObject", "ServiceMonitor"])
    assert kinds == expected


def test_every_kustomization_in_the_tree_is_rendered_here() -> None:
    found = {
        str(path.parent.relative_to(KUBERNETES_DIR))
        for path in KUBERNETES_DIR.rglob("kustomization.yaml")
        if yaml.safe_load(path.read_text()).get("kind") == "Kustomization"
    }
    assert found == set(RENDERED)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", RENDERED)
def test_core_objects_validate_strictly_against_the_api_schemas(kustomization: str, version: str) -> None:
    kubernetes_validate = validator()
    objects = render(kustomization)
    custom = [item for item in objects if (item["apiVersion"], item["kind"]) in CUSTOM_RESOURCES]
    core = [item for item in objects if (item["apiVersion"], item["kind"]) not in CUSTOM_RESOURCES]
    assert len(custom) == (0 if kustomization == "base" else 2)
    for item in core:
        # Raises ValidationError on an unknown field, a wrong type or a missing required field.
        kubernetes_validate.validate(item, version, strict=True)


def test_the_strict_validation_rejects_a_misspelt_field() -> None:
    """The control for the test above: the validator in use does reject what a cluster would."""
    kubernetes_validate = validator()
    deployment = only(render("overlays/cpu"), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(deployment))
    server = container(broken["spec"]["template"]["spec"], SERVER_CONTAINER)
    server["readinessProbes"] = server.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# --- the Deployment -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", RENDERED)
def test_probes_ask_ready_and_health_on_the_service_port(kustomization: str) -> None:
    objects = render(kustomization)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    server = container(pod, SERVER_CONTAINER)
    assert server["ports"] == [{"name": "http", "containerPort": 9300, "protocol": "TCP"}]
    assert Settings.model_fields["port"].default == 9300
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    # Model load, warm-up and CUDA graph capture: as long as gunicorn itself lets a worker take.
    startup_window = startup["periodSeconds"] * startup["failureThreshold"]
    assert startup_window >= setting(objects, "worker_timeout") >= 300
    # A liveness failure during a long forward pass must not restart a busy replica: 30 s of silence at least.
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


@pytest.mark.parametrize("kustomization", RENDERED)
def test_the_grace_period_covers_the_endpoint_removal_and_the_drain(kustomization: str) -> None:
    objects = render(kustomization)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(pod, SERVER_CONTAINER)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_seconds = int(pre_stop[1])
    assert pre_stop_seconds >= 5, "kube-proxy and ingress controllers take seconds to drop an endpoint"
    graceful_timeout = setting(objects, "graceful_timeout")
    assert graceful_timeout == 30
    # The workers' drain, then the engine processes' stop (app/gunicorn_conf.py's on_exit, bounded by the same
    # timeout), all after the preStop sleep, which the grace period counts too.
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + 2 * graceful_timeout


@pytest.mark.parametrize("kustomization", RENDERED)
def test_every_container_runs_unprivileged_on_a_read_only_root(kustomization: str) -> None:
    objects = render(kustomization)
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    image_uid = int(re.search(r"ARG APP_UID=(\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    for item in objects:
        if item["kind"] in ("Deployment", "Job"):
            pod = item["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == image_uid
            assert pod["automountServiceAccountToken"] is False
    containers = every_container(objects)
    assert len(containers) == 3  # the server, its wait-for-model init container, the fetch Job
    for name, each in containers:
        security = each["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name


@pytest.mark.parametrize("kustomization", RENDERED)
def test_the_model_is_fetched_once_by_the_job_and_mounted_read_only(kustomization: str) -> None:
    objects = render(kustomization)
    claim = only(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = only(objects, "Job")["spec"]["template"]["spec"]
    (fetch,) = job["containers"]
    assert "python -m app.fetch" in " ".join(fetch["command"])
    assert [v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v] == [
        claim["metadata"]["name"]
    ]
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    (model_volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert model_volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    model_path = settings_of(objects)["RERANKER_MODEL_PATH"]
    for each in (container(pod, SERVER_CONTAINER), container(pod, "wait-for-model", init=True)):
        (mount,) = [m for m in each["volumeMounts"] if m["name"] == model_volume["name"]]
        assert mount["readOnly"] is True
        assert model_path.startswith(mount["mountPath"] + "/")
        # No download at serving time: the image is offline, and nothing here turns that off.
        assert "HF_HUB_OFFLINE" not in {env["name"] for env in each.get("env", [])}
        assert "app.fetch" not in " ".join(each.get("command", []))
    assert re.search(r"^\s+HF_HUB_OFFLINE=1 ", (REPO_ROOT / "docker" / "Dockerfile").read_text(), re.MULTILINE)


@pytest.mark.parametrize("kustomization", RENDERED)
def test_every_container_states_requests_and_limits(kustomization: str) -> None:
    for name, each in every_container(render(kustomization)):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(each["resources"][bound]), f"{name} {bound}"
        assert quantity(each["resources"]["requests"]["memory"]) <= quantity(each["resources"]["limits"]["memory"])


def test_the_gpu_overlay_asks_one_gpu_per_replica_on_gpu_nodes() -> None:
    objects = render("overlays/gpu")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    resources = container(pod, SERVER_CONTAINER)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert settings_of(objects)["RERANKER_DEVICE"] == "cuda"
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")


def test_the_cpu_overlay_asks_no_gpu_and_caps_cpu_at_its_request() -> None:
    objects = render("overlays/cpu")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    resources = container(pod, SERVER_CONTAINER)["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    # app/cpus.py sizes the threads from the CPU quota: the quota is what the replica is planned for.
    assert quantity(resources["limits"]["cpu"]) == quantity(resources["requests"]["cpu"]) == 2
    assert quantity(resources["requests"]["memory"]) >= 1_600 * 2**20  # the README's peak worker RSS
    assert settings_of(objects)["RERANKER_DEVICE"] == "cpu"
    assert container(pod, SERVER_CONTAINER)["image"].endswith(":0.2.0-cpu")


# --- Service, disruption budget, rollout ----------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", RENDERED)
def test_the_service_reaches_only_the_serving_pods_by_name_on_9300(kustomization: str) -> None:
    objects = render(kustomization)
    service = only(objects, "Service")
    name = service["metadata"]["name"]
    # RAGFlow looks for "/rerank" in the base URL: http://rerank...:9300/v1 would send it to the wrong path.
    assert not name.startswith("rerank")
    assert "/rerank" not in f"http://{name}:9300/v1"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 9300, "targetPort": "http", "protocol": "TCP"}]
    selector = service["spec"]["selector"]
    deployment = only(objects, "Deployment")
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= only(objects, "Job")["spec"]["template"]["metadata"]["labels"].items()
    budget = only(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert budget["spec"]["maxUnavailable"] == 1
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)


# --- custom resources, checked field by field -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_follows_the_queue_with_keda(overlay: str) -> None:
    objects = render(overlay)
    scaled = only(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    deployment = only(objects, "Deployment")
    # The autoscaler owns the count: a count in the Deployment would be reset by each `kubectl apply`.
    assert "replicas" not in deployment["spec"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    budget = only(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert spec["minReplicaCount"] - budget >= 1, "a drain or an upgrade must leave a replica serving"
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) == {"serverAddress", "query", "threshold"}
    assert metadata["serverAddress"].startswith("http")
    queue_metric = QUEUE_DEPTH._name  # the gauge app/metrics.py exports
    assert queue_metric == "reranker_queue_depth"
    assert re.fullmatch(
        rf'sum\(avg_over_time\({queue_metric}\{{job="{only(objects, "Service")["metadata"]["name"]}"\}}\[1m\]\)\)',
        metadata["query"],
    )
    expected = {"overlays/gpu": "512", "overlays/cpu": "64"}[overlay]
    assert metadata["threshold"] == expected
    # 512 = two full forward passes at the default batch; the CPU threshold is below one.
    assert Settings.model_fields["max_batch_pairs"].default * 2 == 512
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_every_replica(overlay: str) -> None:
    objects = render(overlay)
    monitor = only(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = only(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert quantity(endpoint["scrapeTimeout"][:-1]) < quantity(endpoint["interval"][:-1])
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9300",
        "prometheus.io/path": "/metrics",
    }


def test_the_grafana_dashboard_selects_pods() -> None:
    """Per pod: a "pod" variable (every pod by default; also matching Compose's series, which have no pod label),
    every query filtered by it, and the per-replica panels split by it."""
    dashboard = json.loads((REPO_ROOT / "docker" / "grafana" / "bge-reranker-dashboard.json").read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    pod = variables["pod"]
    assert pod["includeAll"] is True and pod["multi"] is True
    assert pod["allValue"] == ".*"
    assert "reranker_" in pod["definition"] and "pod" in pod["definition"]
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for expr in expressions:
        for selector in re.findall(r"reranker_\w+\{([^}]*)\}", expr):
            assert 'pod=~"$pod"' in selector, expr
    per_pod = [
        target
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "by (pod, instance)" in target["expr"] and "{{pod}}" in target.get("legendFormat", "")
    ]
    assert len(per_pod) >= 3
