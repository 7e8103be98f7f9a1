"""tallygate's benchmark suite: tallygate against a direct connection and nginx, in one run.

    python bench/run.py [--quick] [--out bench/results.md]

What it does (all on 127.0.0.1, bounded in count and time, stops by itself):
- starts the mock upstream (bench/upstream.py), instant and paced;
- starts each target alone: nginx (proxy_buffering off, with and without `gzip on` for
  text/event-stream) and tallygate (plain relay; + metering; + metering and gzip), each pinned to
  core 0 with `taskset`; the load and the upstream run on core 1;
- drives load with h2load (streamed requests/s at concurrency 1, 32 and 256), and with its own
  small clients for time to first byte and for long-lived paced streams;
- measures CPU microseconds per relayed event (the target's own CPU time, from /proc), memory per
  live stream (RSS growth over the idle process), gzip bytes on the wire per event;
- prints a markdown report and writes it to --out.

Needs nginx, h2load (Debian: nginx-light, nghttp2-client) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import upstream as mock  # noqa: E402

REQUEST = json.dumps({
    "model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "Tell me about foxes and dogs."}],
}).encode()  # fmt: skip
EVENTS = len(mock.EVENTS)
PROXY_CORE, LOAD_CORE = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Target:
    name: str
    port: int
    pids: list[int]  # whose CPU and memory count (nginx: its worker; tallygate: its process)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gzip: bool = False
    headers: tuple[str, ...] = ()  # sent with every request (a peer's key or routing headers)

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(args: list[str], core: str | None, log: Path) -> subprocess.Popen[bytes]:
    prefix = ["taskset", "-c", core] if core is not None else []
    with open(log, "ab") as out:
        return subprocess.Popen([*prefix, *args], stdout=out, stderr=subprocess.STDOUT)


def start_upstream(scratch: Path, pace: float) -> Target:
    port = free_port()
    proc = spawn([sys.executable, str(HERE / "upstream.py"), "--port", str(port), "--pace", str(pace)],
                 LOAD_CORE, scratch / "upstream.log")  # fmt: skip
    wait_port(port)
    return Target(f"upstream (pace {pace})", port, [proc.pid], [proc])


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 65536;
pid {scratch}/nginx-{port}.pid;
error_log {scratch}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {scratch}/nginx-body;
    proxy_temp_path {scratch}/nginx-proxy;
    upstream llm {{ server 127.0.0.1:{upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {gzip}
        }}
    }}
}}
"""


def start_nginx(scratch: Path, upstream: int, gzip: bool) -> Target:
    port = free_port()
    conf = scratch / f"nginx-{port}.conf"
    gzip_conf = "gzip on; gzip_types text/event-stream; gzip_proxied any;" if gzip else ""
    conf.write_text(
        NGINX_CONF.format(scratch=scratch, port=port, upstream=upstream, gzip=gzip_conf)
    )
    proc = spawn(["nginx", "-c", str(conf), "-p", str(scratch), "-g", "daemon off; master_process on;"],
                 PROXY_CORE, scratch / "nginx.log")  # fmt: skip
    wait_port(port)
    time.sleep(0.2)
    workers = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    name = "nginx, gzip" if gzip else "nginx"
    return Target(name, port, [int(p) for p in workers] or [proc.pid], [proc], gzip)


def bare_command(port: int, upstream: int, gzip: bool) -> list[str]:
    return [sys.executable, str(HERE / "bare_relay.py"), "--port", str(port),
            "--upstream", str(upstream), *(["--gzip"] if gzip else [])]  # fmt: skip


def start_bare(scratch: Path, upstream: int, gzip: bool) -> Target:
    """bench/bare_relay.py, the floor: the least an aiohttp relay can do."""
    port = free_port()
    proc = spawn(bare_command(port, upstream, gzip), PROXY_CORE, scratch / "bare.log")
    wait_port(port)
    name = "bare aiohttp relay, gzip level 1" if gzip else "bare aiohttp relay"
    return Target(name, port, [proc.pid], [proc], gzip)


