"""The policy protocol parser: golden Postfix requests, every chunking, every limit, fuzzing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd import protocol
from policyd.protocol import (
    MAX_ATTRIBUTES,
    MAX_LINE_BYTES,
    MAX_REQUEST_BYTES,
    LineTooLong,
    MalformedRequest,
    PolicyRequest,
    ProtocolError,
    RequestParser,
    RequestTooLarge,
    TooManyAttributes,
    format_reply,
    parse_request,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN: dict[str, bytes] = {path.stem: path.read_bytes() for path in sorted(GOLDEN_DIR.glob("*.txt"))}

# What Postfix 3.7 sends, in the order it sends it (check_policy_service() in smtpd_check.c).
POSTFIX_37_ATTRIBUTES = (
    "request",
    "protocol_state",
    "protocol_name",
    "client_address",
    "client_name",
    "client_port",
    "reverse_client_name",
    "server_address",
    "server_port",
    "helo_name",
    "sender",
    "recipient",
    "recipient_count",
    "queue_id",
    "instance",
    "size",
    "etrn_domain",
    "stress",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    "ccert_pubkey_fingerprint",
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "policy_context",
    "compatibility_level",
    "mail_version",
)

SLICE_SIZES = (1, 2, 3, 7, 16, 128, 4096)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def chunks(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """`data` cut into pieces of the given sizes, used in turn (cycling)."""
    position = 0
    index = 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        yield data[position : position + size]
        position += size
        index += 1


def feed_all(
    data: bytes, sizes: Sequence[int] = (), parser: RequestParser | None = None
) -> list[dict[str, str]]:
    """Feed `data` (whole, or in pieces of `sizes`) and return the attributes of every request."""
    parser = parser if parser is not None else RequestParser()
    pieces = chunks(data, sizes) if sizes else iter([data])
    return [request.attributes for piece in pieces for request in parser.feed(piece)]


def reference_attributes(raw: bytes) -> dict[str, str]:
    """The attributes of one golden request, parsed the naive way (independently of the parser)."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n") and not text.endswith("\n\n\n")
    return dict(line.split("=", 1) for line in text[:-2].split("\n"))


def first_refusal(data: bytes) -> tuple[int, ProtocolError]:
    """Feed `data` one byte at a time; the offset of the byte that was refused, and why."""
    parser = RequestParser()
    for offset in range(len(data)):
        try:
            parser.feed(data[offset : offset + 1])
        except ProtocolError as error:
            return offset, error
    raise AssertionError(f"{len(data)} bytes fed one at a time and none refused")


def request_block(size: int, line_bytes: int = MAX_LINE_BYTES) -> bytes:
    """Valid name=value lines (each at most `line_bytes`) joined by newlines, exactly `size` bytes.

    Without the final empty line, so it is what the parser measures against MAX_REQUEST_BYTES.
    The last byte is never a newline.
    """
    lines: list[bytes] = []
    left = size
    while left > 0:
        if lines:
            left -= 1  # the newline before this line
        length = min(left, line_bytes)
        if 0 < left - length < 8:
            length -= 8  # leave the next line room for its name
        name = b"n%d=" % len(lines)
        lines.append(name + b"v" * (length - len(name)))
        left -= length
    block = b"\n".join(lines)
    assert len(block) == size
    assert all(len(line) <= line_bytes for line in lines)
    return block


def attribute_lines(count: int) -> bytes:
    """`count` short attribute lines, each ended by its newline."""
    return b"".join(b"a%d=%d\n" % (number, number) for number in range(count))


# ---------------------------------------------------------------------------
# golden requests
# ---------------------------------------------------------------------------


def test_golden_files_are_complete_postfix_37_requests() -> None:
    assert set(GOLDEN) >= {"end-of-message", "data", "rcpt", "unauthenticated"}
    for name, raw in GOLDEN.items():
        assert b"\r" not in raw, name
        names = [line.split(b"=", 1)[0].decode() for line in raw[:-2].split(b"\n")]
        assert tuple(names) == POSTFIX_37_ATTRIBUTES, name
        assert len(raw) < 2048, name


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_request_fed_whole(name: str) -> None:
    parser = RequestParser()
    requests = parser.feed(GOLDEN[name])
    assert [request.attributes for request in requests] == [reference_attributes(GOLDEN[name])]
    assert list(requests[0].attributes) == list(POSTFIX_37_ATTRIBUTES)
    assert parser.pending_bytes == 0


