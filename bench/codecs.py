"""gzip against brotli and zstd, each flushed after every event, as tallygate streams.

    python bench/codecs.py [--repeat 20] [--quick]

For every recorded corpus stream (tests/corpus, SSE and NDJSON, split into events as the framer
splits them) and for the benchmark's paced stream (bench/upstream.py, 68 events), each codec
compresses one event at a time with a flush after each, so a client can decode every event on
arrival:

- gzip: zlib with tallygate's defaults (level 6, window 2^12, memLevel 4), Z_SYNC_FLUSH;
- brotli (the `brotli` package): qualities 4 and 5, default window, a FLUSH after each event;
- zstd (the `zstandard` package): levels 3 and 6, a FLUSH_BLOCK after each event.

It prints wire bytes per event (on each stream and over the corpus), CPU microseconds per event
(process time over `--repeat` runs), and the memory one live stream's compressor holds (the
peak RSS growth of a fresh process per codec over 200 live compressors, each having compressed
the paced stream).
Needs `pip install brotli zstandard` (not tallygate's dependencies).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import upstream as mock  # noqa: E402

CORPUS = HERE.parent / "tests" / "corpus"

Compressor = Callable[[bytes], bytes]  # one event in, the bytes that go out for it


def gzip_stream() -> Compressor:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + 12, 4)
    return lambda event: compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)


def brotli_stream(quality: int, lgwin: int = 22) -> Callable[[], Compressor]:
    def make() -> Compressor:
        compressor = brotli.Compressor(quality=quality, lgwin=lgwin)
        return lambda event: compressor.process(event) + compressor.flush()

    return make


def zstd_stream(level: int, window_log: int = 0) -> Callable[[], Compressor]:
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log)

    def make() -> Compressor:
        compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
        flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        return lambda event: compressor.compress(event) + compressor.flush(flush)

    return make


CODECS: dict[str, Callable[[], Compressor]] = {
    "gzip 6, window 2^12 (tallygate)": gzip_stream,
    "brotli q4": brotli_stream(4),
    "brotli q5": brotli_stream(5),
    "brotli q5, window 2^16": brotli_stream(5, 16),
    "zstd 3": zstd_stream(3),
    "zstd 6": zstd_stream(6),
    "zstd 3, window 2^16": zstd_stream(3, 16),
}


def events_of(body: bytes, ndjson: bool) -> list[bytes]:
    if ndjson:
        return [line for line in re.findall(rb"[^\n]*\n", body) if line]
    events = re.findall(rb".*?(?:\r\n\r\n|\n\n|\r\r)", body, re.S)
    rest = body[sum(map(len, events)) :]
    return events + ([rest] if rest else [])


def corpus() -> list[list[bytes]]:
    streams = []
    for case in sorted(p for p in CORPUS.iterdir() if p.is_dir()):
        meta = json.loads((case / "meta.json").read_text())
        body = (case / "response.body").read_bytes()
        content_type = str(meta.get("content_type", ""))
        if "event-stream" in content_type or body.startswith((b"data:", b"event:")):
            streams.append(events_of(body, ndjson=False))
        elif "ndjson" in content_type:
            streams.append(events_of(body, ndjson=True))
    return streams


def wire(make: Callable[[], Compressor], events: list[bytes]) -> int:
    compress = make()
    return sum(len(compress(event)) for event in events)


def cpu_us_per_event(
    make: Callable[[], Compressor], streams: list[list[bytes]], repeat: int
) -> float:
    events = sum(len(s) for s in streams) * repeat
    start = time.process_time()
    for _ in range(repeat):
        for stream in streams:
            compress = make()
            for event in stream:
                compress(event)
    return (time.process_time() - start) / events * 1e6


def rss_kib_per_stream(name: str, live: int) -> float:
    """Peak RSS growth of a fresh process over `live` compressors of `name`, each having
    compressed the paced stream and kept alive, as live streams keep theirs (C allocations
    included, which tracemalloc does not see)."""
    child = subprocess.run(
        [sys.executable, __file__, "--rss-of", name, "--live", str(live)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(child.stdout)


def _rss_child(name: str, live: int) -> None:
    make = CODECS[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = []
    for _ in range(live):
        compress = make()
        for event in mock.EVENTS:
            compress(event)
        kept.append(compress)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / live)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)
    parser.add_argument("--live", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_of:
        _rss_child(args.rss_of, args.live)
        return
    repeat = 1 if args.quick else args.repeat
    streams = corpus()
    paced = list(mock.EVENTS)
    corpus_events = sum(len(s) for s in streams)
    corpus_plain = sum(len(e) for s in streams for e in s)
    print(f"corpus: {len(streams)} streams, {corpus_events} events, {corpus_plain} bytes; "
          f"paced benchmark stream: {len(paced)} events, {sum(map(len, paced))} bytes")  # fmt: skip
    print()
    print("| codec | corpus B/event | vs gzip | paced stream B/event | vs gzip | CPU us/event (corpus) | RSS KiB per live stream |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    base_corpus = base_paced = 0.0
    for name, make in CODECS.items():
        corpus_bytes = sum(wire(make, s) for s in streams) / corpus_events
        paced_bytes = wire(make, paced) / len(paced)
        if not base_corpus:
            base_corpus, base_paced = corpus_bytes, paced_bytes
        cpu = cpu_us_per_event(make, streams, repeat)
        rss = rss_kib_per_stream(name, 20 if args.quick else 200)
        print(f"| {name} | {corpus_bytes:.1f} | {corpus_bytes / base_corpus - 1:+.1%} | "
              f"{paced_bytes:.1f} | {paced_bytes / base_paced - 1:+.1%} | {cpu:.1f} | {rss:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