def tallygate_config(scratch: Path, port: int, upstream: int, metering: bool, gzip: bool,
                     workers: int = 1, ledger: bool = False) -> Path:  # fmt: skip
    """A config file for one benchmark target: everything but the switches at its defaults."""
    config = {
        "listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "upstreams": {"openai": {"url": f"http://127.0.0.1:{upstream}"}},
        "routes": [{"path_prefix": "/", "upstream": "openai"}],
        "compression": {"gzip": gzip},
        "metering": {"enabled": metering},
        "access_log": str(scratch / f"access-{port}.jsonl") if metering else "off",
        "workers": workers, "shutdown_grace": "2s",
        "ledger": f"sqlite:///{scratch}/ledger-{port}.db" if ledger else "off",
    }  # fmt: skip
    path = scratch / f"tallygate-{port}.yaml"
    path.write_text(json.dumps(config))
    return path


def start_tallygate(scratch: Path, upstream: int, name: str, metering: bool, gzip: bool,
                    workers: int = 1, core: str | None = PROXY_CORE,
                    ledger: bool = False) -> Target:  # fmt: skip
    port = free_port()
    path = tallygate_config(scratch, port, upstream, metering, gzip, workers, ledger)
    proc = spawn(
        [sys.executable, "-m", "tallygate", "serve", "-c", str(path)],
        core,
        scratch / "tallygate.log",
    )
    wait_port(port)
    pids = [proc.pid]
    if workers > 1:
        time.sleep(1.5)
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
    return Target(name, port, pids, [proc], gzip)


def h2load(port: int, requests: int, concurrency: int, gzip: bool, scratch: Path,
           headers: tuple[str, ...] = ()) -> float:  # fmt: skip
    body = scratch / "request.json"
    body.write_bytes(REQUEST)
    args = ["taskset", "-c", LOAD_CORE, "h2load", "--h1", "-n", str(requests), "-c", str(concurrency),
            "-m", "1", "-d", str(body), "-H", "Content-Type: application/json"]  # fmt: skip
    if gzip:
        args += ["-H", "Accept-Encoding: gzip"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    if not done or not rate or int(done[2]) != requests:
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(rate[1])


# -- our own clients: time to first byte, and paced streams ---------------------------------------


class StreamClient(asyncio.Protocol):
    """One request on its own connection; notes when bytes arrive and checks the body."""

    def __init__(
        self, done: asyncio.Future[StreamClient], gzip: bool, headers: tuple[str, ...] = ()
    ) -> None:
        self.done, self.gzip = done, gzip
        self.extra = "".join(f"{header}\r\n" for header in headers).encode()
        self.raw = bytearray()
        self.times: list[float] = []
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        accept = b"Accept-Encoding: gzip\r\n" if self.gzip else b""
        self.sent = time.perf_counter()
        transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                        + accept + self.extra + b"Content-Length: %d\r\n\r\n" % len(REQUEST)
                        + REQUEST)  # fmt: skip
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.times.append(time.perf_counter())
        self.raw += data
        if self.raw.endswith(b"\r\n0\r\n\r\n") and not self.done.done():
            self.done.set_result(self)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self)

    def body(self) -> tuple[bytes, int]:
        """The decoded body and the body bytes on the wire (chunk payloads)."""
        rest = bytes(self.raw).split(b"\r\n\r\n", 1)[1]
        payload = bytearray()
        while True:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            if not size:
                break
            payload += rest[:size]
            rest = rest[size + 2 :]
        wire = len(payload)
        if self.gzip:
            return zlib.decompress(bytes(payload), 16 + zlib.MAX_WBITS), wire
        return bytes(payload), wire


async def one_stream(port: int, gzip: bool, headers: tuple[str, ...] = ()) -> StreamClient:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[StreamClient] = loop.create_future()
    await loop.create_connection(lambda: StreamClient(done, gzip, headers), "127.0.0.1", port)
    return await done


