"""CPU per streamed request, A/B: the measure that survives this machine's noise.

    python bench/cpu.py [--rounds 3] [--requests 5000] [--variant NAME=KIND[@TREE]] ...

KIND is one of: bare, bare-gzip (bench/bare_relay.py), relay (tallygate, metering off, no
gzip), metering, gzip (metering and gzip), ledger (metering, gzip and the SQLite ledger). TREE is another checkout's root (a git worktree) whose
`src/` is used instead of this one's, to compare two commits. Each target is pinned to core 0,
the upstream and h2load to core 1; variants run in turn, round after round, and the report gives
each one's CPU microseconds per request (its own CPU time from /proc, over an h2load run at c=32)
as the median of the rounds, with every round's figure. Requests/s swing with whatever else
shares the machine; a process's CPU time per request swings far less. With --ttfb N, each round
also times N sequential requests at c=1 (a new connection each, as bench/run.py does) and the
report gives the median time to first byte, and its difference from the upstream's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

KINDS = ("bare", "bare-gzip", "relay", "metering", "gzip", "ledger")


def start(kind: str, tree: Path | None, scratch: Path, upstream: int) -> run.Target:
    if kind.startswith("bare"):
        return run.start_bare(scratch, upstream, gzip=kind == "bare-gzip")
    source = str((tree or HERE.parent) / "src")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = source
    try:
        return run.start_tallygate(
            scratch,
            upstream,
            kind,
            kind != "relay",
            kind in ("gzip", "ledger"),
            ledger=kind == "ledger",
        )
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def parse_variants(specs: list[str]) -> list[tuple[str, str, Path | None]]:
    """`NAME=KIND[@TREE]` specs as (name, kind, tree); none given: one of each kind here."""
    variants: list[tuple[str, str, Path | None]] = []
    for spec in specs or [f"{kind}={kind}" for kind in KINDS]:
        name, _, rest = spec.partition("=")
        kind, _, tree = rest.partition("@")
        if kind not in KINDS:
            sys.exit(f"unknown kind {kind!r} in {spec!r}; one of {', '.join(KINDS)}")
        variants.append((name, kind, Path(tree).resolve() if tree else None))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--ttfb", type=int, default=0, help="also time N requests at c=1")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=KIND[@TREE]; default: one of each kind on this tree")  # fmt: skip
    args = parser.parse_args()
    run.prepare_environment()
    variants = parse_variants(args.variant)

    scratch = Path(tempfile.mkdtemp(prefix="tallygate-cpu-"))
    upstream = run.start_upstream(scratch, 0)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    firsts: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    direct: list[float] = []
    try:
        for round_ in range(args.rounds):
            if args.ttfb:
                direct.append(statistics.median(asyncio.run(run.ttfb(upstream.port, args.ttfb))))
            for name, kind, tree in variants:
                target = start(kind, tree, scratch, upstream.port)
                try:
                    run.h2load(target.port, 500, 32, target.gzip, scratch)  # warm up
                    time.sleep(0.2)
                    before = sum(run.cpu_seconds(pid) for pid in target.pids)
                    rate = run.h2load(target.port, args.requests, 32, target.gzip, scratch)
                    spent = sum(run.cpu_seconds(pid) for pid in target.pids) - before
                    if args.ttfb:
                        times = asyncio.run(run.ttfb(target.port, args.ttfb, gzip=target.gzip))
                        firsts[name].append(statistics.median(times))
                finally:
                    target.stop()
                us = spent / args.requests * 1e6
                results[name].append((us, rate))
                print(f"round {round_ + 1} {name}: {us:.0f} us/request, {rate:.0f} req/s",
                      file=sys.stderr)  # fmt: skip
    finally:
        upstream.stop()
    ttfb_head = " TTFB c=1 p50, ms | added over direct, ms |" if args.ttfb else ""
    print(f"| variant | CPU us/request, median | rounds | req/s c=32, median |{ttfb_head}")
    print("|---|---|---|---|" + ("---|---|" if args.ttfb else ""))
    for name, kind, tree in variants:
        runs = results[name]
        label = f"{name} ({kind}{', ' + str(tree) if tree else ''})"
        line = (f"| {label} | {statistics.median(u for u, _ in runs):.0f} | "
                f"{', '.join(f'{u:.0f}' for u, _ in runs)} | "
                f"{statistics.median(r for _, r in runs):.0f} |")  # fmt: skip
        if args.ttfb:
            first = statistics.median(firsts[name]) * 1e3
            line += f" {first:.3f} | +{first - statistics.median(direct) * 1e3:.3f} |"
        print(line)


if __name__ == "__main__":
    main()
