"""Instructions per streamed request, counted by callgrind: the A/B measure that does not swing.

    python bench/instructions.py [--requests 300] [--variant NAME=KIND[@TREE]] ...

KIND and TREE as in bench/cpu.py. Each variant runs under valgrind's callgrind (Debian package
`valgrind`): warmed up with 200 requests, counters zeroed, then `--requests` at c=8 from h2load,
and the instructions executed in that window divided by the count. The same code gives the same
figure within 0.1% from run to run, where CPU time on this machine swings by 20%: use it to
tell whether a change made the work smaller. It is not a time: cache misses, system calls and
waits are not in it (bench/cpu.py and bench/run.py measure those). About a minute per variant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402
from cpu import parse_variants  # noqa: E402


def command(kind: str, scratch: Path, port: int, upstream: int) -> list[str]:
    if kind.startswith("bare"):
        return run.bare_command(port, upstream, gzip=kind == "bare-gzip")
    path = run.tallygate_config(scratch, port, upstream, kind != "relay", kind == "gzip")
    return [sys.executable, "-m", "tallygate", "serve", "-c", str(path)]


def count(kind: str, tree: Path | None, scratch: Path, upstream: int, requests: int) -> float:
    port = run.free_port()
    out = scratch / f"callgrind-{port}.out"
    # A fixed hash seed: dict and set layouts, and so the instructions, do not vary by run.
    env = dict(os.environ, PYTHONPATH=str((tree or HERE.parent) / "src"), PYTHONHASHSEED="0")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         *command(kind, scratch, port, upstream)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    gzip = kind in ("gzip", "bare-gzip")
    try:
        run.wait_port(port, timeout=300)
        run.h2load(port, 200, 8, gzip, scratch)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        run.h2load(port, requests, 8, gzip, scratch)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(120)
    # The dump taken after the zeroing is the first numbered part: <out>.1
    for line in Path(f"{out}.1").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) / requests
    raise RuntimeError(f"no totals in {out}.1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=KIND[@TREE]; default: one of each kind on this tree")  # fmt: skip
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (Debian: valgrind)")
    run.prepare_environment()
    variants = parse_variants(args.variant)
    scratch = Path(tempfile.mkdtemp(prefix="tallygate-instructions-"))
    upstream = run.start_upstream(scratch, 0)
    print("| variant | instructions per request |")
    print("|---|---|")
    try:
        for name, kind, tree in variants:
            figure = count(kind, tree, scratch, upstream.port, args.requests)
            label = f"{name} ({kind}{', ' + str(tree) if tree else ''})"
            print(f"| {label} | {figure / 1e3:,.0f}k |", flush=True)
    finally:
        upstream.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
