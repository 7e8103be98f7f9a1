"""Beyond gzip: brotli and zstd with a flush per event, against gzip, on LLM streams.

    python bench/codec_sizes.py [--quick] [--reps N] [--streams N] [--per-stream] [--codec SPEC ...]

Every codec compresses each stream one event per read with a flush after every event, so that
the client can decode each event on arrival (as tallygate does for SSE and NDJSON):

- gzip: zlib with tallygate's defaults (config.Compression: level 6, window_bits 14, mem_level 5)
  and Z_SYNC_FLUSH; tallygate's own GzipEncoder at this commit (whatever flush it uses); and
  nginx's settings (level 1, zlib's default window and memory, Z_SYNC_FLUSH) for reference;
- brotli (the `brotli` package): Compressor.process() then flush() (BROTLI_OPERATION_FLUSH);
- zstd (the `zstandard` package, else Python 3.14's compression.zstd): a compressobj flushed
  with COMPRESSOBJ_FLUSH_BLOCK (ZSTD_e_flush).

Inputs: (a) every stream of the recorded corpus (tests/corpus), cut into events by tallygate's
own framers (SSE, or NDJSON lines for application/x-ndjson); (b) the paced benchmark stream of
bench/upstream.py (68 events, one per read). Reported per codec:

- wire bytes per event (all the bytes of the coded body, header and trailer included, over the
  events), and the change against gzip with tallygate's settings and a sync flush;
- CPU us per event: time.process_time over --reps passes, a new compressor per stream (its
  set-up and end counted), one stream after another;
- memory per live stream, and CPU us per event with many live streams: a child process opens
  --streams compressors and feeds them the benchmark stream round-robin, event by event (as
  many paced streams are served; caches are cold for each), and reports its RSS growth divided
  by the number of streams before they end. Run a second time with the largest corpus stream
  (~97 KB; a quarter as many streams), since brotli and zstd grow their buffers with the data
  they have seen;
- the corpus bodies each in one read, flushed once: what the codec gives without a flush per
  event, to show what the flushes cost it.

Then the wire bytes against gzip by API (the corpus names say it), and with --per-stream the
bytes of every stream.

Before timing, every codec's output is decoded incrementally and each event must come out
whole from the bytes sent up to its flush: a codec that does not stream fails the run.
brotli and zstandard are optional (the `bench` extra); a codec whose module is missing is
named, and the run stops.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tallygate.config import Compression
from tallygate.core.codec import GzipEncoder, GzipSettings, flush_policy
from tallygate.core.framing import NdjsonFramer, SseFramer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from upstream import EVENTS as BENCH_EVENTS  # noqa: E402

CORPUS = HERE.parent / "tests" / "corpus"
DEFAULTS = Compression()

# Codecs, as NAME:ARG:ARG. gzip-sync:LEVEL:WBITS:MEMLEVEL; gzip-tallygate (GzipEncoder as it is);
# brotli:QUALITY:LGWIN; zstd:LEVEL:WINDOW_LOG (0: the level's default).
DEFAULT_CODECS = [
    f"gzip-sync:{DEFAULTS.level}:{DEFAULTS.window_bits}:{DEFAULTS.mem_level}",
    "gzip-tallygate",
    "gzip-sync:1:15:8",
    "brotli:4:22",
    "brotli:5:22",
    "brotli:6:22",
    "brotli:5:16",
    "zstd:1:0",
    "zstd:3:0",
    "zstd:6:0",
]
BASELINE = DEFAULT_CODECS[0]


class Encoder(Protocol):
    def event(self, data: bytes) -> bytes: ...
    def end(self) -> bytes: ...


class Decoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Codec:
    spec: str
    label: str
    encoder: Callable[[], Encoder]
    decoder: Callable[[], Decoder]


# -- codecs ---------------------------------------------------------------------------------------


class _GzipSync:
    __slots__ = ("_c",)

    def __init__(self, level: int, wbits: int, mem: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, 16 + wbits, mem)

    def event(self, data: bytes) -> bytes:
        c = self._c
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH)


class _GzipTallygate:
    """tallygate's own encoder, fed one event per read (its flush point is then the read's end)."""

    __slots__ = ("_e",)

    def __init__(self, ndjson: bool) -> None:
        settings = GzipSettings(DEFAULTS.level, DEFAULTS.window_bits, DEFAULTS.mem_level)
        kind = "application/x-ndjson" if ndjson else "text/event-stream"
        self._e = GzipEncoder(settings, flush_policy(kind, None))

    def event(self, data: bytes) -> bytes:
        return self._e.feed(data)

    def end(self) -> bytes:
        return self._e.close()


class _GzipDecoder:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        return self._d.decompress(data)


class _Brotli:
    __slots__ = ("_c",)

    def __init__(self, brotli: Any, quality: int, lgwin: int) -> None:
        self._c = brotli.Compressor(quality=quality, lgwin=lgwin)

    def event(self, data: bytes) -> bytes:
        c = self._c
        # flush(): BROTLI_OPERATION_FLUSH
        return c.process(data) + c.flush()  # type: ignore[no-any-return]

    def end(self) -> bytes:
        return self._c.finish()  # type: ignore[no-any-return]


class _BrotliDecoder:
    __slots__ = ("_d",)

    def __init__(self, brotli: Any) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        return self._d.process(data)  # type: ignore[no-any-return]


class _Zstandard:
    __slots__ = ("_c", "_flush")

    def __init__(self, zstd: Any, level: int, window_log: int) -> None:
        # One ZstdCompressor per stream: a compressobj shares its parent's context.
        if window_log:
            params = zstd.ZstdCompressionParameters.from_level(level, window_log=window_log)
            compressor = zstd.ZstdCompressor(compression_params=params)
        else:
            compressor = zstd.ZstdCompressor(level=level)
        self._c = compressor.compressobj()
        self._flush = zstd.COMPRESSOBJ_FLUSH_BLOCK

    def event(self, data: bytes) -> bytes:
        c = self._c
        return c.compress(data) + c.flush(self._flush)  # type: ignore[no-any-return]

    def end(self) -> bytes:
        return self._c.flush()  # type: ignore[no-any-return]


class _ZstandardDecoder:
    __slots__ = ("_d",)

    def __init__(self, zstd: Any) -> None:
        self._d = zstd.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes) -> bytes:
        return self._d.decompress(data)  # type: ignore[no-any-return]


class _StdlibZstd:
    """Python 3.14's compression.zstd."""

    __slots__ = ("_c", "_flush")

    def __init__(self, zstd: Any, level: int, window_log: int) -> None:
        options = {zstd.CompressionParameter.compression_level: level}
        if window_log:
            options[zstd.CompressionParameter.window_log] = window_log
        self._c = zstd.ZstdCompressor(options=options)
        self._flush = zstd.ZstdCompressor.FLUSH_BLOCK

    def event(self, data: bytes) -> bytes:
        return self._c.compress(data, mode=self._flush)  # type: ignore[no-any-return]

    def end(self) -> bytes:
        return self._c.flush()  # type: ignore[no-any-return]


