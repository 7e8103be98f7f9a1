"""Content codings: gzip toward the client, flushed at event boundaries, and decoding of an
upstream's Content-Encoding so that the proxy always sees plain bytes.

Pure: fed bytes, returns bytes. No sockets, no clock, no event loop.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

# Where the compressor is flushed so that the client can decode what it has:
# - "sse": after the last complete SSE event in each upstream read (blank line, any line ending);
# - "ndjson": after the last complete line in each read;
# - "read": after every read (other streamed bodies: we cannot know their boundaries);
# - "end": only at the end (a body of known length, read at once by the client anyway).
FlushPolicy = Literal["sse", "ndjson", "read", "end"]

_COMPRESSIBLE_PREFIXES = ("text/",)
_COMPRESSIBLE_TYPES = frozenset(
    {
        "text/event-stream",
        "application/x-ndjson",
        "application/jsonl",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
    }
)


def media_type(content_type: str | None) -> str:
    """`Text/Event-Stream; charset=utf-8` -> `text/event-stream`."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def flush_policy(content_type: str | None, content_length: int | None) -> FlushPolicy:
    """The one place that decides when compressed bytes are flushed toward the client.

    Like Caddy's reverse proxy: event streams flush at once, and so does any body of unknown
    length, because something may be waiting on each piece of it.
    """
    kind = media_type(content_type)
    if kind == "text/event-stream":
        return "sse"
    if kind in ("application/x-ndjson", "application/jsonl"):
        return "ndjson"
    if content_length is None:
        return "read"
    return "end"


def is_compressible(content_type: str | None, content_length: int | None, min_length: int) -> bool:
    """Worth gzipping: text-like content that is streamed or at least `min_length` bytes."""
    kind = media_type(content_type)
    if not (
        kind in _COMPRESSIBLE_TYPES
        or kind.startswith(_COMPRESSIBLE_PREFIXES)
        or kind.endswith("+json")
    ):
        return False
    return content_length is None or content_length >= min_length


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header admits gzip (RFC 9110 section 12.5.3).

    `gzip;q=0` refuses gzip even when `*` is accepted; `*` with q > 0 admits it when gzip is not
    named; a header that is absent admits nothing (we never compress unasked).
    """
    if not accept_encoding:
        return False
    star: float | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        quality = _quality(params)
        if coding in ("gzip", "x-gzip"):
            return quality > 0
        if coding == "*":
            star = quality
    return star is not None and star > 0


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                return max(0.0, min(1.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


@dataclass(frozen=True, slots=True)
class GzipSettings:
    """The compressor's settings. The defaults are the configuration's (`compression.*`).

    14 and 5 give 64 KiB + 16 KiB of zlib state per live stream (zlib's formula: 2^(wbits+2) +
    2^(memLevel+9)) and keep 99.7% of the ratio of zlib's defaults (256 KiB) on the corpus
    streams. A 4 KiB window (12) saved 56 KiB a stream but sent 6% more bytes, and its small
    hash table made level 6 search longer; `python bench/compression_params.py` measures both."""

    level: int = 6
    window_bits: int = 14
    mem_level: int = 5

    def state_bytes(self) -> int:
        """zlib's documented deflate memory: 2^(windowBits+2) + 2^(memLevel+9)."""
        return (1 << (self.window_bits + 2)) + (1 << (self.mem_level + 9))


DEFAULT_GZIP = GzipSettings()


class GzipEncoder:
    """gzip of a stream, flushed so that every complete event can be decoded on arrival.

    One flush per upstream read at the most (at its last complete event), not one per event:
    a read holding several events costs one flush marker, and a partial event at the end of a
    read waits in zlib for its end, which the client could not use before anyway.
    """

    __slots__ = ("_after_cr", "_compressor", "_policy", "_tail")

    def __init__(self, settings: GzipSettings, policy: FlushPolicy) -> None:
        # wbits + 16 selects the gzip container (header and CRC trailer) rather than zlib's.
        self._compressor = zlib.compressobj(
            settings.level, zlib.DEFLATED, 16 + settings.window_bits, settings.mem_level
        )
        self._policy = policy
        self._tail = 0  # the last byte fed, for an SSE boundary split across two reads
        self._after_cr = False  # the last flush ended on a CR whose LF may come next

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        end = self._flush_point(data)
        compressor = self._compressor
        if end <= 0:
            return compressor.compress(data)
        # A sync flush ends the block and adds an empty stored one (the 00 00 ff ff marker):
        # every inflater decodes all of it on arrival. Go's compress/flate (every Go program's
        # transparent gzip) hands out decoded bytes only at a stored block, a full window or the
        # end, so a partial flush (an empty compressed block, 3 bytes smaller) left a Go client
        # waiting for the next event; a stored block's 4 length bytes are the least that works.
        if end == len(data):
            return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        view = memoryview(data)
        head = compressor.compress(view[:end])
        head += compressor.flush(zlib.Z_SYNC_FLUSH)
        return head + compressor.compress(view[end:])

    def close(self) -> bytes:
        """The rest of the stream and the gzip trailer."""
        return self._compressor.flush(zlib.Z_FINISH)

    def flush(self) -> bytes:
        """Everything fed so far, decodable, without ending the gzip member (a cut stream)."""
        return self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def _flush_point(self, data: bytes) -> int:
        """How many leading bytes of `data` end at a boundary worth a flush (0: none)."""
        policy = self._policy
        if policy == "read":
            return len(data)
        if policy == "end":
            return 0
        if policy == "ndjson":
            return data.rfind(b"\n") + 1
        tail, self._tail = self._tail, data[-1]
        end = _sse_flush_point(data, tail)
        if self._after_cr and data[0] == _LF:
            end = max(end, 1)  # the LF of a CRLF that ended an event: clients may wait for it
        self._after_cr = end == len(data) and data[-1] == _CR
        return end


