"""Which zlib settings keep gzip's ratio on LLM streams, for how much memory per live stream and
how much CPU. Prints a table; the defaults in config.Compression come from it.

    python bench/compression_params.py [--corpus tests/corpus] [--level 6]

Every corpus stream is compressed twice: fed one event per read (a paced stream, the worst case
for a flushing compressor: one flush marker per event), and in one read (a fast upstream, or a
JSON body: where the compressor's own search costs most). Ratios are raw bytes / gzip bytes over
the whole corpus; CPU is the best of five passes over it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from tallygate.core.codec import GzipEncoder, GzipSettings, flush_policy
from tallygate.core.framing import NdjsonFramer, SseFramer


def events(body: bytes, ndjson: bool) -> list[bytes]:
    """The body cut after each event (SSE) or line (NDJSON), by tallygate's own framers."""
    framer = NdjsonFramer() if ndjson else SseFramer()
    return [event.raw for event in [*framer.feed(body), *framer.close()]]


def compressed_size(streams: list[tuple[list[bytes], bool]], settings: GzipSettings) -> int:
    total = 0
    for pieces, ndjson in streams:
        encoder = GzipEncoder(
            settings, flush_policy("application/x-ndjson" if ndjson else "text/event-stream", None)
        )
        total += sum(len(encoder.feed(p)) for p in pieces) + len(encoder.close())
    return total


def best_of(runs: int, work: Callable[[], int]) -> tuple[int, float]:
    """The result of `work` and its fastest time in ms."""
    fastest = float("inf")
    result = 0
    for _ in range(runs):
        start = time.perf_counter()
        result = work()
        fastest = min(fastest, time.perf_counter() - start)
    return result, fastest * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--corpus", default=str(Path(__file__).resolve().parent.parent / "tests" / "corpus")
    )
    parser.add_argument("--level", type=int, default=6)
    args = parser.parse_args()

    streams = []
    raw = 0
    for body_path in sorted(Path(args.corpus).glob("*/response.body")):
        body = body_path.read_bytes()
        ndjson = "ollama" in body_path.parent.name
        streams.append((events(body, ndjson), ndjson))
        raw += len(body)

    whole = [([b"".join(pieces)], ndjson) for pieces, ndjson in streams]
    print(f"{len(streams)} streams, {raw} bytes, level {args.level}")
    print("| window_bits | mem_level | state KiB | ratio, a flush per event | ms | "
          "ratio, one read | ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for wbits in range(9, 16):
        for mem in range(1, 10):
            settings = GzipSettings(args.level, wbits, mem)
            if settings.state_bytes() > 256 * 1024:
                continue
            paced, paced_ms = best_of(5, lambda s=settings: compressed_size(streams, s))
            bulk, bulk_ms = best_of(5, lambda s=settings: compressed_size(whole, s))
            print(f"| {wbits} | {mem} | {settings.state_bytes() / 1024:.0f} | {raw / paced:.2f} | "
                  f"{paced_ms:.1f} | {raw / bulk:.2f} | {bulk_ms:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
