"""The deployment files agree with tallygate: configs load, probes and ports match, grace periods
outlast shutdown_grace. (No container engine here: the image itself is not built in tests.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tallygate.config import Config, load_config_text
from tallygate.config.checks import config_warnings

from conftest import ROOT

DEPLOY = ROOT / "deploy"
ENV = {
    "OPENAI_API_KEY": "sk-test",
    "ANTHROPIC_API_KEY": "sk-ant-test",
    "APPS_KEY_SHA256": "ab" * 32,
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def pod_checks(docs: list[dict[str, Any]], container_name: str) -> tuple[Config, dict[str, Any]]:
    config = load_config_text(by_kind(docs, "ConfigMap")["data"]["config.yaml"], ENV)
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == container_name)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.admin.listen.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    # The ConfigMap's directory, never a subPath: a subPath mount is never updated, and a reload
    # (SIGHUP) would read the old file forever.
    assert str(Path(env["TALLYGATE_CONFIG"]).parent) in mounts
    assert not any("subPath" in m for m in container["volumeMounts"])
    assert config_warnings(config) == []  # no open relay of the provider keys, no dead route
    assert "/tmp" in mounts  # read-only root: the workers' runtime directory lives here
    assert container["securityContext"]["runAsNonRoot"] is True
    return config, pod


def test_sidecar_matches_tallygates_defaults() -> None:
    docs = documents(DEPLOY / "k8s" / "sidecar.yaml")
    config, pod = pod_checks(docs, "tallygate")
    assert config.listen.host == "127.0.0.1"  # only the app in the pod reaches the proxy
    assert (
        config.admin.listen.port == 9464 == Config.__dataclass_fields__["admin"].default.listen.port
    )
    app = next(c for c in pod["containers"] if c["name"] == "app")
    base_url = next(e["value"] for e in app["env"] if e["name"] == "OPENAI_BASE_URL")
    assert base_url == f"http://127.0.0.1:{config.listen.port}/v1"
    assert config.pricing.egress.directions == ("upstream_out",)
    secret_keys = set(by_kind(docs, "Secret")["stringData"])
    assert {"OPENAI_API_KEY"} <= secret_keys


def test_edge_deployment_service_budget_and_autoscaler() -> None:
    docs = documents(DEPLOY / "k8s" / "edge.yaml")
    config, pod = pod_checks(docs, "tallygate")
    labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in pod["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert (
        by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items()
        <= labels.items()
    )
    assert by_kind(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "tallygate"
    monitor = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert config.workers >= 1 and config.listen.host == "0.0.0.0"
    # Keys injected for whoever reaches the Service: only for clients with a tallygate key.
    assert config.require_key and all(u.api_key for u in config.upstreams.values())


def test_dockerfile_and_its_config() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    text = (DEPLOY / "docker" / "config.yaml").read_text()
    config = load_config_text(text, {})
    # On a published port, the image never injects provider keys for anyone who reaches it.
    assert config_warnings(load_config_text(text, ENV)) == []
    assert not any(u.api_key for u in load_config_text(text, ENV).upstreams.values())
    assert f"TALLYGATE_CONFIG={'/etc/tallygate/config.yaml'}" in dockerfile
    assert "COPY deploy/docker/config.yaml /etc/tallygate/config.yaml" in dockerfile
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split()}
    assert exposed == {config.listen.port, config.admin.listen.port}
    assert f"127.0.0.1:{config.admin.listen.port}/healthz" in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "tallygate tokenizers fetch" in dockerfile  # encodings baked in: runs offline


def test_compose_wires_tallygate_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"simulator", "tallygate", "prometheus", "grafana", "load"} <= set(services)
    demo = load_config_text((DEPLOY / "docker" / "demo.yaml").read_text(), {})
    assert demo.upstreams["simulator"].url == "http://simulator:8001"
    assert "0.0.0.0:8001" in services["simulator"]["command"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"tallygate:{demo.admin.listen.port}"
    ]
    for volume in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).resolve().exists(), volume


def test_systemd_unit() -> None:
    unit = (DEPLOY / "systemd" / "tallygate.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)[1])  # type: ignore[index]
    assert stop > load_config_text((ROOT / "config.example.yaml").read_text(), {}).shutdown_grace
    assert (
        "ExecStart=/opt/tallygate/venv/bin/tallygate serve --config /etc/tallygate/config.yaml"
        in unit
    )
    for option in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",  # tests/test_reload.py proves what SIGHUP does
    ):
        assert option in unit
