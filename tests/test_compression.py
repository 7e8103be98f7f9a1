"""The compression core, pure: no sockets. Fed whole, byte by byte and at random split points."""

from __future__ import annotations

import gzip
import itertools
import random
import re
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tallygate.core.codec import (
    GzipEncoder,
    GzipSettings,
    UpstreamDecoder,
    accepts_gzip,
    flush_policy,
    inflate_request,
    is_compressible,
)

from conftest import CASES, Case, gunzip

SETTINGS = GzipSettings()


def event_ends(body: bytes, ndjson: bool) -> list[int]:
    pattern = rb"\n" if ndjson else rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)"
    return [m.end() for m in re.finditer(pattern, body)]


# The empty stored block that ends a sync flush: its length 0 and the length's complement.
STORED_EMPTY = b"\x00\x00\xff\xff"


class BlockInflater:
    """An inflater that hands out decoded bytes only up to a stored block, as Go's compress/flate
    does (short of a full window or the end): the strictest common client. zlib's own inflate
    decodes past any complete block, so it alone cannot tell a partial flush from a sync flush."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def decompress(self, data: bytes) -> bytes:
        self._pending += data
        cut = self._pending.rfind(STORED_EMPTY) + len(STORED_EMPTY)
        if cut < len(STORED_EMPTY):
            return b""
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self._inflate.decompress(ready)

    def close(self, tail: bytes) -> bytes:
        out = self._inflate.decompress(self._pending + tail)
        assert self._inflate.eof
        return out


def check_streaming(case: Case, pieces: list[bytes]) -> None:
    """Feeding `pieces` one by one: after each, the client can decode every complete event so far,
    with zlib and with a decoder that waits for a stored block (Go's); at the end, it decodes
    exactly the body."""
    ndjson = case.content_type == "application/x-ndjson"
    encoder = GzipEncoder(SETTINGS, flush_policy(case.content_type, None))
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    strict = BlockInflater()
    ends = event_ends(case.body, ndjson)
    fed = decoded = released = 0
    for piece in pieces:
        out = encoder.feed(piece)
        decoded += len(inflate.decompress(out))
        released += len(strict.decompress(out))
        fed += len(piece)
        complete = max((e for e in ends if e <= fed), default=0)
        assert decoded >= complete, f"{case.id}: event ending at {complete} held back"
        assert released >= complete, f"{case.id}: event ending at {complete} held back from Go"
    last = encoder.close()
    tail = inflate.decompress(last)
    assert inflate.eof and decoded + len(tail) == len(case.body)
    assert released + len(strict.close(last)) == len(case.body)


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id[:3])
def test_every_event_is_decodable_on_arrival_at_random_splits(case: Case) -> None:
    rng = random.Random(case.id)
    for _ in range(3):
        cuts = [rng.randrange(1, len(case.body)) for _ in range(rng.randrange(1, 60))]
        check_streaming(case, split_at(case.body, cuts))
    check_streaming(case, [case.body])


@pytest.mark.parametrize("case", [c for c in CASES if c.id[:3] in ("007", "025", "040", "052")])
def test_byte_by_byte(case: Case) -> None:
    check_streaming(case, [case.body[i : i + 1] for i in range(len(case.body))])


@given(st.lists(st.sampled_from([b"data: x", b"\r", b"\n", b"\r\n", b": c", b"event: e"]),
                max_size=40), st.data())  # fmt: skip
def test_sse_boundaries_in_any_line_ending_mix(parts: list[bytes], data: st.DataObject) -> None:
    body = b"".join(parts) + b"\n\n"
    cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=10)) if len(body) > 1 else []
    case = Case("mix", body, {"content_type": "text/event-stream"}, None)
    check_streaming(case, split_at(body, cuts))


def test_each_event_ends_on_a_stored_block_that_every_inflater_decodes_to() -> None:
    # One event a read: each read's output ends with the empty stored block, and a decoder that
    # waits for one (Go's compress/flate) has the whole event from that output alone.
    events = [b'data: {"n":%d,"text":"%s"}\n\n' % (i, b"fox " * i) for i in range(30)]
    encoder = GzipEncoder(SETTINGS, "sse")
    strict = BlockInflater()
    for event in events:
        out = encoder.feed(event)
        assert out.endswith(STORED_EMPTY)
        assert strict.decompress(out) == event
    assert strict.close(encoder.close()) == b""


def test_one_flush_per_read_holding_several_events() -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(20)]
    together = GzipEncoder(SETTINGS, "sse")
    one_read = len(together.feed(b"".join(events)))
    apart = GzipEncoder(SETTINGS, "sse")
    one_per_read = sum(len(apart.feed(event)) for event in events)
    # Twenty flushes cost bytes that one flush does not.
    assert one_read < one_per_read - 19


def test_known_length_body_is_not_flushed_until_the_end() -> None:
    encoder = GzipEncoder(SETTINGS, "end")
    body = b'{"text": "' + b"abc " * 1000 + b'"}'
    head = encoder.feed(body)
    assert len(head) <= 10  # the gzip header at most
    assert gunzip(head + encoder.close()) == body


def test_compressor_state_is_bounded_by_the_defaults() -> None:
    """The defaults tested here are the ones tallygate runs with (defined once), and their
    state is the 80 KiB docs/configuration.md sizes a live stream with."""
    from tallygate.config import Compression

    configured = Compression()
    assert GzipSettings(configured.level, configured.window_bits, configured.mem_level) == SETTINGS
    assert SETTINGS.state_bytes() == 80 * 1024


def test_ratio_of_the_defaults_on_the_corpus_is_at_least_90_percent_of_zlibs() -> None:
    def size(settings: GzipSettings) -> int:
        total = 0
        for case in CASES:
            ndjson = case.content_type == "application/x-ndjson"
            encoder = GzipEncoder(settings, flush_policy(case.content_type, None))
            ends = [0, *event_ends(case.body, ndjson), len(case.body)]
            for a, b in itertools.pairwise(ends):
                total += len(encoder.feed(case.body[a:b]))
            total += len(encoder.close())
        return total

    raw = sum(len(c.body) for c in CASES)
    ours = raw / size(SETTINGS)
    reference = raw / size(GzipSettings(SETTINGS.level, 15, 8))
    assert ours >= 0.9 * reference, (ours, reference)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("*", True),
        ("*;q=0", False),
        ("br, *", True),
        ("*, gzip;q=0", False),
        ("br", False),
        ("identity", False),
        ("x-gzip", True),
        ("gzip;q=bogus", False),
    ],
)
def test_accept_encoding(header: str | None, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


def test_what_is_worth_compressing() -> None:
    assert is_compressible("text/event-stream; charset=utf-8", None, 1024)
    assert is_compressible("application/x-ndjson", None, 1024)
    assert is_compressible("application/json", 5000, 1024)
    assert not is_compressible("application/json", 200, 1024)
    assert is_compressible("application/vnd.api+json", None, 1024)
    assert not is_compressible("image/png", None, 1024)
    assert not is_compressible(None, None, 1024)


def test_flush_policy() -> None:
    assert flush_policy("Text/Event-Stream;charset=UTF-8", None) == "sse"
    assert flush_policy("application/x-ndjson", None) == "ndjson"
    assert flush_policy("application/json", None) == "read"
    assert flush_policy("application/json", 10_000) == "end"


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate"])
def test_upstream_decoder(coding: str) -> None:
    body = CASES[0].body
    if coding in ("gzip", "x-gzip"):
        encoded = gzip.compress(body)
    elif coding == "deflate":
        encoded = zlib.compress(body)
    else:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        encoded, coding = c.compress(body) + c.flush(), "deflate"
    decoder = UpstreamDecoder(coding)
    out = b"".join(decoder.feed(encoded[i : i + 7]) for i in range(0, len(encoded), 7))
    assert out + decoder.close() == body


def test_upstream_decoder_refuses_unknown_codings() -> None:
    with pytest.raises(ValueError, match="br"):
        UpstreamDecoder("br")


def test_upstream_decoder_output_is_bounded_per_call() -> None:
    """A gzip bomb comes out a piece at a time, whole and in order, across `feed` and `more`."""
    plain = bytes(range(256)) * 4096 + b"\0" * 2**22
    decoder = UpstreamDecoder("gzip", limit=10_000)
    pieces = [decoder.feed(gzip.compress(plain))]
    while decoder.pending:
        pieces.append(decoder.more())
    pieces.append(decoder.close())
    assert max(map(len, pieces)) <= 10_000
    assert b"".join(pieces) == plain


def test_inflate_request_is_bounded_and_knows_its_codings() -> None:
    plain = b'{"model":"gpt-4o"}' * 100
    assert inflate_request(gzip.compress(plain), "gzip", len(plain)) == plain
    assert inflate_request(zlib.compress(plain), "deflate", len(plain)) == plain
    raw = zlib.compressobj(wbits=-15)
    assert inflate_request(raw.compress(plain) + raw.flush(), "deflate", len(plain)) == plain
    assert inflate_request(gzip.compress(plain), "gzip", len(plain) - 1) is None  # past the limit
    assert inflate_request(gzip.compress(plain)[:-9], "gzip", len(plain)) is None  # cut short
    assert inflate_request(b"not gzip", "gzip", 100) is None
    assert inflate_request(plain, "br", len(plain)) is None


def test_every_flush_is_byte_aligned_for_every_inflater() -> None:
    """A flush must leave no bits pending: Go's compress/flate decodes only whole bytes of a
    block it has seen end, so the output at each event must end with a sync flush's empty
    stored block (00 00 ff ff), not a partial flush's empty static block."""
    encoder = GzipEncoder(GzipSettings(), "sse")
    for case in CASES[:10]:
        for event in re.findall(rb".*?\n\n", case.body, re.S)[:20]:
            assert encoder.feed(event).endswith(b"\x00\x00\xff\xff"), case.id
