"""The incremental SSE parser: every way a network read can split a stream yields the same events."""

from __future__ import annotations

import pytest

from feather_grpc.providers.sse import SSEEvent, SSELimitExceeded, SSEParser

# A stream with named and unnamed events, a comment, multi-line data, a field without a space after
# the colon, an id, a retry field, multi-byte UTF-8 (2, 3 and 4 bytes) and an empty data line.
SAMPLE = (
    ": keep-alive comment\n"
    "event: message_start\n"
    'data: {"type":"message_start"}\n'
    "\n"
    "data: first line\n"
    "data: second line\n"
    "id: 7\n"
    "retry: 1000\n"
    "\n"
    "data:no-space ünï €uro 🦊\n"
    "\n"
    "event: ping\n"
    "data\n"
    "\n"
    "data:  two spaces keep one\n"
    "\n"
)
EXPECTED = [
    SSEEvent('{"type":"message_start"}', "message_start", ""),
    SSEEvent("first line\nsecond line", "", "7"),
    SSEEvent("no-space ünï €uro 🦊", "", "7"),
    SSEEvent("", "ping", "7"),
    SSEEvent(" two spaces keep one", "", "7"),
]


def encoded(ending: str) -> bytes:
    return SAMPLE.replace("\n", ending).encode("utf-8")


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    start = 0
    for cut in [*cuts, len(data)]:
        events.extend(parser.feed(data[start:cut]))
        start = cut
    return events


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_whole_stream_in_one_read(ending: str) -> None:
    assert parse_in_pieces(encoded(ending), []) == EXPECTED


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_byte_by_byte(ending: str) -> None:
    data = encoded(ending)
    assert parse_in_pieces(data, list(range(1, len(data)))) == EXPECTED


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_every_single_split_point(ending: str) -> None:
    data = encoded(ending)
    for i in range(len(data) + 1):
        assert parse_in_pieces(data, [i]) == EXPECTED, f"split at byte {i}"


def test_every_pair_of_split_points_with_crlf() -> None:
    data = encoded("\r\n")
    for i in range(0, len(data), 3):
        for j in range(i, len(data), 7):
            assert parse_in_pieces(data, [i, j]) == EXPECTED, f"splits at {i}, {j}"


def test_split_utf8_sequence_is_reassembled() -> None:
    data = "data: 🦊€\n\n".encode()
    fox = data.index("🦊".encode())
    parser = SSEParser()
    assert parser.feed(data[: fox + 1]) == []
    assert parser.feed(data[fox + 1 : fox + 3]) == []
    assert parser.feed(data[fox + 3 :]) == [SSEEvent("🦊€")]


def test_cr_then_lf_in_next_read_is_one_line_ending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF belongs to the CR: not a blank line
    assert parser.feed(b"\r") == [SSEEvent("a")]
    assert parser.feed(b"\n") == []  # again the tail of a CRLF
    assert parser.feed(b"\n") == []  # a real blank line, but no data is pending
    assert parser.feed(b"data: b\n\n") == [SSEEvent("b")]


def test_mixed_line_endings() -> None:
    # CRLF ends "data: a" and LF is the blank line; CR ends "data: b" and a second CR is the blank line.
    assert parse_in_pieces(b"data: a\r\n\ndata: b\r\r", []) == [SSEEvent("a"), SSEEvent("b")]


def test_empty_reads_change_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [SSEEvent("a")]


def test_incomplete_event_at_end_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\n") == []  # no blank line yet: the stream could still add lines
    assert parser.has_partial_event
    parser2 = SSEParser()
    assert parser2.feed(b"data: [DONE]") == []
    assert parser2.has_partial_event


def test_comments_only_and_blank_lines_dispatch_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b": ping\n\n:\n\n\n\n") == []
    assert not parser.has_partial_event


def test_event_name_does_not_leak_into_next_event() -> None:
    events = parse_in_pieces(b"event: a\ndata: 1\n\ndata: 2\n\n", [])
    assert events == [SSEEvent("1", "a"), SSEEvent("2", "")]


def test_event_name_without_data_is_dropped() -> None:
    assert parse_in_pieces(b"event: lonely\n\ndata: x\n\n", []) == [SSEEvent("x")]


def test_leading_byte_order_mark_is_ignored_even_when_split() -> None:
    data = b"\xef\xbb\xbfdata: x\n\n"
    assert parse_in_pieces(data, [1]) == [SSEEvent("x")]
    assert parse_in_pieces(data, [2, 5]) == [SSEEvent("x")]


def test_field_without_colon_and_unknown_fields() -> None:
    assert parse_in_pieces(b"data\nfoo: bar\ndata: y\n\n", []) == [SSEEvent("\ny")]


def test_id_with_nul_is_ignored() -> None:
    assert parse_in_pieces(b"id: 1\ndata: a\n\nid: x\x00y\ndata: b\n\n", []) == [
        SSEEvent("a", "", "1"),
        SSEEvent("b", "", "1"),
    ]


@pytest.mark.parametrize("piece", [1, 100, 4096])
def test_a_line_that_never_ends_fails_once_it_passes_the_limit(piece: int) -> None:
    parser = SSEParser(max_event_bytes=10_000)
    fed = 0
    with pytest.raises(SSELimitExceeded, match="a stream line over the 10000-byte limit"):
        while True:
            assert parser.feed(b"x" * piece) == []
            fed += piece
            assert fed <= 10_000  # not one piece more than needed
    assert fed + piece > 10_000


def test_the_limit_counts_the_unfinished_line_after_whole_ones_in_the_same_read() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(b"data: a\n\n" + b"x" * 999) == [SSEEvent("a")]  # a partial line of 999: allowed
    with pytest.raises(SSELimitExceeded, match="a stream line"):
        parser.feed(b"data: b\n\n" + b"y" * 1001)


def test_an_event_of_many_short_lines_fails_at_the_limit_and_events_under_it_pass() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(b"data: " + b"z" * 990 + b"\n\n") == [SSEEvent("z" * 990)]  # the limit is per event
    assert parser.feed(b"event: e\n" + b"data: 0123456789\n" * 99) == []
    with pytest.raises(SSELimitExceeded, match="a stream event over the 1000-byte limit"):
        parser.feed(b"data: 0123456789\n")


def test_the_event_limit_counts_utf8_bytes_not_characters() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(("data: " + "€" * 333 + "\n\n").encode()) == [SSEEvent("€" * 333)]  # 999 bytes
    with pytest.raises(SSELimitExceeded, match="a stream event over the 1000-byte limit"):
        parser.feed(("data: " + "€" * 334 + "\n\n").encode())  # 334 characters, 1,002 bytes


def test_an_unfinished_line_kept_in_pieces_joins_to_the_same_events() -> None:
    parser = SSEParser()
    data = encoded("\r\n")
    events = [e for i in range(len(data)) for e in parser.feed(data[i : i + 1])]
    assert events == EXPECTED