async def ttfb(
    port: int, requests: int, headers: tuple[str, ...] = (), gzip: bool = False
) -> list[float]:
    """Time to first byte of `requests` sequential streams, each on a new connection, asking for
    gzip from a target that compresses. The client runs on the load core, like h2load: left to
    the scheduler, it can land on the proxy's core and wait there for the proxy's work after
    the send (metering), which is not latency."""
    times = []
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    try:
        for _ in range(requests):
            client = await one_stream(port, gzip, headers)
            times.append(client.times[0] - client.sent)
    finally:
        os.sched_setaffinity(0, affinity)
    return times


@dataclass
class PacedResult:
    streams: int
    exact: int
    on_time: int  # finished within 5% of the nominal duration, and no gap over 10x the pace
    worst_duration_ratio: float
    worst_gap_ratio: float
    rss_per_stream: float
    wire_per_event: float
    cpu_per_event: float  # the target's CPU time over the run, in us per event relayed


async def paced(target: Target, streams: int, pace: float) -> PacedResult:
    nominal = pace * (EVENTS - 1)
    baseline = sum(rss_bytes(pid) for pid in target.pids)
    peak = baseline
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop_sampling.is_set():
            peak = max(peak, sum(rss_bytes(pid) for pid in target.pids))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    # Paced streams are what production looks like: a read per event, each woken on its own.
    # Their CPU per event, accept and connect included, is the cost of a live stream.
    cpu_before = sum(cpu_seconds(pid) for pid in target.pids)
    tasks = []
    for start in range(0, streams, 200):  # ramp up in batches, as clients arrive
        tasks += [
            asyncio.create_task(one_stream(target.port, target.gzip, target.headers))
            for _ in range(min(200, streams - start))
        ]
        await asyncio.sleep(0.02)
    clients = await asyncio.wait_for(asyncio.gather(*tasks), nominal * 3 + 60)
    cpu = sum(cpu_seconds(pid) for pid in target.pids) - cpu_before
    stop_sampling.set()
    await sampler
    exact = on_time = 0
    worst_duration = worst_gap = 0.0
    wire = []
    for client in clients:
        try:
            body, wire_bytes = client.body()
        except (ValueError, zlib.error, IndexError):
            continue
        if body != mock.BODY:
            continue
        exact += 1
        wire.append(wire_bytes)
        duration = client.times[-1] - client.times[0]
        gaps = (
            max(b - a for a, b in zip(client.times, client.times[1:], strict=False))
            if len(client.times) > 1
            else 0
        )
        worst_duration = max(worst_duration, duration / nominal)
        worst_gap = max(worst_gap, gaps / pace)
        if duration <= nominal * 1.05 and gaps <= 10 * pace:
            on_time += 1
    return PacedResult(streams, exact, on_time, worst_duration, worst_gap,
                       (peak - baseline) / streams, statistics.mean(wire) / EVENTS if wire else 0,
                       cpu / (streams * EVENTS) * 1e6)  # fmt: skip


# -- the run -----------------------------------------------------------------------------------


def measure_throughput(target: Target, scratch: Path, counts: dict[int, int]) -> dict[str, float]:
    results: dict[str, float] = {}
    for concurrency, requests in counts.items():
        if concurrency == 32:
            before = sum(cpu_seconds(pid) for pid in target.pids)
            results["rps_32"] = h2load(target.port, requests, 32, target.gzip, scratch,
                                       target.headers)  # fmt: skip
            spent = sum(cpu_seconds(pid) for pid in target.pids) - before
            results["cpu_us_per_event"] = spent / (requests * EVENTS) * 1e6
            results["cpu_ms_per_stream"] = spent / requests * 1e3
        else:
            results[f"rps_{concurrency}"] = h2load(
                target.port, requests, concurrency, target.gzip, scratch, target.headers
            )
    return results


# -- peers (--peers): installed into bench/scratch/peers, never committed ---------------------------

