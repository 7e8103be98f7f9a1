"""A real Prometheus server scrapes tallygate, and PromQL returns what the usage records say.

Needs the `prometheus` binary (Debian package `prometheus`, installed by .ci/run). Skipped when
it is missing on a developer's machine, never in CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tallygate.policy.tenants import hash_key

from conftest import CASES, FakeUpstream, ProxyFactory, RecordLog

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("CI must install the prometheus package (see .ci/run)")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")

TOKEN = "prom-scrape-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port, self.process = port, process

    async def query(self, session: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query"
        async with session.get(url, params={"query": promql}) as r:
            body = await r.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])


def spawn(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """Start Prometheus with the config in `folder`, its log beside it (a few ms of blocking)."""
    with open(folder / "prometheus.log", "wb") as log:
        return subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture
async def prometheus_for(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Prometheus] = []

    async def launch(admin_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "tallygate",
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                "authorization": {"type": "Bearer", "credentials": TOKEN},
            }],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        started.append(Prometheus(port, spawn(tmp_path, port)))
        return started[-1]

    yield launch
    for prometheus in started:
        prometheus.process.terminate()
        prometheus.process.wait(timeout=10)


async def test_prometheus_scrapes_and_promql_matches_the_records(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, prometheus_for: Any
) -> None:
    stream = next(c for c in CASES if c.id.startswith("046"))  # Anthropic, cache write

    async def anthropic(request: web.Request) -> web.StreamResponse:
        return web.Response(body=stream.body, headers={"Content-Type": "text/event-stream"})

    upstream.handler = anthropic
    running = await make_proxy(
        admin={"listen": "127.0.0.1:0", "metrics_token": TOKEN},
        tenants={"acme": {"keys": [hash_key("k-acme")]}},
    )
    async with aiohttp.ClientSession() as client:
        for key in ("k-acme", "k-acme", "unknown"):
            url = f"http://127.0.0.1:{running.proxy_port}/v1/messages"
            async with client.post(url, data=b"{}", headers={"x-api-key": key}) as r:
                await r.read()
        await records.wait_for(3)
        prometheus = await prometheus_for(running.admin_port)
        results: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while not results:
                await asyncio.sleep(0.5)
                try:
                    results = await prometheus.query(
                        client, 'sum(tallygate_requests_total{job="tallygate"})'
                    )
                except aiohttp.ClientConnectionError:
                    continue  # not listening yet
        assert float(results[0]["value"][1]) == 3
        up = await prometheus.query(client, 'up{job="tallygate"}')
        assert up[0]["value"][1] == "1"

        by_tenant = await prometheus.query(
            client, 'sum by (tenant) (tallygate_tokens_total{type="cache_write_input"})'
        )
        assert {r["metric"]["tenant"]: float(r["value"][1]) for r in by_tenant} == {
            "acme": 2 * 1165,
            "anonymous": 1165,
        }
        cost = await prometheus.query(client, "sum(tallygate_cost_usd_total)")
        assert float(cost[0]["value"][1]) == pytest.approx(
            sum(r["cost_usd"]["total"] for r in records), rel=1e-9
        )
        out = await prometheus.query(client, 'sum(tallygate_bytes_total{direction="client_out"})')
        assert float(out[0]["value"][1]) == sum(r["bytes"]["client_out"] for r in records)
        p50 = await prometheus.query(
            client,
            "histogram_quantile(0.5, sum by (le) (tallygate_time_to_first_token_seconds_bucket))",
        )
        assert 0 < float(p50[0]["value"][1]) < 1
        models = await prometheus.query(client, "count by (model) (tallygate_requests_total)")
        assert [r["metric"]["model"] for r in models] == ["claude-3-5-sonnet"]