_LF, _CR = 0x0A, 0x0D


def _sse_flush_point(data: bytes, tail: int) -> int:
    # An SSE event ends with an empty line: two line ends in a row, where a line end is LF, CR or
    # CRLF. Two in a row therefore show as LF LF, LF CR or CR CR (CR LF is a single line end).
    end = data.rfind(b"\n\n")
    if _CR in data:  # rare: most streams end lines with LF alone, and two more scans cost
        end = max(end, data.rfind(b"\n\r"), data.rfind(b"\r\r"))
    if end >= 0:
        end += 2
        # Keep a CRLF whole when its LF is already here, so clients that wait for it need not.
        if end < len(data) and data[end - 1] == _CR and data[end] == _LF:
            end += 1
        return end
    first = data[0]
    if (tail == _LF and first in (_LF, _CR)) or (tail == _CR and first == _CR):
        return 2 if len(data) > 1 and first == _CR and data[1] == _LF else 1
    return 0


class UpstreamDecoder:
    """Undoes an upstream's Content-Encoding (gzip, x-gzip, deflate), so metering and the client's
    own compression see the plain body. Only single-coding responses are decoded.

    Output is bounded: `feed` and `more` return at most `limit` bytes, and `pending` says whether
    input is still waiting to be inflated. A small compressed read that inflates to gigabytes (a
    gzip bomb) therefore costs one piece of memory at a time, and the relay writes each piece
    (waiting while the client's socket is full) before asking for the next."""

    DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
    LIMIT = 64 * 1024

    __slots__ = ("_decompressor", "_first", "_limit")

    def __init__(self, coding: str, limit: int = LIMIT) -> None:
        coding = coding.strip().lower()
        if coding not in self.DECODABLE:
            raise ValueError(f"cannot decode content coding {coding!r}")
        # 32 + MAX_WBITS accepts gzip and zlib headers alike; a bare deflate stream (as some
        # servers send for "deflate") is detected on the first bytes.
        self._decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._first = coding == "deflate"
        self._limit = limit

    def feed(self, data: bytes) -> bytes:
        """Inflate `data`, up to `limit` bytes of it; call `more` while `pending`."""
        if self._first and data:
            self._first = False
            if data[0] & 0x0F != 8:  # not a zlib header: raw deflate
                self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._decompressor.decompress(data, self._limit)

    @property
    def ended(self) -> bool:
        """The coded stream's end has been inflated (a body cut short has not)."""
        return self._decompressor.eof

    @property
    def pending(self) -> bool:
        """Input fed but not yet inflated (the output limit stopped it)."""
        return bool(self._decompressor.unconsumed_tail)

    def more(self) -> bytes:
        """The next piece of what was fed, up to `limit` bytes."""
        return self._decompressor.decompress(self._decompressor.unconsumed_tail, self._limit)

    def close(self) -> bytes:
        """What the inflater still holds once the body has ended (nothing is `pending` then)."""
        return self._decompressor.flush()


def inflate_request(body: bytes, coding: str, limit: int) -> bytes | None:
    """A copy of a request body sent with `Content-Encoding: coding`, decoded for metering only
    (the body itself goes upstream as sent): None when it is not gzip or deflate, is corrupt, or
    inflates past `limit` (inflating stops there: a small bomb costs `limit`, not its size)."""
    if coding not in UpstreamDecoder.DECODABLE:
        return None
    decoder = UpstreamDecoder(coding, limit + 1)
    try:
        plain = decoder.feed(body)
    except zlib.error:
        return None
    if len(plain) > limit or not decoder.ended:
        return None
    return plain