@pytest.mark.parametrize("size", SLICE_SIZES)
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_request_fed_in_slices(name: str, size: int) -> None:
    parser = RequestParser()
    assert feed_all(GOLDEN[name], [size], parser) == [reference_attributes(GOLDEN[name])]
    assert parser.pending_bytes == 0


def test_golden_requests_fed_in_slices_of_every_size() -> None:
    for name, raw in GOLDEN.items():
        expected = [reference_attributes(raw)]
        for size in range(1, len(raw) + 2):
            assert feed_all(raw, [size]) == expected, (name, size)


def test_golden_values() -> None:
    eom = parse_request(GOLDEN["end-of-message"][:-2])
    assert eom.get("request") == "smtpd_access_policy"
    assert eom.get("protocol_state") == "END-OF-MESSAGE"
    assert eom.get("sasl_username") == "alice@example.org"
    assert eom.get("recipient_count") == "3"
    assert eom.get("recipient") == ""
    assert eom.get("ccert_subject") == ""
    assert eom.get("mail_version") == "3.7.11"
    assert eom.get("no_such_attribute") == ""
    assert eom.get("no_such_attribute", "default") == "default"

    data = parse_request(GOLDEN["data"][:-2])
    assert data.get("protocol_state") == "DATA"
    assert data.get("client_address") == "2001:db8::1:25"
    assert data.get("ccert_issuer") == "Example+20Corp+20Issuing+20CA"
    assert data.get("sasl_username") == "Bob.Smith@Example.COM"  # the parser does not change case

    rcpt = parse_request(GOLDEN["rcpt"][:-2])
    assert (rcpt.get("protocol_state"), rcpt.get("recipient_count"), rcpt.get("queue_id")) == (
        "RCPT",
        "0",
        "",
    )

    assert parse_request(GOLDEN["unauthenticated"][:-2]).get("sasl_username") == ""
    assert parse_request(GOLDEN["smtputf8"][:-2]).get("sender") == "jürgen@bücher.example"


# ---------------------------------------------------------------------------
# streams of requests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(), (1,), (5, 1, 200), (999,), (7, 3)])
def test_many_requests_on_one_stream(sizes: tuple[int, ...]) -> None:
    order = sorted(GOLDEN) * 3
    stream = b"".join(GOLDEN[name] for name in order)
    parser = RequestParser()
    assert feed_all(stream, sizes, parser) == [reference_attributes(GOLDEN[name]) for name in order]
    assert parser.pending_bytes == 0


def test_one_feed_completes_several_requests_and_keeps_the_rest() -> None:
    parser = RequestParser()
    requests = parser.feed(b"a=1\n\nb=2\nc=3\n\nd=4\ne=")
    assert [request.attributes for request in requests] == [{"a": "1"}, {"b": "2", "c": "3"}]
    assert parser.pending_bytes == len(b"d=4\ne=")
    assert parser.feed(b"5\n") == []
    assert [request.attributes for request in parser.feed(b"\n")] == [{"d": "4", "e": "5"}]
    assert parser.pending_bytes == 0


def test_half_request_stays_pending_until_completed() -> None:
    raw = GOLDEN["end-of-message"]
    parser = RequestParser()
    assert parser.pending_bytes == 0
    half = len(raw) // 2
    assert parser.feed(raw[:half]) == []
    assert parser.pending_bytes == half
    assert parser.feed(raw[half:-1]) == []  # everything but the very last newline
    assert parser.pending_bytes == len(raw) - 1
    requests = parser.feed(raw[-1:])
    assert [request.attributes for request in requests] == [reference_attributes(raw)]
    assert parser.pending_bytes == 0


def test_empty_feed_changes_nothing() -> None:
    parser = RequestParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"a=1\n") == []
    assert parser.feed(b"") == []
    assert parser.pending_bytes == 4
    assert [request.attributes for request in parser.feed(b"\n")] == [{"a": "1"}]


# ---------------------------------------------------------------------------
# what is tolerated: CRLF, 8-bit data, spaces, repeated names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 64])
def test_crlf_is_tolerated(size: int) -> None:
    expected = [reference_attributes(raw) for raw in GOLDEN.values()]
    stream = b"".join(GOLDEN.values()).replace(b"\n", b"\r\n")
    assert feed_all(stream, [size] if size else []) == expected


def test_crlf_split_between_feeds() -> None:
    parser = RequestParser()
    assert parser.feed(b"a=1\r") == []
    assert parser.feed(b"\nb=2\r\n\r") == []
    assert [request.attributes for request in parser.feed(b"\n")] == [{"a": "1", "b": "2"}]


