"""The Postfix policy delegation protocol, as bytes in and bytes out (no I/O here).

A request is ``name=value`` lines ended by an empty line; the reply is ``action=...``
and an empty line (Postfix's SMTPD_POLICY_README).  Postfix keeps the connection open
and sends the next request on it, so the parser is incremental: feed it whatever the
socket returned and it hands back every request completed so far.
"""

from __future__ import annotations

from dataclasses import dataclass

# Limits on what a client may send.  A real Postfix 3.x request has about 30 attributes
# and is well under 2 KiB; the largest single values (ccert_subject, sender) stay far
# below these.  Anything bigger is not Postfix, so it is refused rather than buffered.
MAX_LINE_BYTES = 16 * 1024
MAX_ATTRIBUTES = 128
MAX_REQUEST_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The client broke the protocol; the connection cannot be trusted any more."""


class LineTooLong(ProtocolError):
    pass


class RequestTooLarge(ProtocolError):
    pass


class TooManyAttributes(ProtocolError):
    pass


class MalformedRequest(ProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One request: the attributes exactly as Postfix sent them (last one wins)."""

    attributes: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.attributes.get(name, default)


def parse_request(block: bytes) -> PolicyRequest:
    """Parse one request's lines (without the final empty line)."""
    # Postfix passes 8-bit data through (SMTPUTF8 senders, odd SASL names).  Non-UTF-8
    # bytes become \xNN escapes: printable, storable in any database, and distinct.  The
    # block is decoded in one go: "\n" and "=" are ASCII, never inside a multi-byte
    # character, so this is the same as decoding each name and value apart.
    if (
        len(block) <= MAX_LINE_BYTES
        and block.isascii()
        and len(block.translate(None, _NUL_OR_SPACE)) == len(block)
    ):
        # The common case, a request from Postfix: nothing str.strip() would remove, so
        # one pass in C (a line without "=" splits into one part, which dict() refuses).
        lines = block.decode("ascii").split("\n")
        if len(lines) <= MAX_ATTRIBUTES:
            try:
                attributes = dict([line.split("=", 1) for line in lines])
            except ValueError:
                pass
            else:
                if "" not in attributes:
                    return PolicyRequest(attributes)
    # Spaces to strip (people typing requests by hand), non-ASCII text, or a mistake to
    # point at: line by line.
    return _parse_checking_each_line(block)


# A NUL, or what str.strip() removes in ASCII text ("\n" ends lines): bytes.translate
# deletes them in one pass, several times quicker than a regular expression's search.
_NUL_OR_SPACE = b"\0 \t\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _parse_checking_each_line(block: bytes) -> PolicyRequest:
    """The same, line by line, saying which line is wrong (and what a name of spaces is)."""
    lines = block.split(b"\n")
    if len(lines) > MAX_ATTRIBUTES:
        raise TooManyAttributes(f"request has {len(lines)} attributes, the limit is {MAX_ATTRIBUTES}")
    attributes: dict[str, str] = {}
    for number, raw_line in enumerate(lines, start=1):
        if len(raw_line) > MAX_LINE_BYTES:
            raise LineTooLong(f"line {number} is {len(raw_line)} bytes, the limit is {MAX_LINE_BYTES}")
        name, separator, value = raw_line.partition(b"=")
        if not separator or not name:
            shown = raw_line[:60].decode("utf-8", "backslashreplace")
            raise MalformedRequest(f"line {number} is not name=value: {shown!r}")
        if b"\0" in raw_line:
            raise MalformedRequest(f"line {number} contains a NUL byte")
        attributes[name.decode("utf-8", "backslashreplace").strip()] = value.decode(
            "utf-8", "backslashreplace"
        ).strip()
    return PolicyRequest(attributes)


class RequestParser:
    """Incremental parser: ``feed()`` bytes, get back the requests they completed.

    Work per call is proportional to the bytes fed, not to the bytes buffered, so a
    client dribbling one byte at a time costs nothing quadratic.  Limits are enforced
    on the unfinished request too: a client that never ends a line or a request is
    refused as soon as it passes a limit, not buffered.
    """

    __slots__ = ("_buffer", "_line_start", "_newlines")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_start = 0  # where the unfinished last line of _buffer starts
        self._newlines = 0  # newlines in _buffer (it never holds a complete request)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished request held so far (0 between requests)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[PolicyRequest]:
        if b"\r" in data:
            data = data.replace(b"\r", b"")  # tolerate CRLF from people testing by hand
        if (
            not self._buffer
            and len(data) > 2
            and data.find(b"\n\n") == len(data) - 2
            and len(data) - 2 <= MAX_REQUEST_BYTES
            and data[:1] != b"\n"
        ):
            # What Postfix does: exactly one whole request per read, nothing before it.
            return [parse_request(data[:-2])]
        buffer = self._buffer
        scan_from = max(len(buffer) - 1, 0)  # the old buffer holds no "\n\n"
        buffer += data
        requests: list[PolicyRequest] = []
        while buffer:
            if buffer[0] == 0x0A:
                raise MalformedRequest("empty request (a blank line with no attributes before it)")
            end = buffer.find(b"\n\n", scan_from)
            if end < 0:
                break
            if end > MAX_REQUEST_BYTES:
                raise RequestTooLarge(f"request is {end} bytes, the limit is {MAX_REQUEST_BYTES}")
            requests.append(parse_request(bytes(buffer[:end])))
            del buffer[: end + 2]
            scan_from = 0
            self._line_start = self._newlines = 0
        # Account for the lines that arrived; after a completed request what is left is a
        # suffix of `data`, so either way this scans at most the bytes just fed.
        position = self._line_start if not requests else 0
        position = max(position, len(buffer) - len(data))
        while True:
            newline = buffer.find(b"\n", position)
            if newline < 0:
                break
            self._end_line(newline)
            position = newline + 1
        self._check_unfinished()
        return requests

    def _end_line(self, newline: int) -> None:
        if newline - self._line_start > MAX_LINE_BYTES:
            raise LineTooLong(f"a line is {newline - self._line_start} bytes, the limit is {MAX_LINE_BYTES}")
        self._line_start = newline + 1
        self._newlines += 1
        if self._newlines > MAX_ATTRIBUTES:
            raise TooManyAttributes(f"request exceeds {MAX_ATTRIBUTES} attributes")

    def _check_unfinished(self) -> None:
        unfinished_line = len(self._buffer) - self._line_start
        if unfinished_line > MAX_LINE_BYTES:
            raise LineTooLong(f"a line exceeds {MAX_LINE_BYTES} bytes without ending")
        # A trailing newline may be the first half of the empty line that ends the request,
        # so it is not part of the request yet: a request of exactly MAX_REQUEST_BYTES is
        # accepted however it is split, as it is when it arrives whole.
        if len(self._buffer) - self._buffer.endswith(b"\n") > MAX_REQUEST_BYTES:
            raise RequestTooLarge(f"request exceeds {MAX_REQUEST_BYTES} bytes without ending")


def format_reply(action: str) -> bytes:
    """The reply Postfix expects: one action attribute and the empty line."""
    if "\n" in action or "\r" in action:
        raise ValueError("an action must be a single line")
    return b"action=" + action.encode("utf-8") + b"\n\n"
