"""deploy/kubernetes: valid Kubernetes for the versions we target, as written and as
kustomize renders it, and consistent with the service (settings, routes, ports, labels)."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from starlette.routing import Mount

from presence import __version__
from presence.access.jupyterhub import HubService
from presence.cli import build_parser
from presence.config import ConfigError, Settings
from presence.server.app import create_app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the current z2jh release (4.x, kubeVersion >=1.28) runs on, and a
# recent one: strict schemas refuse fields a version does not know, so both bound it.
KUBERNETES_VERSIONS = ("1.28.0", "1.35.0")
# The z2jh pods that reach presence, labelled the legacy and the modern way (z2jh 4.1+),
# and some that must not: jupyterhub/templates/_helpers.tpl, KubeSpawner's labels.
Z2JH = {
    component: [
        {"app": "jupyterhub", "component": component, "release": "jhub"},
        {"app.kubernetes.io/name": "jupyterhub", "app.kubernetes.io/component": component},
    ]
    for component in ("hub", "proxy", "singleuser-server", "autohttps", "user-scheduler")
}
# uvicorn's wait for open connections after SIGTERM (presence/cli.py).
GRACEFUL = re.search(r"timeout_graceful_shutdown=(\d+)", (ROOT / "presence/cli.py").read_text())

# Rendered documents by kind and name.
Docs = dict[tuple[str, str], Any]


def manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return data


def validate(doc: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) matches."""
    wanted = selector.get("matchLabels", {}).items()
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), "only In is checked here"
    return all(labels.get(k) == v for k, v in wanted) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    """`kubectl kustomize` of a copy with presence.env made from the example, by kind and
    name."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: run scripts/install-test-deps.sh")
    copy = tmp_path_factory.mktemp("kustomize") / "kubernetes"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("presence.env"))
    shutil.copy(copy / "presence.env.example", copy / "presence.env")
    out = subprocess.run(
        [kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: Docs = {}
    for doc in yaml.safe_load_all(out.stdout):
        key = doc["kind"], doc["metadata"]["name"]
        assert key not in result
        result[key] = doc
    return result


def pod_spec(rendered: Docs, kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = rendered[kind, name]["spec"]["template"]["spec"]
    return spec


def presence_env(rendered: Docs) -> dict[str, str]:
    """The presence container's environment: ConfigMap, then Secret, then its own env."""
    (container,) = pod_spec(rendered, "Deployment", "presence")["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= rendered["ConfigMap", source["configMapRef"]["name"]]["data"]
        else:
            secret = rendered["Secret", source["secretRef"]["name"]]
            env |= {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return env | {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.unit
def test_every_manifest_is_valid_and_listed_in_the_kustomization() -> None:
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc)
    assert sorted(kustomization()["resources"]) == [p.name for p in manifests()]


@pytest.mark.unit
def test_the_secret_is_generated_from_an_env_file_with_both_keys() -> None:
    (generator,) = kustomization()["secretGenerator"]
    assert generator["name"] == "presence"
    example = env_file(DEPLOY / (generator["env"] + ".example"))
    assert {"PRESENCE_SECRET", "JUPYTERHUB_API_TOKEN"} <= set(example)
    # The hub reads it by this name too (deploy/z2jh/values.yaml): no hash suffix.
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True


@pytest.mark.e2e
def test_rendered_documents_are_valid(rendered: Docs) -> None:
    for doc in rendered.values():
        validate(doc)
    assert {kind for kind, _ in rendered} == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    }
    assert ("Secret", "presence") in rendered  # the name the hub's values refer to


@pytest.mark.e2e
def test_environment_is_what_the_service_accepts(rendered: Docs) -> None:
    (container,) = pod_spec(rendered, "Deployment", "presence")["containers"]
    assert container["image"] == f"presence:{__version__}"
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    env = presence_env(rendered)
    known = {var for _, var, *_ in Settings.options()}
    unknown = {var for var in env if var.startswith("PRESENCE_")} - known
    assert not unknown, f"variables the service ignores: {unknown}"
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    with pytest.raises(ConfigError, match="use at least 32"):  # the example's placeholder
        Settings.load(flags, env)
    env["PRESENCE_SECRET"] = secrets.token_hex(32)  # what the admin puts there
    settings = Settings.load(flags, env)
    assert settings.auth == "jupyterhub"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.redis_url == "redis://presence-redis:6379/0"
    assert settings.base_path == "/services/presence" and settings.jupyterhub_anonymous
    service = HubService.from_env(env)
    assert service.name == "presence"
    assert service.api_url == "http://hub:8081/hub/api"
    assert service.callback_url == f"{settings.base_path}/oauth_callback"
    assert env["PRESENCE_SECRET"] and env["JUPYTERHUB_API_TOKEN"]  # from the Secret


@pytest.mark.e2e
def test_probes_and_metrics_are_routes_of_the_app(rendered: Docs) -> None:
    env = presence_env(rendered)
    base = env["PRESENCE_BASE_PATH"]
    (mount,) = create_app(Settings(base_path=base)).routes
    assert isinstance(mount, Mount)
    paths = {mount.path + getattr(route, "path", "") for route in mount.routes}
    template = rendered["Deployment", "presence"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == f"{base}/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == f"{base}/healthz"
    assert {f"{base}/readyz", f"{base}/healthz", f"{base}/metrics"} <= paths
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert annotations["prometheus.io/port"] == env["PRESENCE_PORT"]


@pytest.mark.e2e
def test_selectors_and_ports_agree(rendered: Docs) -> None:
    for kind, name, component in [
        ("Deployment", "presence", "server"),
        ("StatefulSet", "presence-redis", "redis"),
    ]:
        workload = rendered[kind, name]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component
        assert selects(workload["spec"]["selector"], labels)
        if component == "server":
            # The autoscaler owns the count (minReplicas, below): a count here would be
            # put back by every `kubectl apply`, killing the pods it added.
            assert "replicas" not in workload["spec"]
        else:
            assert workload["spec"]["replicas"] == 1
        assert (
            rendered["Service", name]["spec"]["selector"]
            == workload["spec"]["selector"]["matchLabels"]
        )
        assert selects(rendered["NetworkPolicy", name]["spec"]["podSelector"], labels)
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        (port,) = container["ports"]
        (service_port,) = rendered["Service", name]["spec"]["ports"]
        assert service_port["targetPort"] == port["name"]
        assert service_port["port"] == port["containerPort"]
    server = rendered["Deployment", "presence"]["spec"]["template"]["metadata"]["labels"]
    redis = rendered["StatefulSet", "presence-redis"]["spec"]["template"]["metadata"]["labels"]
    assert rendered["Service", "presence"]["spec"]["ports"][0]["port"] == 8000  # z2jh values
    assert selects(rendered["PodDisruptionBudget", "presence"]["spec"]["selector"], server)
    hpa = rendered["HorizontalPodAutoscaler", "presence"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "presence",
    }
    assert hpa["minReplicas"] >= 2
    (redis_in,) = rendered["NetworkPolicy", "presence-redis"]["spec"]["ingress"]
    assert [selects(peer["podSelector"], server) for peer in redis_in["from"]] == [True]
    egress = rendered["NetworkPolicy", "presence"]["spec"]["egress"]
    assert any(selects(p["podSelector"], redis) for rule in egress for p in rule.get("to", []))


@pytest.mark.e2e
def test_only_the_hub_its_proxy_and_servers_reach_presence(
    rendered: Docs,
) -> None:
    policy = rendered["NetworkPolicy", "presence"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    for component, label_sets in Z2JH.items():
        for labels in label_sets:
            allowed = any(selects(peer["podSelector"], labels) for peer in rule["from"])
            assert allowed == (component in ("hub", "proxy", "singleuser-server")), labels
    to_hub = [r for r in policy["egress"] if r["ports"] == [{"port": 8081, "protocol": "TCP"}]]
    (hub_rule,) = to_hub
    for labels in Z2JH["hub"]:
        assert any(selects(peer["podSelector"], labels) for peer in hub_rule["to"])
    # z2jh's hub NetworkPolicy admits pods with this label to its API.
    template = rendered["Deployment", "presence"]["spec"]["template"]
    assert template["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"


@pytest.mark.e2e
def test_pods_run_locked_down_and_stop_gracefully(
    rendered: Docs,
) -> None:
    for kind, name in [("Deployment", "presence"), ("StatefulSet", "presence-redis")]:
        spec = pod_spec(rendered, kind, name)
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["enableServiceLinks"] is False  # no PRESENCE_PORT=tcp://… from Services
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    spec = pod_spec(rendered, "Deployment", "presence")
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    (container,) = spec["containers"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert GRACEFUL is not None
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + int(GRACEFUL.group(1))