def test_non_utf8_bytes_are_escaped() -> None:
    [request] = RequestParser().feed(b"sasl_username=caf\xe9\nsender=\xff\xfe@x\n\xc3=bad name\n\n")
    assert request.attributes == {"sasl_username": "caf\\xe9", "sender": "\\xff\\xfe@x", "\\xc3": "bad name"}
    # distinct bytes stay distinct names
    [other] = RequestParser().feed(b"sasl_username=caf\xc3\xa9\n\n")
    assert other.get("sasl_username") == "café"


def test_utf8_is_decoded() -> None:
    [request] = RequestParser().feed("sasl_username=zoë@exämple.org\n\n".encode())
    assert request.get("sasl_username") == "zoë@exämple.org"


def test_spaces_around_names_and_values_are_stripped() -> None:
    [request] = RequestParser().feed(b" sasl_username = bob \nsender=\t\nx=a b\n\n")
    assert request.attributes == {"sasl_username": "bob", "sender": "", "x": "a b"}


def test_last_of_repeated_names_wins_and_values_may_hold_equals() -> None:
    [request] = RequestParser().feed(b"a=1\na=2\nb=x=y==\nc=\n\n")
    assert request.attributes == {"a": "2", "b": "x=y==", "c": ""}


# ---------------------------------------------------------------------------
# garbage is refused with a clear error
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"garbage\n\n", "not name=value"),
        (b"a=1\nno equals sign here\n\n", "line 2 is not name=value"),
        (b"=value\n\n", "not name=value"),
        (b"a=b\0c\n\n", "NUL"),
        (b"a\0b=c\n\n", "NUL"),
        (b"\n", "empty request"),
        (b"\n\n", "empty request"),
        (b"a=1\n\n\n", "empty request"),
        (b"a=1\n\n\na=2\n\n", "empty request"),
    ],
)
def test_malformed_requests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(MalformedRequest, match=message):
        RequestParser().feed(data)
    # ...and the same when the bytes dribble in
    _, error = first_refusal(data)
    assert isinstance(error, MalformedRequest)
    assert message in str(error)


def test_empty_request_after_a_good_one_in_another_feed() -> None:
    parser = RequestParser()
    assert [request.attributes for request in parser.feed(b"a=1\n\n")] == [{"a": "1"}]
    with pytest.raises(MalformedRequest, match="empty request"):
        parser.feed(b"\n")


def test_malformed_line_is_shown_shortened_and_escaped() -> None:
    with pytest.raises(MalformedRequest) as caught:
        RequestParser().feed(b"\xff" + b"x" * 500 + b"\n\n")
    text = str(caught.value)
    assert "\\xff" in text
    assert len(text) < 150


def test_protocol_errors_are_one_family() -> None:
    for error in (LineTooLong, RequestTooLarge, TooManyAttributes, MalformedRequest):
        assert issubclass(error, ProtocolError)
        assert not issubclass(error, ValueError)  # a ProtocolError is not a bad attribute value


# ---------------------------------------------------------------------------
# limits: just under is accepted, just over is refused (completed and unfinished)
# ---------------------------------------------------------------------------


def test_limits_are_far_above_real_requests() -> None:
    longest = max(len(raw) for raw in GOLDEN.values())
    assert 4 * longest < MAX_LINE_BYTES < MAX_REQUEST_BYTES
    assert 4 * len(POSTFIX_37_ATTRIBUTES) <= MAX_ATTRIBUTES


@pytest.mark.parametrize("size", [0, 1, 7, 4096])
def test_line_of_max_length_is_accepted(size: int) -> None:
    line = b"a=" + b"x" * (MAX_LINE_BYTES - 2)
    assert len(line) == MAX_LINE_BYTES
    data = b"first=1\n" + line + b"\nlast=2\n\n"
    assert feed_all(data, [size] if size else []) == [
        {"first": "1", "a": "x" * (MAX_LINE_BYTES - 2), "last": "2"}
    ]


@pytest.mark.parametrize("prefix", [b"", b"first=1\n"])
def test_line_over_max_length_is_refused_when_completed(prefix: bytes) -> None:
    line = b"a=" + b"x" * (MAX_LINE_BYTES - 1)
    with pytest.raises(LineTooLong, match=str(MAX_LINE_BYTES)):
        RequestParser().feed(prefix + line + b"\n\n")
    # a complete line over the limit is refused at once even if the request is unfinished
    with pytest.raises(LineTooLong):
        RequestParser().feed(prefix + line + b"\nb=1")


