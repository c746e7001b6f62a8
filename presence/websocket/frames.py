"""RFC 6455, server side, without I/O: the opening handshake, frames in, frames out.

Frames a server sends are not masked, so a frame's bytes are the same for every
receiver: a room's frames are built once per tick and written to each socket as they
are. No extension is negotiated (permessage-deflate costs more than it saves on frames
of a few hundred bytes, and keeps a compressor per socket).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension is missing on some platforms
    from websockets.utils import apply_mask

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_BYTES = 16384
# Fragments of one message: without a cap, empty continuation frames pile up for ever
# (the size limit never sees them). python-websockets allows 4096.
MAX_FRAGMENTS = 1024
# Close codes a peer may send (RFC 6455 7.4 and the IANA registry): 1004-1006 and 1015
# are never sent, 1016-2999 are unassigned.
_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))


class HandshakeError(Exception):
    """The request is not a WebSocket opening handshake this server accepts."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ProtocolError(Exception):
    """The peer broke the protocol: the connection must be closed with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    path: str  # percent-decoded
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "


def parse_request(data: bytes) -> Request:
    """The request line and headers of an opening handshake (``data`` up to the empty
    line that ends them); raises :class:`HandshakeError` if it is not one."""
    if len(data) > MAX_REQUEST_BYTES:
        raise HandshakeError(431, "request headers too large")
    try:
        head = data.decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise HandshakeError(400, "malformed request line") from None
    return _request(method, target, version, _header_lines(lines))


def request_from(
    method: str, target: bytes, version: str, headers: Sequence[tuple[bytes, bytes]]
) -> Request:
    """The request of an opening handshake as an HTTP parser read it (uvicorn's
    httptools protocol: the method, the raw request target, the version as "1.1",
    the headers in order) with the checks of :func:`parse_request`, whose others the
    parser made: the same :class:`Request`, or the same :class:`HandshakeError`, as
    :func:`parse_request` of the request written out with "name: value" lines."""
    # The size parse_request() measures of that: request line, CRLF and header lines.
    size = len(method) + len(target) + len(version) + 7
    for name, value in headers:
        size += len(name) + len(value) + 4
    if size > MAX_REQUEST_BYTES:
        raise HandshakeError(431, "request headers too large")
    return _request(
        method,
        target.decode("latin-1"),
        f"HTTP/{version}",
        ((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers),
    )


def _header_lines(lines: list[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeError(400, "malformed header line")
        yield name, value


def _request(method: str, target: str, version: str, fields: Iterable[tuple[str, str]]) -> Request:
    if method != "GET" or version != "HTTP/1.1":
        raise HandshakeError(400, "a WebSocket handshake is an HTTP/1.1 GET")
    headers: dict[str, str] = {}
    for name, value in fields:
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = target.partition("?")
    return Request(unquote(path), dict(parse_qsl(query)), headers)


def accept(request: Request) -> bytes:
    """The 101 response that completes the handshake; raises :class:`HandshakeError`."""
    headers = request.headers
    if not headers.get("host"):
        raise HandshakeError(400, "missing Host header")
    if "websocket" not in headers.get("upgrade", "").lower():
        raise HandshakeError(426, "expected 'Upgrade: websocket'")
    if "upgrade" not in [t.strip() for t in headers.get("connection", "").lower().split(",")]:
        raise HandshakeError(400, "expected 'Connection: Upgrade'")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "unsupported WebSocket version: this server speaks 13")
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "invalid Sec-WebSocket-Key")
    digest = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + digest + b"\r\n\r\n"
    )


def reject(status: int, message: str) -> bytes:
    """An HTTP error response that ends the connection."""
    body = (message + "\n").encode()
    extra = b"Sec-WebSocket-Version: 13\r\n" if status == 426 else b""
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        + extra
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}


def frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def close_frame(code: int, reason: str) -> bytes:
    # A control frame carries at most 125 bytes: cut the reason on a character boundary.
    data = reason.encode()[:123].decode(errors="ignore").encode()
    return frame(CLOSE, struct.pack("!H", code) + data)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame (1005: it had no code)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame with a 1-byte payload")
    (code,) = struct.unpack("!H", payload[:2])
    if not (code in _CLOSE_CODES or 3000 <= code < 5000):
        raise ProtocolError(1002, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not UTF-8") from None


class FrameReader:
    """Client frames in, messages out: unmasks, reassembles fragments, checks sizes and
    UTF-8. Yields ``(opcode, payload)``; a text payload is a ``str``."""

    __slots__ = ("_buffer", "_fragments", "_fragments_size", "_opcode", "max_size", "more")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.more = False  # the last call stopped at its limit: frames may be left
        self._buffer = bytearray()
        self._opcode: int | None = None  # of the fragmented message in progress
        self._fragments: list[bytes] = []
        self._fragments_size = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def messages(self, limit: int) -> Iterator[tuple[int, str | bytes]]:
        """The complete messages and control frames received so far, in order, reading at
        most ``limit`` frames (then :attr:`more` is set); raises :class:`ProtocolError`
        at the first violation."""
        buf = self._buffer
        self.more = False
        while len(buf) >= 2:
            if limit <= 0:
                self.more = True
                return
            limit -= 1
            b0, b1 = buf[0], buf[1]
            fin, opcode, length = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits set: no extension was negotiated")
            if not b1 & 0x80:
                raise ProtocolError(1002, "client frames must be masked")
            start = 2
            if length == 126:
                start = 4
                if len(buf) < start:
                    return
                (length,) = struct.unpack_from("!H", buf, 2)
            elif length == 127:
                start = 10
                if len(buf) < start:
                    return
                (length,) = struct.unpack_from("!Q", buf, 2)
            if opcode in _CONTROL:
                if length > 125 or not fin:
                    raise ProtocolError(1002, "invalid control frame")
            elif opcode in _DATA:
                if self._opcode is not None:
                    raise ProtocolError(1002, "a new message started inside a fragmented one")
            elif opcode == CONTINUATION:
                if self._opcode is None:
                    raise ProtocolError(1002, "continuation frame without a message")
                if len(self._fragments) >= MAX_FRAGMENTS:
                    raise ProtocolError(1009, "too many fragments")
            else:
                raise ProtocolError(1002, f"unknown opcode {opcode}")
            if length + self._fragments_size > self.max_size:
                raise ProtocolError(1009, f"message over {self.max_size} bytes")
            end = start + 4 + length
            if len(buf) < end:
                return
            payload = apply_mask(bytes(buf[start + 4 : end]), bytes(buf[start : start + 4]))
            del buf[:end]
            if opcode in _CONTROL:
                yield opcode, payload
                continue
            if opcode != CONTINUATION:
                self._opcode = opcode
            if not fin:
                self._fragments.append(payload)
                self._fragments_size += length
                continue
            if self._fragments:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                self._fragments.clear()
                self._fragments_size = 0
            message_opcode, self._opcode = self._opcode, None
            if message_opcode == TEXT:
                try:
                    yield TEXT, payload.decode()
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "text message is not valid UTF-8") from None
            else:
                yield BINARY, payload
