"""Incremental framers for event streams: SSE (WHATWG HTML, "Parsing an event stream") and NDJSON.

Pure: fed bytes with `feed()`, ended with `close()`, they return small events. Every event
keeps its exact raw bytes, so the concatenation of all events' `raw` equals the input: a consumer
can rebuild (or filter) the stream from events alone. No sockets, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

_LINE_END = re.compile(rb"\r\n|\r|\n")
# Membership tests on the hot path take the byte as an int: `b"\n" in data` costs CPython 3.11
# a TypeError raised and cleared inside (it tries the needle as an int first), about 1,800
# instructions, where `0x0A in data` is a plain memchr (bench/instructions.py).
_CR, _LF = 0x0D, 0x0A

# An event larger than this is not metered (the relay goes on). LLM stream events are a few hundred
# bytes; the largest in the corpus (a Responses API `response.completed` that repeats the whole
# output and the tool list) is under 30 KiB. nginx's default proxy_buffer_size is 4-8 KiB and its
# large_client_header_buffers 8 KiB; an event is a whole message, so we allow far more.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class EventTooLarge(Exception):
    """A single event grew past the bound: the stream is not ours to judge, metering stops.

    `events` holds the complete events of the same feed, so none of their bytes is lost."""

    def __init__(self, message: str, events: list[SseEvent] | list[NdjsonLine]) -> None:
        super().__init__(message)
        self.events = events


# Not frozen: a frozen dataclass costs three times as much to build (object.__setattr__ per
# field), and one is built for every event of every stream.
@dataclass(slots=True)
class SseEvent:
    """One SSE block, up to and including its blank line.

    `data` is None when the block had no data field (a comment such as `: keep-alive`, or only
    `event:`/`id:` lines): browsers do not dispatch those.
    """

    raw: bytes
    data: bytes | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None


@dataclass(slots=True)
class NdjsonLine:
    raw: bytes  # the line with its terminator
    data: bytes  # the line without it, possibly empty
    event: ClassVar[None] = None  # lines have no event names; read alike with SseEvent


class SseFramer:
    __slots__ = (
        "_buf", "_data", "_event", "_general", "_held", "_id", "_line_start", "_max", "_pending",
        "_retry", "_skip_lf",
    )  # fmt: skip

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # the bytes of the event being read
        self._line_start = 0  # where the line being read starts in _buf
        self._skip_lf = False  # the last byte was a CR: an LF right after it is the same line end
        self._held = False  # _buf is a complete event but for a possible LF
        # Streams with LF line ends only (nearly all) take a fast path that cuts events at
        # b"\n\n" with bytes.find; the first CR switches the stream to the general path.
        self._general = False
        self._pending = b""  # the fast path's incomplete event
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def pending(self) -> bytes:
        """Bytes fed that belong to no complete event yet."""
        return bytes(self._buf) if self._general else self._pending

    def feed(self, data: bytes) -> list[SseEvent]:
        cut = self._cut(data)
        if cut is None:
            return self._to_general(data)
        return self._events(*cut)

    def feed_data(self, data: bytes) -> tuple[list[bytes], list[SseEvent]]:
        """`feed()` for a caller that reads only the events' data (the meter, when it does not
        rebuild the stream). When every event that `data` completes is a single `data:` line, as
        in nearly every read of an LLM stream, and the read is within the size bound, their data
        comes back alone, in the first list, without raw bytes or event objects (on the
        benchmark stream they were a quarter of what framing cost). Otherwise the events come
        back in the second, as `feed()` gives them. One of the two lists is always empty."""
        cut = self._cut(data)
        if cut is None:
            return [], self._to_general(data)
        parts, size = cut
        datas = [part[6:] for part in parts if part[:6] == b"data: " and _LF not in part]
        if len(datas) == len(parts) and size <= self._max:
            return datas, []
        return [], self._events(parts, size)

    def _cut(self, data: bytes) -> tuple[list[bytes], int] | None:
        """The fast path: the complete events `data` ends, cut before their blank line, and the
        size of what was cut; None once the stream takes the general path (its first CR on)."""
        if self._general or _CR in data:
            self._general = True
            return None
        buf = self._pending + data if self._pending else data
        # Events end at the leftmost non-overlapping b"\n\n" of the stream, so cutting the
        # pending bytes plus the new ones gives the same events however the stream was split.
        parts = buf.split(b"\n\n")
        self._pending = parts.pop()
        return parts, len(buf)

    def _events(self, parts: list[bytes], size: int) -> list[SseEvent]:
        """The events of the fast path's parts; EventTooLarge past the bound."""
        try:
            # The usual event is one `data:` line: a membership test (memchr) tells it apart.
            events = [
                SseEvent(part + b"\n\n", part[6:])
                if part[:6] == b"data: " and _LF not in part
                else _lf_part(part)
                for part in parts
            ]
        except _BlankLines:
            events = _with_blank_lines(parts)
        if size > self._max and (
            len(self._pending) > self._max or any(len(e.raw) > self._max for e in events)
        ):
            raise EventTooLarge(f"an SSE event exceeds {self._max} bytes", events)
        return events

    def _to_general(self, data: bytes) -> list[SseEvent]:
        # The fast path's pending bytes, when it has just been left, go first.
        pending, self._pending = self._pending, b""
        return self._feed_general(pending + data) if pending or data else []

    def _feed_general(self, data: bytes) -> list[SseEvent]:
        buf = self._buf
        scan_from = len(buf)
        buf += data
        events: list[SseEvent] = []
        event_start = 0
        line_start = self._line_start
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:  # the LF of a CRLF whose CR ended the last read
                scan_from += 1
                line_start = scan_from
        if self._held:
            # A blank line ended by a CR at the end of the last read: now we know whether an LF
            # belonged to it, so every split of the input yields the same events.
            self._held = False
            events.append(self._dispatch(bytes(buf[:scan_from])))
            event_start = line_start = scan_from
        for match in _LINE_END.finditer(buf, scan_from):
            end = match.end()
            cr_at_end = end == len(buf) and buf[end - 1] == _CR
            if cr_at_end:
                self._skip_lf = True
            if match.start() == line_start:  # a blank line: the event is complete
                if cr_at_end:
                    self._held = True
                    line_start = end
                    break
                events.append(self._dispatch(bytes(buf[event_start:end])))
                event_start = end
            else:
                self._field(buf[line_start : match.start()])
            line_start = end
        if event_start:
            del buf[:event_start]
        self._line_start = line_start - event_start
        if len(buf) > self._max or any(len(event.raw) > self._max for event in events):
            raise EventTooLarge(f"an SSE event exceeds {self._max} bytes", events)
        return events

    def close(self) -> list[SseEvent]:
        """The last event, when the stream ended without its blank line (or mid-line)."""
        if not self._general:
            pending, self._pending = self._pending, b""
            if pending[:1] == b"\n" and len(pending) > 1:  # a blank line, then the last event
                return [SseEvent(b"\n"), _lf_event(pending[1:], terminated=False)]
            return [_lf_event(pending, terminated=False)] if pending else []
        if not self._buf:
            return []
        if self._line_start < len(self._buf):
            self._field(self._buf[self._line_start :])
        event = self._dispatch(bytes(self._buf))
        self._buf.clear()
        self._line_start = 0
        self._held = self._skip_lf = False
        return [event]

    def _field(self, line: bytearray) -> None:
        if line[:1] == b":":
            return  # a comment
        name, colon, value = bytes(line).partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, raw: bytes) -> SseEvent:
        data = b"\n".join(self._data) if self._data else None
        event = SseEvent(raw, data, self._event, self._id, self._retry)
        self._reset_fields()
        return event