@pytest.mark.parametrize("prefix", [b"", b"first=1\n"])
def test_line_that_never_ends_is_refused_as_soon_as_it_passes_the_limit(prefix: bytes) -> None:
    parser = RequestParser()
    parser.feed(prefix + b"a=" + b"x" * (MAX_LINE_BYTES - 2))  # exactly the limit: still fine
    assert parser.pending_bytes == len(prefix) + MAX_LINE_BYTES
    with pytest.raises(LineTooLong, match="without ending"):
        parser.feed(b"x")

    offset, error = first_refusal(prefix + b"a=" + b"x" * (2 * MAX_LINE_BYTES))
    assert isinstance(error, LineTooLong)
    assert offset == len(prefix) + MAX_LINE_BYTES  # the first byte over the limit, not later


@pytest.mark.parametrize("size", [0, 1, 3, 4096])
def test_max_attributes_is_accepted(size: int) -> None:
    data = attribute_lines(MAX_ATTRIBUTES) + b"\n"
    [attributes] = feed_all(data, [size] if size else [])
    assert len(attributes) == MAX_ATTRIBUTES
    assert attributes["a0"] == "0"
    assert attributes[f"a{MAX_ATTRIBUTES - 1}"] == str(MAX_ATTRIBUTES - 1)


def test_too_many_attributes_are_refused_when_completed() -> None:
    with pytest.raises(TooManyAttributes, match=str(MAX_ATTRIBUTES)):
        RequestParser().feed(attribute_lines(MAX_ATTRIBUTES + 1) + b"\n")
    assert parse_request(attribute_lines(MAX_ATTRIBUTES)[:-1]).attributes["a0"] == "0"
    with pytest.raises(TooManyAttributes):
        parse_request(attribute_lines(MAX_ATTRIBUTES + 1)[:-1])


def test_too_many_attributes_are_refused_while_unfinished() -> None:
    parser = RequestParser()
    assert parser.feed(attribute_lines(MAX_ATTRIBUTES)) == []  # could still end here
    with pytest.raises(TooManyAttributes):
        parser.feed(attribute_lines(MAX_ATTRIBUTES + 1)[-8:])

    endless = attribute_lines(10 * MAX_ATTRIBUTES)
    offset, error = first_refusal(endless)
    assert isinstance(error, TooManyAttributes)
    # refused within the first line too many, never before it begins
    assert len(attribute_lines(MAX_ATTRIBUTES)) <= offset < len(attribute_lines(MAX_ATTRIBUTES + 1))


@pytest.mark.parametrize("size", [0, 1, 7, 4096, MAX_REQUEST_BYTES])
def test_request_of_max_size_is_accepted(size: int) -> None:
    block = request_block(MAX_REQUEST_BYTES)
    [attributes] = feed_all(block + b"\n\n", [size] if size else [])
    assert attributes == parse_request(block).attributes
    assert sum(len(name) + 1 + len(value) for name, value in attributes.items()) + len(attributes) - 1 == (
        MAX_REQUEST_BYTES
    )


def test_request_over_max_size_is_refused_when_completed() -> None:
    with pytest.raises(RequestTooLarge, match=str(MAX_REQUEST_BYTES)):
        RequestParser().feed(request_block(MAX_REQUEST_BYTES + 1) + b"\n\n")


def test_request_that_never_ends_is_refused_as_soon_as_it_passes_the_limit() -> None:
    offset, error = first_refusal(request_block(MAX_REQUEST_BYTES + 1) + b"\nmore=1\n\n")
    assert isinstance(error, RequestTooLarge)
    assert "without ending" in str(error)
    assert offset == MAX_REQUEST_BYTES  # the first byte over the limit

    # A newline after exactly MAX_REQUEST_BYTES may be the first half of the end...
    parser = RequestParser()
    assert parser.feed(request_block(MAX_REQUEST_BYTES) + b"\n") == []
    assert parser.pending_bytes == MAX_REQUEST_BYTES + 1
    assert len(parser.feed(b"\n")) == 1
    # ...but anything else makes the request too large.
    parser = RequestParser()
    parser.feed(request_block(MAX_REQUEST_BYTES) + b"\n")
    with pytest.raises(RequestTooLarge):
        parser.feed(b"x")


# ---------------------------------------------------------------------------
# replies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("DUNNO", b"action=DUNNO\n\n"),
        ("HOLD quota exceeded", b"action=HOLD quota exceeded\n\n"),
        ("REJECT max quota exceeded", b"action=REJECT max quota exceeded\n\n"),
        ("451 4.3.5 Server configuration problem", b"action=451 4.3.5 Server configuration problem\n\n"),
        ("REJECT zu viele Empfänger", "action=REJECT zu viele Empfänger\n\n".encode()),
    ],
)
def test_format_reply(action: str, expected: bytes) -> None:
    reply = format_reply(action)
    assert reply == expected
    # it is itself a well-formed message of the protocol
    assert [request.attributes for request in RequestParser().feed(reply)] == [{"action": action}]


