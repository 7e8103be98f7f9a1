"""Which zlib settings keep gzip's ratio on LLM streams with a flush after every event, for how much
memory per live stream. Prints a table; the defaults in config.Compression come from it.

    python bench/compression_params.py [--corpus ../shared/corpus] [--level 6]

Every corpus stream is fed one event per read (the worst case for a flushing compressor: one
flush marker per event), and the ratio is raw bytes / gzip bytes over the whole corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tallygate.compression import GzipEncoder, GzipSettings, flush_policy
from tallygate.framing import NdjsonFramer, SseFramer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus")
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

    reference = compressed_size(streams, GzipSettings(args.level, 15, 8))
    ref_ratio = raw / reference
    print(f"{len(streams)} streams, {raw} bytes, level {args.level}, flush after every event")
    print(f"zlib defaults (window_bits 15, mem_level 8): ratio {ref_ratio:.2f}\n")
    print("| window_bits | mem_level | state KiB | ratio | share of default ratio |")
    print("|---|---|---|---|---|")
    for wbits in range(9, 16):
        for mem in range(1, 10):
            settings = GzipSettings(args.level, wbits, mem)
            if settings.state_bytes() > 64 * 1024 and (wbits, mem) != (15, 8):
                continue
            ratio = raw / compressed_size(streams, settings)
            print(
                f"| {wbits} | {mem} | {settings.state_bytes() / 1024:.0f} | {ratio:.2f} | "
                f"{100 * ratio / ref_ratio:.1f}% |"
            )


if __name__ == "__main__":
    main()
