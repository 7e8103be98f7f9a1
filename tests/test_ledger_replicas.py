"""Two tallygate processes sharing one PostgreSQL ledger, through a database outage."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
from test_ledger import CHAT, stream
from test_ledger_postgres import Cluster, server_binaries

from tallygate.core.pricing import COST_KINDS
from tallygate.ledger.rows import nano
from tallygate.ledger.store import open_store

from conftest import FakeUpstream, start_serve


def restart(cluster: Cluster, port: int) -> None:
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} "
               f"-c unix_socket_directories={cluster.base} -c fsync=off")  # fmt: skip
    started = cluster.run("pg_ctl", "-D", str(cluster.data), "-l", str(cluster.log), "-o",
                          options, "-w", "-t", "60", "start")  # fmt: skip
    assert started.returncode == 0, cluster.log_tail()


async def test_two_processes_share_the_ledger_and_lose_nothing_while_it_is_down(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.handler = stream
    cluster = Cluster(server_binaries())
    try:
        url = cluster.start()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        open_store(url).close()  # the schema, before both start
        procs, ports, logs = [], [], []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            log = tmp_path / name / "usage.jsonl"
            config = {
                "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
                "access_log": str(log), "upstreams": {"main": {"url": upstream.url}},
                "routes": [{"path_prefix": "/", "upstream": "main"}],
                "ledger": {"url": url, "commit_interval": "50ms",
                           "spool": str(tmp_path / name / "spool")},
            }  # fmt: skip
            proc, proxy_port, _, _ = await start_serve(tmp_path / name, config)
            procs.append(proc)
            ports.append(proxy_port)
            logs.append(log)
        failures: list[int] = []
        body = {"model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
        stop = asyncio.Event()

        async def client(proxy_port: int) -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.post(f"http://127.0.0.1:{proxy_port}{CHAT}",
                                            json=body) as r:  # fmt: skip
                        await r.read()
                        if r.status != 200:
                            failures.append(r.status)
                    await asyncio.sleep(0.01)

        clients = [asyncio.create_task(client(p)) for p in ports for _ in range(2)]
        await asyncio.sleep(1)
        down = await asyncio.to_thread(
            cluster.run, "pg_ctl", "-D", str(cluster.data), "-m", "fast", "-w", "stop"
        )
        assert down.returncode == 0
        await asyncio.sleep(10)  # requests go on while the ledger is away
        await asyncio.to_thread(restart, cluster, port)
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*clients)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        assert failures == []
        for name in ("a", "b"):  # each process spooled while the ledger was down, and replayed
            [spool] = (tmp_path / name).glob("spool.*")
            assert spool.read_bytes() == b""
        records = [orjson.loads(line) for log in logs for line in log.read_bytes().splitlines()]
        assert len(records) > 200
        store = open_store(url)
        try:
            rows = list(store.rows())
        finally:
            store.close()
        assert sorted(r.request_id for r in rows) == sorted(r["request_id"] for r in records)
        usage = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tallygate", "usage", "--ledger", url, "--format", "json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        [total] = json.loads(usage.stdout)
        assert total["requests"] == len(records)
        assert total["output_tokens"] == sum(r["tokens"]["output"] for r in records)
        nano_total = sum(nano(r["cost_usd"][kind]) for r in records for kind in COST_KINDS)
        assert total["cost_total"] == f"{nano_total // 10**9}.{nano_total % 10**9:09d}"
    finally:
        cluster.stop()