class _StdlibZstdDecoder:
    __slots__ = ("_d",)

    def __init__(self, zstd: Any) -> None:
        self._d = zstd.ZstdDecompressor()

    def feed(self, data: bytes) -> bytes:
        return self._d.decompress(data)  # type: ignore[no-any-return]


def _module(*names: str) -> Any:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def make_codec(spec: str, ndjson: bool = False) -> Codec:
    """The codec a spec names; a missing module ends the run with what to install."""
    name, *raw = spec.split(":")
    args = [int(a) for a in raw]
    if name == "gzip-sync":
        level, wbits, mem = args
        return Codec(
            spec,
            f"gzip {level}, window {wbits}, mem {mem}, Z_SYNC_FLUSH",
            lambda: _GzipSync(level, wbits, mem),
            _GzipDecoder,
        )
    if name == "gzip-tallygate":
        return Codec(
            spec, "gzip, tallygate's GzipEncoder", lambda: _GzipTallygate(ndjson), _GzipDecoder
        )
    if name == "brotli":
        brotli = _module("brotli")
        if brotli is None:
            raise SystemExit("the brotli package is not installed: pip install -e '.[bench]'")
        quality, lgwin = args
        return Codec(
            spec,
            f"brotli {quality}, lgwin {lgwin}, BROTLI_OPERATION_FLUSH",
            lambda: _Brotli(brotli, quality, lgwin),
            lambda: _BrotliDecoder(brotli),
        )
    if name == "zstd":
        level, window_log = args
        window = f"window_log {window_log}" if window_log else "the level's window"
        zstandard = _module("zstandard")
        if zstandard is not None:
            return Codec(
                spec,
                f"zstd {level}, {window}, FLUSH_BLOCK (zstandard {zstandard.__version__})",
                lambda: _Zstandard(zstandard, level, window_log),
                lambda: _ZstandardDecoder(zstandard),
            )
        stdlib = _module("compression.zstd")
        if stdlib is not None:
            return Codec(
                spec,
                f"zstd {level}, {window}, FLUSH_BLOCK (compression.zstd)",
                lambda: _StdlibZstd(stdlib, level, window_log),
                lambda: _StdlibZstdDecoder(stdlib),
            )
        raise SystemExit(
            "neither zstandard nor compression.zstd is importable: pip install -e '.[bench]'"
        )
    raise SystemExit(f"unknown codec {spec!r}")


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    name: str
    events: list[bytes]
    ndjson: bool

    @property
    def raw(self) -> int:
        return sum(map(len, self.events))