PEERS = HERE / "scratch" / "peers"
LITELLM_KEY = "sk-bench-master"
# @hono/node-server pinned to 1.14.2, the workaround given in Portkey-AI/gateway issue 1389 for
# "TypeError: immutable" on every request. On this machine's Node 20 the gateway still fails so;
# the report then says so in its row.
PORTKEY_PACKAGES = ["@portkey-ai/gateway@1.15.2", "@hono/node-server@1.14.2"]


def install_peers() -> None:
    """LiteLLM's proxy in its own virtualenv, the Portkey gateway with npm; once, then reused."""
    venv = PEERS / "litellm"
    if not (venv / "bin" / "litellm").exists():
        print("== installing LiteLLM's proxy (pip)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    if not (PEERS / "portkey" / "node_modules" / "@portkey-ai").exists():
        print("== installing the Portkey gateway (npm)", file=sys.stderr)
        subprocess.run(["npm", "install", "--silent", "--prefix", str(PEERS / "portkey"),
                        *PORTKEY_PACKAGES], check=True)  # fmt: skip


def start_litellm(scratch: Path, upstream: int) -> Target:
    port = free_port()
    config = scratch / f"litellm-{port}.yaml"
    config.write_text(json.dumps({"model_list": [{
        "model_name": "gpt-4o-mini",
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-bench",
                           "api_base": f"http://127.0.0.1:{upstream}/v1"},
    }]}))  # fmt: skip
    os.environ["LITELLM_MASTER_KEY"] = LITELLM_KEY
    proc = spawn([str(PEERS / "litellm" / "bin" / "litellm"), "--config", str(config),
                  "--host", "127.0.0.1", "--port", str(port)], PROXY_CORE, scratch / "litellm.log")  # fmt: skip
    wait_port(port, timeout=120)
    return Target("LiteLLM proxy", port, [proc.pid], [proc],
                  headers=(f"Authorization: Bearer {LITELLM_KEY}",))  # fmt: skip


def start_portkey(scratch: Path, upstream: int) -> Target:
    port = free_port()
    server = PEERS / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build"
    proc = spawn(["node", str(server / "start-server.js"), f"--port={port}", "--headless"],
                 PROXY_CORE, scratch / "portkey.log")  # fmt: skip
    wait_port(port, timeout=60)
    return Target("Portkey gateway", port, [proc.pid], [proc], headers=(
        "x-portkey-provider: openai", f"x-portkey-custom-host: http://127.0.0.1:{upstream}/v1",
        "Authorization: Bearer sk-bench",
    ))  # fmt: skip


def measure_peer(make: Callable[[int], Target], fast: Target, slow: dict[float, Target],
                 paced_runs: list[tuple[int, float]], scratch: Path) -> dict[str, object]:  # fmt: skip
    """Smaller counts than tallygate's (peers are 10-100x slower), and a peer that fails is
    reported as failing rather than ending the run."""
    target = make(fast.port)
    row: dict[str, object] = {"name": target.name, "peer": True}
    try:
        probe = asyncio.run(one_stream(target.port, False, target.headers))
        if not bytes(probe.raw).startswith(b"HTTP/1.1 200"):
            status = bytes(probe.raw).split(b"\r\n", 1)[0].decode(errors="replace")
            row["failed"] = f"its first answer was {status!r}"
            return row
        row.update(measure_throughput(target, scratch, {1: 50, 32: 300, 256: 300}))
        times = asyncio.run(ttfb(target.port, 100, target.headers, target.gzip))
        row["ttfb_p50_ms"] = statistics.median(times) * 1e3
        row["ttfb_p99_ms"] = statistics.quantiles(times, n=100)[98] * 1e3
    except (RuntimeError, OSError) as error:
        row["failed"] = str(error).splitlines()[0][:200]
        return row
    finally:
        target.stop()
    streams, pace = paced_runs[0]  # the 1,000-stream run only: the larger one is out of reach
    paced_target = make(slow[pace].port)
    try:
        row[f"paced_{streams}"] = asyncio.run(paced(paced_target, streams, pace))
    except TimeoutError:
        row[f"paced_{streams}"] = "did not finish"
    finally:
        paced_target.stop()
    return row


