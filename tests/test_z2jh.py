"""deploy/z2jh/values.yaml: valid for the z2jh chart (its own schema, tests/data/z2jh/),
and the same hub configuration as deploy/jupyterhub/jupyterhub_config.py, which the
end-to-end tests run: same roles, scope, service, hook and single-user environment."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from jupyterhub.services.service import Service
from traitlets.config import Config

import presence

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
Z2JH = ROOT / "deploy" / "z2jh"
DATA = ROOT / "tests" / "data" / "z2jh"
TESTED = ROOT / "deploy" / "jupyterhub" / "jupyterhub_config.py"
CHART_VERSION = "4.4.0"  # tests/data/z2jh/SOURCE.md
# deploy/kubernetes/: the Service `presence` on port 8000 serves under this base path,
# its pods carry these labels, and the Secret `presence` has these keys.
PRESENCE_URL = "http://presence:8000"
BASE_PATH = "/services/presence"
PRESENCE_PODS = {"app.kubernetes.io/name": "presence", "app.kubernetes.io/component": "server"}
SECRET = {"PRESENCE_SECRET": "z2jh-test-secret-long-enough", "JUPYTERHUB_API_TOKEN": "t0ken"}

Values = dict[str, Any]
VALUES: Values = yaml.safe_load((Z2JH / "values.yaml").read_text())
DEFAULTS: Values = yaml.safe_load((DATA / "values.yaml").read_text())
SCHEMA: Values = json.loads((DATA / "values.schema.json").read_text())


def helm_merge(defaults: Values, values: Values) -> Values:
    """What Helm validates and renders: the user's values over the chart's, maps merged
    key by key, anything else (lists too) replaced, and null deleting a default."""
    merged = copy.deepcopy(defaults)
    for key, value in values.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def schema_errors(values: Values) -> list[str]:
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    found = validator.iter_errors(helm_merge(DEFAULTS, values))
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found)


def with_value(path: str, value: Any) -> Values:
    """VALUES with one more (or one changed) value at a dotted path."""
    values = copy.deepcopy(VALUES)
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


def dockerfile_arg(text: str, name: str) -> str:
    return str(re.findall(rf"^ARG {name}=(.+)$", text, re.M)[0])


def run_config(code: str, name: str, c: Config) -> None:
    exec(compile(code, name, "exec"), {"get_config": lambda: c, "c": c})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Config:
    """What the chart's jupyterhub_config.py makes of these values (hub.services,
    hub.loadRoles, hub.extraEnv from the Secret `presence`), then hub.extraConfig."""
    values = helm_merge(DEFAULTS, VALUES)["hub"]
    for name, env in values["extraEnv"].items():
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "presence", name
        monkeypatch.setenv(name, SECRET[ref["key"]])
    c = Config()
    c.JupyterHub.services = [
        {"name": key, **{k: v for k, v in s.items() if k != "apiToken"}, "api_token": "chart's"}
        for key, s in values["services"].items()
    ]
    c.JupyterHub.load_roles = [{"name": key, **role} for key, role in values["loadRoles"].items()]
    for section, traits in values.get("config", {}).items():  # hub.config, as the chart does
        for name, value in traits.items():
            setattr(c[section], name, value)
    for key, code in sorted(values["extraConfig"].items()):
        run_config(code, f"hub.extraConfig.{key}", c)
    return c


@pytest.fixture
def tested(monkeypatch: pytest.MonkeyPatch) -> Config:
    """deploy/jupyterhub/jupyterhub_config.py, anonymous, with presence where z2jh has it."""
    monkeypatch.setenv("PRESENCE_SECRET", SECRET["PRESENCE_SECRET"])
    monkeypatch.setenv("PRESENCE_SERVICE_URL", PRESENCE_URL)
    monkeypatch.setenv("PRESENCE_ANONYMOUS", "true")
    c = Config()
    run_config(TESTED.read_text(), str(TESTED), c)
    return c


def test_the_values_are_valid_for_the_chart() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert schema_errors({}) == []  # the chart's defaults alone
    assert schema_errors(VALUES) == []
    # The chart also takes a service token in the values (not ours: the Secret's).
    assert schema_errors(with_value("hub.services.presence.apiToken", "x" * 64)) == []


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("hub.servces", {}, "'servces' was unexpected"),
        ("singleuser.networkPolicy.egres", [], "'egres' was unexpected"),
        ("hub.image.tag", 440, "440 is not of type 'string'"),
        ("singleuser.extraEnv", "PRESENCE_JUPYTER_URL", "is not of type 'object', 'array'"),
    ],
)
def test_the_schema_refuses_mistakes(path: str, value: Any, error: str) -> None:
    assert any(error in e for e in schema_errors(with_value(path, value)))


def test_same_roles_scopes_and_service_as_the_tested_config(hub: Config, tested: Config) -> None:
    assert hub.JupyterHub.load_roles == tested.JupyterHub.load_roles
    assert hub.JupyterHub.custom_scopes == tested.JupyterHub.custom_scopes
    # What JupyterLab's sharing needs of the servers' login tokens.
    assert hub.Spawner.oauth_client_allowed_scopes == ["shares!server"]
    assert hub.Spawner.oauth_client_allowed_scopes == tested.Spawner.oauth_client_allowed_scopes
    [service] = hub.JupyterHub.services
    [managed] = tested.JupyterHub.services
    # The tested hub starts presence itself (command, environment); here it is a Deployment.
    assert {k: v for k, v in service.items() if k != "api_token"} == {
        k: v for k, v in managed.items() if k not in ("command", "environment")
    }
    assert service["api_token"] == SECRET["JUPYTERHUB_API_TOKEN"]  # presence's own token
    unknown = set(service) - set(Service.class_traits(input=True))
    assert not unknown, f"JupyterHub refuses these service fields: {unknown}"


def test_same_faces_as_the_tested_config(hub: Config, tested: Config) -> None:
    hooks: list[Callable[..., Values]] = [
        hub.Authenticator.post_auth_hook,
        tested.Authenticator.post_auth_hook,
    ]
    ada = [hook(None, None, {"name": "ada", "user_info": {}})["user_info"] for hook in hooks]
    assert ada[0] == ada[1]
    assert ada[0]["name"] != "ada"  # anonymous


def test_single_user_servers_reach_presence(tested: Config) -> None:
    singleuser, hub = VALUES["singleuser"], VALUES["hub"]
    assert singleuser["extraEnv"] == tested.Spawner.environment
    assert hub["services"]["presence"]["url"] == PRESENCE_URL
    assert singleuser["extraEnv"]["PRESENCE_JUPYTER_URL"] == PRESENCE_URL + BASE_PATH
    # z2jh keeps single-user servers off private IPs: one rule opens presence, only.
    to_presence = {
        "to": [{"podSelector": {"matchLabels": PRESENCE_PODS}}],
        "ports": [{"port": urlsplit(PRESENCE_URL).port, "protocol": "TCP"}],
    }
    merged = helm_merge(DEFAULTS, VALUES)
    for policy in (merged["hub"], merged["proxy"]["chp"], merged["singleuser"]):
        assert to_presence in policy["networkPolicy"]["egress"]
    assert merged["singleuser"]["networkPolicy"]["egressAllowRules"]["privateIPs"] is False


def test_the_images_are_the_charts_with_presence() -> None:
    hub_file = (Z2JH / "hub.Dockerfile").read_text()
    singleuser_file = (Z2JH / "singleuser.Dockerfile").read_text()
    assert f"ARG Z2JH_VERSION={CHART_VERSION}\n" in hub_file
    assert f"FROM {DEFAULTS['hub']['image']['name']}:${{Z2JH_VERSION}}\n" in hub_file
    # presence from the checkout (the build context: tests/test_image.py checks what
    # .dockerignore lets in), with the extension's extra on the single-user side.
    assert 'pip install --no-cache-dir /tmp/presence "jupyterhub==' in hub_file
    assert 'pip install --no-cache-dir "/tmp/presence[jupyter]" "jupyterhub==' in singleuser_file
    # One JupyterHub version in both images; the values' tags name this presence.
    name = "JUPYTERHUB_VERSION"
    assert dockerfile_arg(hub_file, name) == dockerfile_arg(singleuser_file, name)
    hub_tag, singleuser_tag = VALUES["hub"]["image"]["tag"], VALUES["singleuser"]["image"]["tag"]
    assert hub_tag == f"{CHART_VERSION}-presence-{presence.__version__}"
    assert singleuser_tag == f"presence-{presence.__version__}"
    assert f"--version {CHART_VERSION}" in (Z2JH / "README.md").read_text()