def events(body: bytes, ndjson: bool) -> list[bytes]:
    """The body cut after each event (SSE) or line (NDJSON), by tallygate's own framers."""
    framer = NdjsonFramer() if ndjson else SseFramer()
    return [event.raw for event in [*framer.feed(body), *framer.close()]]


def corpus(root: Path) -> list[Stream]:
    streams = []
    for meta_path in sorted(root.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        ndjson = meta["content_type"] in ("application/x-ndjson", "application/jsonl")
        body = (meta_path.parent / "response.body").read_bytes()
        streams.append(Stream(meta_path.parent.name, events(body, ndjson), ndjson))
    return streams


BENCH = Stream("bench/upstream.py", list(BENCH_EVENTS), False)


def dialect(name: str) -> str:
    """`012-openai-chat-gpt35-multipart-b` -> `chat`: the corpus names say provider and API."""
    _, provider, api, *_ = name.split("-")
    if provider == "ollama":
        return "ollama"
    return "anthropic" if api == "messages" else api


# -- measures -------------------------------------------------------------------------------------


def check_streams(codec_spec: str, streams: list[Stream]) -> None:
    """Each event decodes whole from the bytes sent up to its flush; the body round-trips.

    A stream's last event may be unterminated (the corpus has some): it need only come out at
    the end, as tallygate's own encoder holds a partial event back."""
    for stream in streams:
        codec = make_codec(codec_spec, stream.ndjson)
        encoder, decoder = codec.encoder(), codec.decoder()
        last = len(stream.events) - 1
        for i, event in enumerate(stream.events):
            got = decoder.feed(encoder.event(event))
            if i == last:
                got += decoder.feed(encoder.end())
            if got != event:
                raise SystemExit(
                    f"{codec_spec}: event {i} of {stream.name} is not decodable on arrival "
                    f"({len(got)} of {len(event)} bytes)"
                )


def wire_bytes(codec_spec: str, stream: Stream) -> int:
    codec = make_codec(codec_spec, stream.ndjson)
    encoder = codec.encoder()
    return sum(len(encoder.event(e)) for e in stream.events) + len(encoder.end())


def whole_bytes(codec_spec: str, stream: Stream) -> int:
    """The body in one read: what the codec gives without a flush per event."""
    codec = make_codec(codec_spec, stream.ndjson)
    encoder = codec.encoder()
    return len(encoder.event(b"".join(stream.events))) + len(encoder.end())


def cpu_us_per_event(codec_spec: str, streams: list[Stream], reps: int) -> float:
    """CPU time over `reps` passes of all the streams, a new encoder each, per event."""
    makers = []
    for stream in streams:
        codec = make_codec(codec_spec, stream.ndjson)
        makers.append((codec.encoder, stream.events))
    count = sum(len(evs) for _, evs in makers)
    best = float("inf")
    # The best of three groups of passes: this machine is shared, and others' work only adds.
    for _ in range(3):
        start = time.process_time()
        for _ in range(reps):
            for make, evs in makers:
                encoder = make()
                for e in evs:
                    encoder.event(e)
                encoder.end()
        best = min(best, time.process_time() - start)
    return best / (reps * count) * 1e6


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def probe(codec_spec: str, stream: Stream, count: int) -> dict[str, float]:
    """In a child process: `count` live encoders fed `stream` round-robin, event by event."""
    codec = make_codec(codec_spec, stream.ndjson)
    before = rss_kib()
    start = time.process_time()
    encoders = [codec.encoder() for _ in range(count)]
    for e in stream.events:
        for encoder in encoders:
            encoder.event(e)
    cpu = time.process_time() - start
    live = rss_kib()
    for encoder in encoders:
        encoder.end()
    return {
        "kib_per_stream": (live - before) / count,
        "cpu_us_per_event": cpu / (count * len(stream.events)) * 1e6,
    }


def run_probe(codec_spec: str, which: str, count: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--probe", codec_spec, "--probe-input", which,
         "--streams", str(count)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    ).stdout  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def probe_input(which: str, root: Path) -> Stream:
    if which == "bench":
        return BENCH
    return max(corpus(root), key=lambda s: s.raw)


# -- report ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run (CI)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--reps", type=int, default=None, help="passes for the CPU measure")
    parser.add_argument("--streams", type=int, default=None, help="live streams in the probe")
    parser.add_argument("--codec", action="append", help="a codec spec (repeatable)")
    parser.add_argument("--per-stream", action="store_true", help="wire bytes of every stream")
    parser.add_argument("--wire-only", action="store_true", help="bytes only: no CPU, no memory")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-input", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe:
        count = args.streams or 200
        print(json.dumps(probe(args.probe, probe_input(args.probe_input, args.corpus), count)))
        return

    quick = args.quick
    reps = args.reps or (2 if quick else 30)
    live = args.streams or (20 if quick else 500)
    specs = args.codec or ([BASELINE, "brotli:5:22", "zstd:3:0"] if quick else DEFAULT_CODECS)
    if BASELINE not in specs:
        specs = [BASELINE, *specs]
    streams = corpus(args.corpus)
    largest = max(streams, key=lambda s: s.raw)

    available = [make_codec(spec) for spec in specs]
    for codec in available:
        check_streams(codec.spec, [*streams, BENCH])

    raw_corpus = sum(s.raw for s in streams)
    events_corpus = sum(len(s.events) for s in streams)
    print(f"{len(streams)} corpus streams, {events_corpus} events, {raw_corpus} bytes; "
          f"benchmark stream {len(BENCH.events)} events, {BENCH.raw} bytes; "
          f"live-stream probe: {live} streams; CPU: best of 3 x {reps} passes; "
          f"Python {sys.version.split()[0]}")  # fmt: skip
    print()

    wires: dict[str, dict[str, int]] = {
        c.spec: {s.name: wire_bytes(c.spec, s) for s in [*streams, BENCH]} for c in available
    }
    base = wires[BASELINE]
    wholes = {c.spec: sum(whole_bytes(c.spec, s) for s in streams) for c in available}
    bench_wholes = {c.spec: whole_bytes(c.spec, BENCH) for c in available}

    def share(spec: str, names: list[str]) -> tuple[float, float]:
        total = sum(wires[spec][n] for n in names)
        return total, total / sum(base[n] for n in names) - 1

    print("| codec | corpus B/event | vs gzip | streams >=10% under gzip | bench B/event | "
          "vs gzip | CPU us/event corpus | CPU us/event bench | KiB/live stream bench | "
          "CPU us/event, live streams | KiB/live stream, largest corpus stream | "
          "one read, no flush: corpus vs gzip | one read: bench bytes, vs gzip |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = [s.name for s in streams]
    for codec in available:
        total, change = share(codec.spec, names)
        bench_total, bench_change = share(codec.spec, [BENCH.name])
        better = sum(1 for n in names if wires[codec.spec][n] <= 0.9 * base[n])
        cells = [f"{total / events_corpus:.1f}", f"{change:+.1%}", f"{better} / {len(names)}",
                 f"{bench_total / len(BENCH.events):.1f}", f"{bench_change:+.1%}"]  # fmt: skip
        if args.wire_only:
            cells += [""] * 5
        else:
            small = run_probe(codec.spec, "bench", live)
            big = run_probe(codec.spec, "largest", max(1, live // 4))
            cells += [
                f"{cpu_us_per_event(codec.spec, streams, reps):.1f}",
                f"{cpu_us_per_event(codec.spec, [BENCH], reps * 8):.1f}",
                f"{small['kib_per_stream']:.0f}",
                f"{small['cpu_us_per_event']:.1f}",
                f"{big['kib_per_stream']:.0f}",
            ]
        cells.append(f"{wholes[codec.spec] / wholes[BASELINE] - 1:+.1%}")
        bench_whole = bench_wholes[codec.spec]
        cells.append(f"{bench_whole}, {bench_whole / bench_wholes[BASELINE] - 1:+.1%}")
        print(f"| {codec.label} | " + " | ".join(cells) + " |", flush=True)
    print()
    print(f"Largest corpus stream: {largest.name}, {largest.raw} bytes, "
          f"{len(largest.events)} events; its probe runs {max(1, live // 4)} streams.")  # fmt: skip

    groups: dict[str, list[str]] = {}
    for s in streams:
        groups.setdefault(dialect(s.name), []).append(s.name)
    print()
    print("Wire bytes against gzip (tallygate's settings, Z_SYNC_FLUSH), by API:")
    print()
    print("| codec | " + " | ".join(f"{g} ({len(n)})" for g, n in groups.items()) + " |")
    print("|---|" + "---|" * len(groups))
    for codec in available[1:]:
        cells = [f"{share(codec.spec, n)[1]:+.1%}" for n in groups.values()]
        print(f"| {codec.label} | " + " | ".join(cells) + " |")

    if args.per_stream:
        print()
        print("| stream | events | raw | " + " | ".join(c.spec for c in available) + " |")
        print("|---|---|---|" + "---|" * len(available))
        for s in [*streams, BENCH]:
            cells = [str(wires[c.spec][s.name]) for c in available]
            print(f"| {s.name} | {len(s.events)} | {s.raw} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
