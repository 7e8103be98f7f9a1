"""A bounded soak: hundreds of concurrent paced streams through one tallygate worker, with a
share of faulty upstreams and of clients that leave, for a fixed time; then the checks.

    python bench/soak.py [--seconds 60] [--rounds 2] [--concurrency 300] [--pace 0.05] [--events 30]

The upstream (in this process, on the load core) answers request n, deterministically:
n % 20 == 0: a 500 with a JSON error; == 1: dies half-way through the stream; == 2: hangs
after its first event (tallygate's idle timeout, 1 s here, cuts it); otherwise the whole
stream. Clients with n % 10 == 5 leave after the first event; half ask for gzip. Hostile clients
(raw HTTP, each expecting the whole stream): n % 20 == 7 sends an X-Request-Id with a byte above
0x7F, == 9 spells the path `/v1/chat/%63ompletions`, == 11 sends such a byte in its key.

At the end it checks, and exits non-zero if one fails:
- every byte of every completed stream arrived (each is compared with what the upstream sent);
- every cut stream delivered exactly what the upstream sent before it broke, and no more;
- the number of usage records equals the number of requests (tallygate is stopped with SIGTERM
  first, so its access log is flushed);
- tallygate's RSS a few seconds after the load is near its baseline after warm-up (at most 1.5x:
  CPython and glibc keep freed memory for reuse rather than return it), and it does not grow
  from one round of load to the next (at most 5%), which a leak would.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import LOAD_CORE, free_port, rss_bytes, spawn, wait_port  # noqa: E402

PROXY_CORE = "0"


def events(n: int, count: int) -> list[bytes]:
    chunk = {"id": f"soak-{n}", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    out = [
        b"data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {
            "content": f"word{n}x{i} "}, "finish_reason": None}]}).encode() + b"\n\n"
        for i in range(count)
    ]  # fmt: skip
    out.append(b"data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {},
               "finish_reason": "stop"}]}).encode() + b"\n\n")  # fmt: skip
    out.append(b"data: " + json.dumps({**chunk, "choices": [], "usage": {
        "prompt_tokens": 12, "completion_tokens": count, "total_tokens": 12 + count}}).encode()
        + b"\n\n")  # fmt: skip
    out.append(b"data: [DONE]\n\n")
    return out


def kind_of(n: int) -> str:
    fault = {0: "error", 1: "dies", 2: "hangs"}.get(n % 20)
    if fault:
        return fault
    return "leaves" if n % 10 == 5 else "whole"


ERROR_BODY = b'{"error":{"message":"overloaded","type":"server_error","code":null}}'


def upstream_app(pace: float, count: int) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        n = int((await request.json())["seed"])
        kind = kind_of(n)
        if kind == "error":
            return web.Response(status=500, body=ERROR_BODY, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stream = events(n, count)
        for i, event in enumerate(stream):
            if kind == "dies" and i == len(stream) // 2:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(event)
            if kind == "hangs":
                await asyncio.sleep(30)
            await asyncio.sleep(pace)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []


HOSTILE = {
    7: (b"/v1/chat/completions", b"X-Request-Id: caf\xe9\r\n"),  # a byte JSON cannot hold
    9: (b"/v1/chat/%63ompletions", b""),  # the path spelled to dodge metering
    11: (b"/v1/chat/completions", b"Authorization: Bearer k\xe9y\r\n"),  # such a byte in a key
}


async def hostile(url: str, n: int, body: bytes, count: int, tally: Tally) -> None:
    """A raw HTTP client (aiohttp would not send these bytes) that expects the whole stream."""
    path, extra = HOSTILE[n % 20]
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST " + path + b" HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n" + extra
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip
    answer = await reader.read()
    writer.close()
    head, _, chunked = answer.partition(b"\r\n\r\n")
    plain = b"".join(re.findall(rb"[0-9a-f]+\r\n(.*?)\r\n", chunked, re.S))
    if not head.startswith(b"HTTP/1.1 200") or plain != b"".join(events(n, count)):
        tally.failures.append(f"{n}: hostile client {n % 20}: {head[:40]!r}")


async def one(session: aiohttp.ClientSession, url: str, n: int, count: int, tally: Tally) -> None:
    kind = kind_of(n)
    tally.requests += 1
    tally.kinds[kind] += 1
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "seed": n,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "soak"}]})  # fmt: skip
    if n % 20 in HOSTILE:
        tally.kinds["hostile"] += 1
        await hostile(url, n, body.encode(), count, tally)
        return
    headers = {"Accept-Encoding": "gzip" if n % 2 else "identity"}
    expected = b"".join(events(n, count))
    received = b""
    cut = False
    try:
        async with session.post(url, data=body, headers=headers) as r:
            if kind == "error":
                if r.status != 500 or await r.read() != ERROR_BODY:
                    tally.failures.append(f"{n}: error answer altered ({r.status})")
                return
            try:
                while piece := await r.content.readany():
                    received += piece
                    if kind == "leaves":
                        return  # and the connection is closed under tallygate
            except aiohttp.ClientPayloadError:
                cut = True
    except aiohttp.ClientError as error:
        tally.failures.append(f"{n}: {kind}: {type(error).__name__}: {error}")
        return
    if kind == "whole" and (cut or received != expected):
        tally.failures.append(f"{n}: whole stream: {len(received)} of {len(expected)} bytes")
    elif kind in ("dies", "hangs"):
        sent = len(events(n, count)) // 2 if kind == "dies" else 1
        if not cut or received != b"".join(events(n, count)[:sent]):
            tally.failures.append(f"{n}: {kind}: not cut where the upstream stopped")


async def load(args: argparse.Namespace, port: int, pid: int) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    numbers = itertools.count(1)
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm-up: tokenizers, pools and caches reach their working size before the baseline.
        await asyncio.gather(*(one(session, url, next(numbers), args.events, tally)
                               for _ in range(min(50, args.concurrency))))  # fmt: skip
        await asyncio.sleep(1)
        baseline = rss_bytes(pid)
        peak = baseline
        after: list[int] = []  # RSS after each round, once the load has stopped
        elapsed = 0.0
        for _ in range(args.rounds):
            deadline = time.monotonic() + args.seconds / args.rounds

            async def worker(deadline: float = deadline) -> None:
                while time.monotonic() < deadline:
                    await one(session, url, next(numbers), args.events, tally)

            async def sample(deadline: float = deadline) -> None:
                nonlocal peak
                while time.monotonic() < deadline:
                    peak = max(peak, rss_bytes(pid))
                    await asyncio.sleep(0.5)

            started = time.monotonic()
            await asyncio.gather(sample(), *(worker() for _ in range(args.concurrency)))
            elapsed += time.monotonic() - started
            await asyncio.sleep(3)  # hung upstreams cut, drains done, the allocator settled
            after.append(rss_bytes(pid))
    return {"tally": tally, "baseline": baseline, "peak": peak, "after": after,
            "elapsed": elapsed}  # fmt: skip


async def main_async(args: argparse.Namespace, scratch: Path) -> int:
    upstream_port, port, admin = free_port(), free_port(), free_port()
    runner = web.AppRunner(upstream_app(args.pace, args.events), access_log=None,
                           handler_cancellation=True)  # fmt: skip
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream_port, backlog=4096).start()
    access_log = scratch / "access.jsonl"
    config = {
        "listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"soak": {"url": f"http://127.0.0.1:{upstream_port}",
                               "timeouts": {"idle": "1s"}}},
        "routes": [{"path_prefix": "/", "upstream": "soak"}],
        "access_log": str(access_log), "shutdown_grace": "10s", "ledger": "off",
    }  # fmt: skip
    (scratch / "tallygate.yaml").write_text(json.dumps(config))
    proc = spawn([sys.executable, "-m", "tallygate", "serve", "-c", str(scratch / "tallygate.yaml")],
                 PROXY_CORE, scratch / "tallygate.log")  # fmt: skip
    try:
        await asyncio.to_thread(wait_port, port)
        result = await load(args, port, proc.pid)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await runner.cleanup()
    tally = result["tally"]
    assert isinstance(tally, Tally)
    records = [json.loads(line) for line in access_log.read_text().splitlines()]
    outcomes = collections.Counter(r["outcome"] for r in records)
    # Every request metered as what it is: the hostile path spellings included.
    unmetered = [r for r in records if r["dialect"] != "openai_chat"]
    baseline, peak = int(result["baseline"]), int(result["peak"])  # type: ignore[call-overload]
    after = list(result["after"])  # type: ignore[call-overload]
    mib = 2**20
    report = {
        "seconds": round(float(result["elapsed"]), 1),  # type: ignore[arg-type]
        "concurrency": args.concurrency,
        "requests": tally.requests,
        "requests_by_kind": dict(tally.kinds),
        "usage_records": len(records),
        "outcomes": dict(outcomes),
        "byte_failures": len(tally.failures),
        "rss_mib": {
            "baseline": round(baseline / mib, 1),
            "peak": round(peak / mib, 1),
            "after_each_round": [round(a / mib, 1) for a in after],
        },
    }
    print(json.dumps(report, indent=2))
    for failure in tally.failures[:20]:
        print("FAILED", failure, file=sys.stderr)
    problems = []
    if tally.failures:
        problems.append(f"{len(tally.failures)} streams not delivered exactly")
    if len(records) != tally.requests:
        problems.append(f"{len(records)} usage records for {tally.requests} requests")
    if unmetered:
        problems.append(f"{len(unmetered)} requests not metered as chat completions")
    if after[-1] > 1.5 * baseline:
        problems.append(f"RSS after the load {after[-1] / mib:.1f} MiB > 1.5x baseline")
    if len(after) > 1 and after[-1] > 1.05 * after[0]:
        problems.append(f"RSS grows round after round: {[a // mib for a in after]} MiB")
    for problem in problems:
        print("SOAK FAILED:", problem, file=sys.stderr)
    return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="of load, over all rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="the RSS after each must not keep growing (a leak would)",
    )
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--pace", type=float, default=0.05, help="seconds between events")
    parser.add_argument("--events", type=int, default=30, help="content events per stream")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # tallygate inherits it
    shared_cache = HERE.parent.parent / "shared" / "tiktoken-cache"
    if shared_cache.is_dir():  # this machine is offline; elsewhere tiktoken downloads them
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_cache))
    # The load and the upstream on one core, tallygate on the other.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    with tempfile.TemporaryDirectory(prefix="tallygate-soak-") as scratch:
        sys.exit(asyncio.run(main_async(args, Path(scratch))))


if __name__ == "__main__":
    main()
