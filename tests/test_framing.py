"""SSE and NDJSON framers: fed whole, byte by byte, at random split points; raw bytes round-trip."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tallygate.core.framing import EventTooLarge, NdjsonFramer, NdjsonLine, SseEvent, SseFramer

from conftest import CASES, Case


def frame(case_body: bytes, cuts: list[int], ndjson: bool) -> list[SseEvent] | list[NdjsonLine]:
    framer = NdjsonFramer() if ndjson else SseFramer()
    bounds = [0, *sorted(set(cuts)), len(case_body)]
    events: list = []
    for a, b in itertools.pairwise(bounds):
        events += framer.feed(case_body[a:b])
    return events + framer.close()


def signature(events: list) -> list[tuple]:
    return [tuple(getattr(e, f) for f in e.__slots__) for e in events]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id[:3])
def test_corpus_whole_bytewise_and_random_splits_agree(case: Case) -> None:
    ndjson = case.content_type == "application/x-ndjson"
    whole = frame(case.body, [], ndjson)
    assert b"".join(e.raw for e in whole) == case.body
    if not ndjson:
        expected = case.meta["body"]["sse_events"]
        assert len(whole) == expected, (len(whole), expected)
        assert sum(e.data is not None for e in whole) == case.meta["body"]["sse_data_events"]
    bytewise = frame(case.body, list(range(1, len(case.body))), ndjson)
    assert signature(bytewise) == signature(whole)
    rng = random.Random(case.id)
    for _ in range(5):
        cuts = [rng.randrange(1, len(case.body)) for _ in range(rng.randrange(1, 40))]
        assert signature(frame(case.body, cuts, ndjson)) == signature(whole)


def test_whatwg_fields() -> None:
    body = (
        b": keep-alive\n\n"
        b"event: add\ndata: line one\ndata:line two\nid: 7\nretry: 3000\n\n"
        b"data\n\n"
        b"data: x\r\n\r\n"
        b"data: y\r\r"
        b"data: unterminated"
    )
    events = frame(body, [], False)
    assert [(e.data, e.event, e.id, e.retry) for e in events] == [
        (None, None, None, None),
        (b"line one\nline two", "add", "7", 3000),
        (b"", None, None, None),
        (b"x", None, None, None),
        (b"y", None, None, None),
        (b"unterminated", None, None, None),
    ]
    assert b"".join(e.raw for e in events) == body


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    framer = SseFramer()
    # Complete but for a possible LF: held until the next byte says which.
    assert framer.feed(b"data: a\r\n\r") == []
    assert framer.feed(b"\n") == [SseEvent(b"data: a\r\n\r\n", b"a")]
    assert [e.data for e in framer.feed(b"data: b\r\n\r\n")] == [b"b"]
    assert framer.feed(b"data: c\r\r") == []
    assert framer.feed(b"data: d\n\n") == [
        SseEvent(b"data: c\r\r", b"c"),
        SseEvent(b"data: d\n\n", b"d"),
    ]
    assert framer.feed(b"data: e\r\r") == []
    assert framer.close() == [SseEvent(b"data: e\r\r", b"e")]


@given(st.lists(st.sampled_from([b"data: x", b"data:", b": c", b"event: e", b"id: 1", b"\r",
                                 b"\n", b"\r\n", "é".encode(), b"retry: 5"]), max_size=30),
       st.data())  # fmt: skip
def test_any_line_ending_mix_frames_identically_at_any_split(
    parts: list[bytes], data: st.DataObject
) -> None:
    body = b"".join(parts)
    whole = frame(body, [], False)
    assert b"".join(e.raw for e in whole) == body
    if len(body) > 1:
        cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=12))
        assert signature(frame(body, cuts, False)) == signature(whole)
    # Garbage after a complete stream does not disturb the events before it.
    extended = frame(body + b"\n\n\xff\xfe garbage", [], False)
    assert b"".join(e.raw for e in extended) == body + b"\n\n\xff\xfe garbage"


@given(st.lists(st.sampled_from([b"data: x", b"data:", b": c", b"event: e", b"id: 1", b"\n",
                                 b"\n\n", "é".encode(), b"retry: 5", b'data: {"a":1}',
                                 b"event: e\ndata: x\n\n", b"event: \ndata: x\ndata: y\n\n"]),
                max_size=40),
       st.lists(st.integers(1, 400), max_size=8))  # fmt: skip
@example([b"event: e\ndata: x\n\n", "event: é\ndata: \n\n".encode(), b"event:e\ndata: x\n\n"], [])
def test_lf_fast_path_frames_as_the_general_path(parts: list[bytes], cuts: list[int]) -> None:
    # LF-only streams take a fast path (cut at b"\n\n"); the general line-by-line path is the
    # reference. Forcing it is the only way to compare them on the same bytes.
    body = b"".join(parts)
    bounds = [0, *sorted({c for c in cuts if c < len(body)}), len(body)]
    fast, general = SseFramer(), SseFramer()
    general._general = True
    results = []
    for framer in (fast, general):
        events = []
        for a, b in itertools.pairwise(bounds):
            events += framer.feed(body[a:b])
        results.append(signature(events + framer.close()))
    assert fast._general is False
    assert results[0] == results[1]


@given(st.lists(st.sampled_from([b"data: x", b"data:", b"data: {}", b": c", b"event: e", b"\n",
                                 b"\n\n", b"\r", b"x" * 40]), max_size=30),
       st.lists(st.integers(1, 400), max_size=8), st.sampled_from([12, 40, 1 << 20]))  # fmt: skip
@example([b"data: a", b"\n\n", b"data: ", b"x" * 40, b"\n\n"], [], 40)  # too large, in one read
def test_feed_data_gives_the_data_feed_gives(
    parts: list[bytes], cuts: list[int], bound: int
) -> None:
    # The meter's way in: the data alone when a read holds only single data lines, the events
    # otherwise; either way the same data in the same order as feed(), and the same refusals.
    body = b"".join(parts)
    bounds = [0, *sorted({c for c in cuts if c < len(body)}), len(body)]
    results = []
    for data_only in (False, True):
        framer = SseFramer(max_event_bytes=bound)
        seen: list[tuple[bytes | None, str | None]] = []
        try:
            for a, b in itertools.pairwise(bounds):
                if data_only:
                    datas, events = framer.feed_data(body[a:b])
                    assert not (datas and events)
                    seen += [(data, None) for data in datas]
                else:
                    events = framer.feed(body[a:b])
                seen += [(event.data, event.event) for event in events]
            seen += [(event.data, event.event) for event in framer.close()]
        except EventTooLarge as error:
            seen += [("too large", len(error.events))]  # type: ignore[list-item]
        results.append(seen)
    assert results[0] == results[1]


def test_event_size_is_bounded() -> None:
    framer = SseFramer(max_event_bytes=100)
    framer.feed(b"data: " + b"x" * 90)
    with pytest.raises(EventTooLarge):
        framer.feed(b"x" * 20)
    ndjson = NdjsonFramer(max_event_bytes=100)
    with pytest.raises(EventTooLarge):
        ndjson.feed(b"{" * 101)
    # Complete in one read, too large all the same; the events of that read are handed back.
    with pytest.raises(EventTooLarge) as raised:
        SseFramer(max_event_bytes=100).feed(b"data: a\n\ndata: " + b"x" * 200 + b"\n\n")
    assert [e.data for e in raised.value.events] == [b"a", b"x" * 200]


def test_ndjson_lines() -> None:
    framer = NdjsonFramer()
    assert framer.feed(b'{"a":1}\n{"b"') == [NdjsonLine(b'{"a":1}\n', b'{"a":1}')]
    assert framer.feed(b":2}\r\n\n") == [
        NdjsonLine(b'{"b":2}\r\n', b'{"b":2}'),
        NdjsonLine(b"\n", b""),
    ]
    assert framer.feed(b'{"c":3}') == []
    assert framer.close() == [NdjsonLine(b'{"c":3}', b'{"c":3}')]