def prepare_environment() -> None:
    for tool in ("nginx", "h2load", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian: nginx-light, nghttp2-client, util-linux)")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    shared_cache = HERE.parent.parent / "shared" / "tiktoken-cache"
    if shared_cache.is_dir():  # offline machines (and CI): the encodings beside the checkout
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_cache))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run (CI)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--peers", action="store_true",
                        help="also LiteLLM's proxy and the Portkey gateway, installed into "
                             "bench/scratch/peers (pip, npm) on first use")  # fmt: skip
    args = parser.parse_args()
    prepare_environment()
    if args.peers:
        install_peers()
    quick = args.quick
    counts = {1: 200, 32: 1000, 256: 1000} if quick else {1: 500, 32: 6000, 256: 6000}
    paced_runs = [(50, 0.02)] if quick else [(1000, 0.1), (5000, 0.5)]
    ttfb_requests = 100 if quick else 1000

    scratch = Path(tempfile.mkdtemp(prefix="tallygate-bench-"))
    fast = start_upstream(scratch, 0)
    slow = {pace: start_upstream(scratch, pace) for _, pace in paced_runs}
    slow20 = start_upstream(scratch, 0.02)
    rows: list[dict[str, object]] = []
    targets = [
        ("direct", lambda up: Target("direct", up, [])),
        ("nginx", lambda up: start_nginx(scratch, up, gzip=False)),
        ("nginx, gzip", lambda up: start_nginx(scratch, up, gzip=True)),
        # The floor tallygate is built on, measured in the same run: throughput and first byte.
        ("bare aiohttp relay", lambda up: start_bare(scratch, up, gzip=False)),
        ("bare aiohttp relay, gzip level 1", lambda up: start_bare(scratch, up, gzip=True)),
        (
            "tallygate, relay only",
            lambda up: start_tallygate(scratch, up, "tallygate, relay only", False, False),
        ),
        (
            "tallygate, metering",
            lambda up: start_tallygate(scratch, up, "tallygate, metering", True, False),
        ),
        (
            "tallygate, metering + gzip",
            lambda up: start_tallygate(scratch, up, "tallygate, metering + gzip", True, True),
        ),
    ]
    try:
        for name, make in targets:
            print(f"== {name}", file=sys.stderr)
            target = make(fast.port)
            row: dict[str, object] = {"name": name, "floor": name.startswith("bare")}
            try:
                row.update(measure_throughput(target, scratch, counts))
                times = asyncio.run(ttfb(target.port, ttfb_requests, gzip=target.gzip))
                row["ttfb_p50_ms"] = statistics.median(times) * 1e3
                row["ttfb_p99_ms"] = statistics.quantiles(times, n=100)[98] * 1e3
            finally:
                if name != "direct":
                    target.stop()
            if name != "direct" and not row["floor"]:
                for streams, pace in paced_runs:
                    paced_target = make(slow[pace].port)
                    try:
                        result = asyncio.run(paced(paced_target, streams, pace))
                    finally:
                        paced_target.stop()
                    row[f"paced_{streams}"] = result
                wire_target = make(slow20.port)
                try:
                    result = asyncio.run(paced(wire_target, 20 if not quick else 5, 0.02))
                    row["wire_per_event"] = result.wire_per_event
                finally:
                    wire_target.stop()
            rows.append(row)
        print("== tallygate, 2 workers (unpinned)", file=sys.stderr)
        two = start_tallygate(
            scratch,
            fast.port,
            "tallygate, metering + gzip, 2 workers",
            True,
            True,
            workers=2,
            core=None,
        )
        one = None
        try:
            two_rps = h2load(two.port, counts[256], 256, True, scratch)
        finally:
            two.stop()
        one = start_tallygate(
            scratch, fast.port, "tallygate, metering + gzip, 1 worker", True, True, core=None
        )
        try:
            one_rps = h2load(one.port, counts[256], 256, True, scratch)
        finally:
            one.stop()
        ceiling = h2load(fast.port, counts[256], 256, False, scratch)
        if args.peers:
            for name, make_peer in (("LiteLLM proxy", start_litellm),
                                    ("Portkey gateway", start_portkey)):  # fmt: skip
                print(f"== {name}", file=sys.stderr)
                make = functools.partial(make_peer, scratch)
                rows.append(measure_peer(make, fast, slow, paced_runs, scratch))
    finally:
        for up in (fast, slow20, *slow.values()):
            up.stop()
    flags = "".join(f" {flag}" for flag, on in (("--quick", quick), ("--peers", args.peers)) if on)
    report = render(rows, paced_runs, one_rps, two_rps, ceiling, flags)
    print(report)
    args.out.write_text(report)
    shutil.rmtree(scratch, ignore_errors=True)