class _BlankLines(Exception):
    """A read in which blank lines run on: framed by _with_blank_lines instead."""


def _lf_part(part: bytes) -> SseEvent:
    """An event other than a single data line, cut at b"\n\n"; raises _BlankLines for a piece
    that shows a run of blank lines (empty, or starting with the LF of a third line end)."""
    if not part or part[0] == _LF:
        raise _BlankLines
    return _lf_event(part + b"\n\n")


def _with_blank_lines(parts: list[bytes]) -> list[SseEvent]:
    """Events from pieces cut at b"\n\n" where blank lines run on: each extra blank line is an
    event of its own (as the general path sees it), so that both paths cut the same raw bytes.
    A piece holds no b"\n\n": it is empty (two blank lines) or starts with at most one LF."""
    events: list[SseEvent] = []
    for part in parts:
        if not part:
            events += (SseEvent(b"\n"), SseEvent(b"\n"))
            continue
        if part[0] == _LF:
            events.append(SseEvent(b"\n"))
            part = part[1:]
        events.append(_lf_event(part + b"\n\n"))
    return events


def _lf_event(raw: bytes, terminated: bool = True) -> SseEvent:
    """An event with LF line ends only and no blank line inside."""
    body = raw[:-2] if terminated else raw.rstrip(b"\n")
    if body.startswith(b"data: ") and _LF not in body:  # the common case: one data line
        return SseEvent(raw, body[6:])
    if body.startswith(b"event: "):  # named events (Anthropic, Responses): a name, one data line
        end = body.find(b"\n")
        if end > 0 and body.startswith(b"data: ", end + 1) and _LF not in body[end + 1 :]:
            return SseEvent(raw, body[end + 7 :], body[7:end].decode("utf-8", "replace"))
    data: list[bytes] = []
    event = event_id = None
    retry = None
    for line in body.split(b"\n"):
        if line[:1] == b":":
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            retry = int(value)
    return SseEvent(raw, b"\n".join(data) if data else None, event, event_id, retry)


class NdjsonFramer:
    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = b""

    @property
    def pending(self) -> bytes:
        return self._buf

    def feed(self, data: bytes) -> list[NdjsonLine]:
        buf = self._buf + data if self._buf else data
        parts = buf.split(b"\n")
        self._buf = parts.pop()
        lines = [NdjsonLine(part + b"\n", part.rstrip(b"\r")) for part in parts]
        if len(buf) > self._max and (
            len(self._buf) > self._max or any(len(line.raw) > self._max for line in lines)
        ):
            raise EventTooLarge(f"an NDJSON line exceeds {self._max} bytes", lines)
        return lines

    def close(self) -> list[NdjsonLine]:
        if not self._buf:
            return []
        line = NdjsonLine(self._buf, self._buf.rstrip(b"\r"))
        self._buf = b""
        return [line]
