"""How long other streams pause while tallygate counts one maximal prompt.

    python bench/pauses.py [--prompt-mib 30] [--streams 20] [--pace 0.02]

One tallygate worker (pinned to core 0, metering on) relays `--streams` paced streams from the
mock upstream, continuously, while curl posts one chat request whose prompt is `--prompt-mib`
MiB of a single repeated letter (tiktoken's slowest input: one pre-token of megabytes). The run
lasts until that request's usage record is written. The report is the longest gap between two
events any paced stream saw, beyond the pace, for tallygate with the prompt estimate on and off
(`metering.estimate: false`: the same build without the work), against a direct connection to
the upstream and nginx (`proxy_buffering off`) in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (  # noqa: E402
    LOAD_CORE,
    Target,
    free_port,
    one_stream,
    spawn,
    start_nginx,
    start_upstream,
    wait_port,
)


def start(scratch: Path, upstream: int, estimate: bool) -> tuple[Target, Path]:
    port = free_port()
    log = scratch / f"access-{port}.jsonl"
    config = {
        "listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "upstreams": {"openai": {"url": f"http://127.0.0.1:{upstream}"}},
        "routes": [{"path_prefix": "/", "upstream": "openai"}],
        "metering": {"estimate": estimate}, "access_log": str(log), "shutdown_grace": "2s", "ledger": "off",
    }  # fmt: skip
    path = scratch / f"tallygate-{port}.yaml"
    path.write_text(json.dumps(config))
    proc = spawn([sys.executable, "-m", "tallygate", "serve", "-c", str(path)], "0",
                 scratch / "tallygate.log")  # fmt: skip
    wait_port(port)
    name = f"tallygate, prompt estimate {'on' if estimate else 'off'}"
    return Target(name, port, [proc.pid], [proc]), log


def recorded(log: Path, request_id: str) -> bool:
    return log.exists() and f'"{request_id}"'.encode() in log.read_bytes()


async def measure(
    target: Target, log: Path | None, prompt: Path, streams: int, pace: float
) -> float:
    """The longest gap beyond `pace` between two events of a paced stream, in seconds."""
    worst = 0.0
    curl = await asyncio.create_subprocess_exec(
        "taskset", "-c", LOAD_CORE, "curl", "-s", "-o", "/dev/null",
        "-H", "Content-Type: application/json", "-H", "X-Request-Id: maximal-prompt",
        "--data-binary", f"@{prompt}", f"http://127.0.0.1:{target.port}/v1/chat/completions",
    )  # fmt: skip
    await asyncio.sleep(0.2)  # the streams overlap the prompt's upload, its answer and its count

    async def stream_forever(done: asyncio.Event) -> None:
        nonlocal worst
        while not done.is_set():
            client = await one_stream(target.port, False)
            times = client.times
            gaps = [b - a for a, b in itertools.pairwise(times)]
            worst = max(worst, max(gaps, default=0.0) - pace)

    done = asyncio.Event()
    tasks = [asyncio.create_task(stream_forever(done)) for _ in range(streams)]
    await curl.wait()
    deadline = time.monotonic() + 120
    # Records are written after their answers: wait for the prompt's (the streams' come on).
    while log is not None and time.monotonic() < deadline:
        if recorded(log, "maximal-prompt"):
            break
        await asyncio.sleep(0.05)
    else:
        if log is not None:
            raise SystemExit("the maximal prompt's record never came")
    await asyncio.sleep(max(0.5, 2 * pace))
    done.set()
    await asyncio.gather(*tasks)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-mib", type=float, default=30)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between events")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tallygate-pauses-") as directory:
        scratch = Path(directory)
        prompt = scratch / "prompt.json"
        letters = "a" * int(args.prompt_mib * 2**20)
        prompt.write_text(json.dumps({"model": "gpt-4o-mini", "stream": True,
                                      "messages": [{"role": "user", "content": letters}]}))  # fmt: skip
        del letters
        upstream = start_upstream(scratch, args.pace)
        rows = []
        try:
            for target in (
                Target("direct", upstream.port, []),
                start_nginx(scratch, upstream.port, False),
            ):
                try:
                    worst = asyncio.run(measure(target, None, prompt, args.streams, args.pace))
                finally:
                    target.stop()
                rows.append((target.name, worst))
            for estimate in (False, True):
                target, log = start(scratch, upstream.port, estimate)
                try:
                    worst = asyncio.run(measure(target, log, prompt, args.streams, args.pace))
                finally:
                    target.stop()
                rows.append((target.name, worst))
        finally:
            upstream.stop()
    print(f"| {args.streams} paced streams ({args.pace * 1000:g} ms pace) while one "
          f"{args.prompt_mib:g} MiB prompt is relayed and counted | longest pause beyond the pace |")  # fmt: skip
    print("|---|---|")
    for name, worst in rows:
        print(f"| {name} | {worst * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
