"""The shipped dashboard and Prometheus rules: valid, about metrics tallygate exports, and every
expression returns data from a real Prometheus scraping `tallygate demo` under load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from test_prometheus import Prometheus, free_port, spawn

from conftest import ROOT

PROMTOOL = shutil.which("promtool")
if PROMTOOL is None and os.environ.get("CI"):
    raise RuntimeError("CI must install the prometheus package (see .ci/run)")
needs_prometheus = pytest.mark.skipif(PROMTOOL is None, reason="prometheus is not installed")

DASHBOARD = json.loads((ROOT / "grafana" / "dashboards" / "tallygate.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def rule_exprs() -> list[str]:
    """Recording rules whole; alerts by their left-hand side (an alert that does not fire
    returns nothing, its measure always does)."""
    exprs = []
    for group in RULES["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            if "alert" in rule:
                expr = re.split(r" (?:>|==|<) ", expr, maxsplit=1)[0]
            exprs.append(expr)
    return exprs


@needs_prometheus
def test_promtool_accepts_the_shipped_files() -> None:
    folder = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "rules.yml"], ["check", "config", "prometheus.yml"]):
        done = subprocess.run(
            [PROMTOOL or "promtool", *args], cwd=folder, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_consistent() -> None:
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} == {"upstream", "model", "tenant"}


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from tallygate.observe.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), ["/"], ["u"], [], 5, "x")
    exported = set()
    for family in metrics.families:
        base = family.name
        exported |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    recorded = {
        rule["record"] for group in RULES["groups"] for rule in group["rules"] if "record" in rule
    }
    for expr in dashboard_exprs() + rule_exprs():
        for name in re.findall(r"\b(tallygate(?:_[a-z0-9]+)+)\b", expr):
            assert name in exported, f"{name} is not a metric tallygate exports"
        for name in re.findall(r"\b(tallygate:[a-z0-9_:]+)\b", expr):
            assert name in recorded, f"{name} is not recorded by the rules"


@needs_prometheus
async def test_every_expression_returns_data(tmp_path: Path) -> None:
    """`tallygate demo` (the README's first command) and a real Prometheus: after a short bounded
    load, every dashboard and rule expression returns data."""
    proxy_port, admin_port = free_port(), free_port()
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tallygate", "demo", "--listen", f"127.0.0.1:{proxy_port}",
        "--admin", f"127.0.0.1:{admin_port}", "--ttft", "10ms", "--tokens-per-second", "100",
        "--output-tokens", "30", "--seed", "3",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "tallygate",
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = Prometheus(port, spawn(tmp_path, port))
    base = f"http://127.0.0.1:{proxy_port}"
    chat = json.dumps(
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    unpriced = chat.replace(b"gpt-4o-mini", b"local-model-without-a-price")
    try:
        async with aiohttp.ClientSession() as client:
            async with asyncio.timeout(60):
                while True:  # until Prometheus has scraped the demo once
                    await asyncio.sleep(0.5)
                    try:
                        if await prometheus.query(client, 'up{job="tallygate"} == 1'):
                            break
                    except aiohttp.ClientConnectionError:
                        continue
            for _ in range(3):  # traffic across several scrapes, so rates have something to show
                for path in ("/v1/chat/completions", "/v1/messages", "/api/chat", "/v1/responses"):
                    async with client.post(
                        base + path, data=chat, headers={"Accept-Encoding": "gzip"}
                    ) as r:
                        await r.read()
                # A client that leaves after the first event: the demo drains the rest, so
                # tokens paid for but not delivered have data.
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(chat), chat)
                )
                await reader.readuntil(b"\n\n")
                writer.close()
                await asyncio.sleep(1.5)
            # A model the price table does not know, so unpriced tokens have data.
            async with client.post(base + "/api/chat", data=unpriced) as r:
                await r.read()
            await asyncio.sleep(7)  # the drained streams end, their records land, two scrapes
            empty = []
            for expr in dashboard_exprs() + rule_exprs():
                query = (
                    expr.replace("$upstream", ".*").replace("$model", ".*").replace("$tenant", ".*")
                )
                if not await prometheus.query(client, query):
                    empty.append(query)
            assert not empty, "expressions without data:\n" + "\n".join(empty)
    finally:
        prometheus.process.terminate()
        prometheus.process.wait(timeout=10)
        demo.terminate()
        await asyncio.wait_for(demo.wait(), 15)