@pytest.mark.parametrize("action", ["DUNNO\n", "HOLD\nx=1", "REJECT\r\n", "\r", "a\n\nb"])
def test_format_reply_refuses_line_breaks(action: str) -> None:
    with pytest.raises(ValueError, match="single line"):
        format_reply(action)


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

# Small limits for the fuzzing below, so that random input reaches all of them.
SMALL_LIMITS: dict[str, Any] = {"MAX_LINE_BYTES": 12, "MAX_ATTRIBUTES": 4, "MAX_REQUEST_BYTES": 40}

# Pieces that make interesting streams far more often than uniform random bytes do.
protocol_bytes = st.lists(
    st.sampled_from(
        [b"a", b"=", b"\n", b"\r", b"\0", b"\xff", b"\xc3\xa9", b" ", b"ab=cd\n", b"\n\n", b"x" * 9]
    ),
    max_size=60,
).map(b"".join)
streams = st.one_of(st.binary(max_size=300), protocol_bytes)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=8)


def run(stream: bytes, sizes: Sequence[int]) -> tuple[list[dict[str, str]], bool, int]:
    """(requests returned, whether a ProtocolError was raised, pending bytes), checking the memory bound."""
    parser = RequestParser()
    got: list[dict[str, str]] = []
    for piece in chunks(stream, sizes):
        try:
            got += [request.attributes for request in parser.feed(piece)]
        except ProtocolError:
            return got, True, -1
        # Between feeds at most one unfinished request is held (plus the newline that
        # may start its end): never more than MAX_REQUEST_BYTES + chunk size.
        assert parser.pending_bytes <= protocol.MAX_REQUEST_BYTES + 1
    return got, False, parser.pending_bytes


@settings(max_examples=150, deadline=None)
@given(stream=streams, sizes=chunk_sizes)
def test_arbitrary_bytes_yield_requests_or_protocol_errors(stream: bytes, sizes: list[int]) -> None:
    got, _, _ = run(stream, sizes)  # any other exception fails the test
    assert all(
        isinstance(name, str) and isinstance(value, str) for request in got for name, value in request.items()
    )


@settings(max_examples=150, deadline=None)
@given(stream=streams, sizes=chunk_sizes)
def test_arbitrary_bytes_against_small_limits(stream: bytes, sizes: list[int]) -> None:
    with mock.patch.multiple(protocol, **SMALL_LIMITS):
        run(stream, sizes)


@settings(max_examples=150, deadline=None)
@given(stream=streams, sizes=chunk_sizes)
def test_chunking_never_changes_the_outcome(stream: bytes, sizes: list[int]) -> None:
    """Refused whole iff refused in pieces; if accepted, the same requests and the same leftover."""
    with mock.patch.multiple(protocol, **SMALL_LIMITS):
        whole, whole_refused, whole_pending = run(stream, [max(len(stream), 1)])
        pieces, pieces_refused, pieces_pending = run(stream, sizes)
    assert whole_refused == pieces_refused
    if not whole_refused:
        assert pieces == whole
        assert pieces_pending == whole_pending


def _stripped(text: str) -> str:
    return text.strip()


names = (
    st.text(st.characters(codec="utf-8", exclude_characters="=\n\r\0"), min_size=1, max_size=20)
    .map(_stripped)
    .filter(bool)
)
values = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\0"), max_size=40).map(_stripped)
request_lists = st.lists(st.lists(st.tuples(names, values), min_size=1, max_size=12), max_size=6)


@settings(max_examples=75, deadline=None)
@given(requests=request_lists, sizes=chunk_sizes)
def test_valid_requests_round_trip_through_any_chunking(
    requests: list[list[tuple[str, str]]], sizes: list[int]
) -> None:
    stream = b"".join(
        b"".join(f"{name}={value}\n".encode() for name, value in pairs) + b"\n" for pairs in requests
    )
    parser = RequestParser()
    assert feed_all(stream, sizes, parser) == [dict(pairs) for pairs in requests]
    assert parser.pending_bytes == 0


def test_policy_request_is_immutable() -> None:
    request = PolicyRequest({"a": "1"})
    with pytest.raises(AttributeError):
        request.attributes = {}  # type: ignore[misc]