def render(rows: list[dict[str, object]], paced_runs: list[tuple[int, float]], one: float, two: float,
           ceiling: float, flags: str) -> str:  # fmt: skip
    direct = next(r for r in rows if r["name"] == "direct")
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}; `python bench/run.py{flags}`. "
        f"Target on core 0, load and upstream on core 1. Stream: {EVENTS} events, {len(mock.BODY)} bytes.",
        "",
        "| target | req/s c=1 | req/s c=32 | req/s c=256 | TTFB p50 ms (+direct) | TTFB p99 ms | CPU us/event c=32 | CPU ms/stream c=32 |"
        + "".join(
            f" {n} streams @{int(p * 1000)} ms: exact / on time, worst duration, KiB per stream, CPU us/event |"
            for n, p in paced_runs
        )
        + " gzip wire B/event @20 ms |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(paced_runs) + "---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(
                f"| {row['name']} | failed: {row['failed']} |" + " |" * (7 + len(paced_runs))
            )
            continue
        cells = [
            str(row["name"]),
            f"{row['rps_1']:.0f}",
            f"{row['rps_32']:.0f}",
            f"{row['rps_256']:.0f}",
            f"{row['ttfb_p50_ms']:.2f} (+{row['ttfb_p50_ms'] - direct['ttfb_p50_ms']:.2f})",  # type: ignore[operator]
            f"{row['ttfb_p99_ms']:.2f}",
            f"{row['cpu_us_per_event']:.1f}" if row["name"] != "direct" else "",
            f"{row['cpu_ms_per_stream']:.2f}" if row["name"] != "direct" else "",
        ]
        for streams, _ in paced_runs:
            result = row.get(f"paced_{streams}")
            if isinstance(result, PacedResult) and not result.exact:  # only exact ones are timed
                cells.append(f"0 / 0: none of {result.streams} byte-exact, "
                             f"{result.rss_per_stream / 1024:.1f}, {result.cpu_per_event:.1f}")  # fmt: skip
            elif isinstance(result, PacedResult):
                cells.append(f"{result.exact} / {result.on_time}, {result.worst_duration_ratio:.3f}x, "
                             f"{result.rss_per_stream / 1024:.1f}, {result.cpu_per_event:.1f}")  # fmt: skip
            else:
                cells.append(
                    str(result or ("not run" if row.get("peer") or row.get("floor") else ""))
                )
        wire = row.get("wire_per_event")
        cells.append(
            f"{wire:.1f}" if isinstance(wire, float) and "gzip" in str(row["name"]) else ""
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mock upstream ceiling (direct, c=256): {ceiling:.0f} req/s. "
        f"tallygate with metering and gzip, unpinned, c=256: 1 worker {one:.0f} req/s, 2 workers {two:.0f} req/s "
        f"({two / one:.2f}x; the load generator and upstream share the same 2 cores).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
