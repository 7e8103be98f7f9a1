"""The shipped alerts fire on a real Prometheus when the provider fails: `tallygate demo` with the
simulator answering every request with an error (429, or each API's own 5xx), scraped by
Prometheus with deploy/prometheus/rules.yml. Only each alert's `for:` is shortened (to 0s), so the
test takes seconds, not the minutes an alert waits in production: the expressions are the ones
shipped."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from test_observability import needs_prometheus
from test_prometheus import Prometheus, free_port, spawn

from conftest import ROOT


def rules_firing_at_once(folder: Path) -> Path:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


@needs_prometheus
@pytest.mark.parametrize(
    ("status", "expected"),
    [("429", {"TallygateHighErrorRate", "TallygateUpstreamRateLimited"}),
     (None, {"TallygateHighErrorRate", "TallygateUpstreamServerErrors"})],
    ids=["429", "5xx"],
)  # fmt: skip
async def test_upstream_errors_fire_the_shipped_alerts(
    tmp_path: Path, status: str | None, expected: set[str]
) -> None:
    proxy_port, admin_port = free_port(), free_port()
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tallygate", "demo", "--listen", f"127.0.0.1:{proxy_port}",
        "--admin", f"127.0.0.1:{admin_port}", "--ttft", "0", "--error-rate", "1",
        *(["--error-status", status] if status else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_firing_at_once(tmp_path))],
        "scrape_configs": [
            {"job_name": "tallygate", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = Prometheus(port, spawn(tmp_path, port))
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
    firing: set[str] = set()
    try:
        async with aiohttp.ClientSession() as client, asyncio.timeout(90):
            while not expected <= firing:
                for path in ("/v1/chat/completions", "/v1/messages", "/api/chat"):
                    try:
                        async with client.post(
                            f"http://127.0.0.1:{proxy_port}{path}", data=chat
                        ) as r:
                            assert r.status == (int(status) if status else r.status)
                            assert r.status >= 429
                    except aiohttp.ClientConnectionError:
                        pass  # the demo is still starting
                await asyncio.sleep(0.5)
                try:
                    alerts = await prometheus.query(client, 'ALERTS{alertstate="firing"}')
                except aiohttp.ClientConnectionError:
                    continue  # Prometheus is still starting
                firing = {alert["metric"]["alertname"] for alert in alerts}
        assert expected <= firing
        assert "TallygateSpendOverBudget" not in firing  # failed requests cost nothing
    finally:
        prometheus.process.terminate()
        prometheus.process.wait(timeout=10)
        demo.terminate()
        await asyncio.wait_for(demo.wait(), 15)
