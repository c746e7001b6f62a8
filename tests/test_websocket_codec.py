"""RFC 6455 without I/O: handshakes and frames, byte by byte."""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable

import httptools
import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from presence.websocket import frames as ws

pytestmark = pytest.mark.unit

KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(target: str = "/rooms/doc", **headers: str) -> bytes:
    fields = {
        "Host": "example.org",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """A frame as a client sends it (masked); invalid ones too, which libraries refuse."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_handshake_accepts_with_the_rfc_example_key() -> None:
    # The example of RFC 6455, section 1.3.
    req = ws.parse_request(request(Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ=="))
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in ws.accept(req)


def test_handshake_decodes_path_and_query() -> None:
    req = ws.parse_request(request("/rooms/a%20b?token=x.y&z=1"))
    assert req.path == "/rooms/a b"
    assert req.query == {"token": "x.y", "z": "1"}
    assert req.headers["upgrade"] == "websocket"


@pytest.mark.parametrize(
    "raw,status",
    [
        (request(Upgrade=""), 426),
        (request(Connection="keep-alive"), 400),
        (request(Sec_WebSocket_Version="8"), 426),
        (request(Sec_WebSocket_Key="short"), 400),
        (request(Sec_WebSocket_Key="!!!not base64!!!"), 400),
        (b"POST /rooms/doc HTTP/1.1\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (request(X_Padding="x" * 20000), 431),
        (request().replace(b"HTTP/1.1", b"HTTP/1.0"), 400),  # RFC 6455 4.1: at least 1.1
        (request(Host=""), 400),
    ],
)
def test_bad_handshakes_get_an_http_error(raw: bytes, status: int) -> None:
    with pytest.raises(ws.HandshakeError) as info:
        ws.accept(ws.parse_request(raw))
    assert info.value.status == status
    response = ws.reject(info.value.status, str(info.value))
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    assert (b"Sec-WebSocket-Version: 13" in response) == (status == 426)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_server_frames_parse_as_rfc_frames(size: int) -> None:
    payload = os.urandom(size)
    reader = StreamReader()
    reader.feed_data(ws.frame(ws.BINARY, payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    assert parsed.opcode == Opcode.BINARY and parsed.data == payload and parsed.fin


def test_close_frame_reason_is_cut_on_a_character_boundary() -> None:
    data = ws.close_frame(1008, "é" * 100)
    assert len(data) <= 2 + 125  # header + the most a control frame carries
    assert Close.parse(data[2:]).code == 1008
    assert ws.parse_close(data[2:]) == (1008, "é" * 61)


def messages(reader: ws.FrameReader, data: bytes) -> list[tuple[int, str | bytes]]:
    reader.feed(data)
    return list(reader.messages(10**9))


def test_reader_unmasks_and_decodes_text() -> None:
    reader = ws.FrameReader(1000)
    data = client_frame(ws.TEXT, "héllo".encode()) + client_frame(ws.BINARY, b"\x00\x01")
    assert messages(reader, data) == [(ws.TEXT, "héllo"), (ws.BINARY, b"\x00\x01")]


def test_reader_waits_for_whole_frames_fed_byte_by_byte() -> None:
    reader = ws.FrameReader(100000)
    payload = os.urandom(70000)
    data = client_frame(ws.BINARY, payload) + client_frame(ws.PING, b"p")
    got = []
    for i in range(0, len(data), 997):
        got += messages(reader, data[i : i + 997])
    assert got == [(ws.BINARY, payload), (ws.PING, b"p")]


def test_reader_reassembles_fragments_around_control_frames() -> None:
    reader = ws.FrameReader(1000)
    data = (
        client_frame(ws.TEXT, b"hel", fin=False)
        + client_frame(ws.PING, b"!")
        + client_frame(ws.CONTINUATION, b"l", fin=False)
        + client_frame(ws.CONTINUATION, b"o")
    )
    assert messages(reader, data) == [(ws.PING, b"!"), (ws.TEXT, "hello")]


@pytest.mark.parametrize(
    "data,code",
    [
        (client_frame(ws.TEXT, b"x", mask=False), 1002),
        (client_frame(ws.TEXT, b"\xff\xfe"), 1007),
        (client_frame(ws.BINARY, b"x" * 101), 1009),
        (
            client_frame(ws.TEXT, b"x" * 60, fin=False) + client_frame(ws.CONTINUATION, b"x" * 60),
            1009,
        ),
        (client_frame(ws.CONTINUATION, b"x"), 1002),
        (client_frame(ws.TEXT, b"a", fin=False) + client_frame(ws.TEXT, b"b"), 1002),
        (client_frame(ws.PING, b"x" * 126), 1002),
        (client_frame(ws.PING, b"x", fin=False), 1002),
        (bytes([0x83, 0x80]) + b"mask", 1002),  # opcode 3 is reserved
        (bytes([0xC1, 0x80]) + b"mask", 1002),  # RSV1 without an extension
        # A length far beyond the limit is refused before anything is buffered.
        (bytes([0x82, 0xFF]) + struct.pack("!Q", 2**62) + b"mask", 1009),
    ],
)
def test_reader_refuses_protocol_violations(data: bytes, code: int) -> None:
    reader = ws.FrameReader(100)
    with pytest.raises(ws.ProtocolError) as info:
        messages(reader, data)
    assert info.value.code == code


def fragmented(frames: int) -> bytes:
    """A text message in ``frames`` frames, all but the first empty."""
    middle = client_frame(ws.CONTINUATION, b"", fin=False) * (frames - 2)
    return client_frame(ws.TEXT, b"x", fin=False) + middle + client_frame(ws.CONTINUATION, b"")


def test_reader_takes_a_message_of_max_fragments() -> None:
    reader = ws.FrameReader(100)
    assert messages(reader, fragmented(ws.MAX_FRAGMENTS)) == [(ws.TEXT, "x")]


def test_reader_refuses_endless_empty_continuation_frames() -> None:
    # Each frame is within the size limit; their number is not.
    reader = ws.FrameReader(100)
    with pytest.raises(ws.ProtocolError) as info:
        messages(reader, fragmented(ws.MAX_FRAGMENTS + 1))
    assert (info.value.code, info.value.reason) == (1009, "too many fragments")


def test_reader_reads_at_most_limit_frames_a_call() -> None:
    reader = ws.FrameReader(100)
    pings = [client_frame(ws.PING, bytes([i])) for i in range(5)]
    reader.feed(fragmented(3) + b"".join(pings))
    got = list(reader.messages(4))  # three frames of the message, one ping
    assert got == [(ws.TEXT, "x"), (ws.PING, b"\x00")] and reader.more
    assert list(reader.messages(4)) == [(ws.PING, bytes([i])) for i in range(1, 5)]
    assert not reader.more


@pytest.mark.parametrize(
    "payload,expected",
    [
        (b"", (1005, "")),
        (struct.pack("!H", 1000) + b"bye", (1000, "bye")),
        (struct.pack("!H", 4001), (4001, "")),
        # Service Restart, Try Again Later, Bad Gateway: a proxy in front of a client
        # may send them as well as a server.
        (struct.pack("!H", 1012), (1012, "")),
        (struct.pack("!H", 1013) + b"later", (1013, "later")),
        (struct.pack("!H", 1014), (1014, "")),
    ],
)
def test_close_payloads(payload: bytes, expected: tuple[int, str]) -> None:
    assert ws.parse_close(payload) == expected


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\x03", 1002),
        (struct.pack("!H", 1004), 1002),
        (struct.pack("!H", 1005), 1002),
        (struct.pack("!H", 1006), 1002),
        (struct.pack("!H", 1015), 1002),  # TLS handshake failure: never in a frame
        (struct.pack("!H", 1016), 1002),
        (struct.pack("!H", 2999), 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 5000), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),
    ],
)
def test_invalid_close_payloads(payload: bytes, code: int) -> None:
    with pytest.raises(ws.ProtocolError) as info:
        ws.parse_close(payload)
    assert info.value.code == code


class Parsed:
    """What uvicorn's httptools protocol keeps of a request: the raw target, the headers
    with lower-case names, in order."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))


def as_uvicorn_read_it(raw: bytes) -> tuple[str, bytes, str, list[tuple[bytes, bytes]]]:
    parsed = Parsed()
    parser = httptools.HttpRequestParser(parsed)
    with pytest.raises(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    method = parser.get_method().decode("ascii")
    return method, parsed.url, parser.get_http_version(), parsed.headers


def written_out(method: str, url: bytes, version: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request as HttpProtocol wrote it out for parse_request() before."""
    lines = [method.encode() + b" " + url + f" HTTP/{version}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines)


def outcome(parse: Callable[[], ws.Request]) -> ws.Request | tuple[int, str]:
    try:
        return parse()
    except ws.HandshakeError as exc:
        return exc.status, str(exc)


def padded_to(size: int) -> bytes:
    """An upgrade request whose head, written out, is ``size`` bytes; as sent, with no
    space after its headers' colons, it is smaller."""
    raw = request("/rooms/doc?a=1", X_Padding="")
    short = raw.replace(b": ", b":")
    fill = size - len(written_out(*as_uvicorn_read_it(short))) - len(b"\r\nx-padding: ")
    return short[:-2] + b"X-Padding:" + b"p" * fill + b"\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        request(),
        request("/rooms/a%20b%2Fc?token=x.y&z=1&z=2&e=%C3%A9"),
        request("/rooms/doc", Origin="http://a", X_Forwarded_For="1.2.3.4").replace(
            b"Origin: http://a\r\n", b"Origin: http://a\r\nX-Forwarded-For: 5.6.7.8\r\n"
        ),
        request(X_Trailing="a  \t ", X_Latin="\xa0caf\xe9\x85").replace(b"\xc2", b""),
        request(X_Empty="x").replace(b"X-Empty: x", b"X-Empty:"),
        request().replace(b": ", b":"),
        request().replace(b"HTTP/1.1", b"HTTP/1.0"),
        request().replace(b"HTTP/1.1", b"HTTP/2.0"),
        request().replace(b"GET ", b"POST "),
        request().replace(b"GET /rooms/doc", b"GET http://example.org/rooms/doc"),
        padded_to(ws.MAX_REQUEST_BYTES),
        padded_to(ws.MAX_REQUEST_BYTES + 1),
    ],
    ids=[
        "plain",
        "quoted",
        "repeated",
        "whitespace",
        "empty-value",
        "no-space",
        "http-1.0",
        "http-2.0",
        "post",
        "absolute-form",
        "largest",
        "too-large",
    ],
)
def test_a_request_as_uvicorn_read_it_is_what_parse_request_made_of_it_written_out(
    raw: bytes,
) -> None:
    read = as_uvicorn_read_it(raw)
    assert outcome(lambda: ws.request_from(*read)) == outcome(
        lambda: ws.parse_request(written_out(*read))
    )


def test_request_from_checks_size_method_and_version() -> None:
    assert outcome(lambda: ws.request_from(*as_uvicorn_read_it(padded_to(16385)))) == (
        431,
        "request headers too large",
    )
    assert isinstance(ws.request_from(*as_uvicorn_read_it(padded_to(16384))), ws.Request)
    for raw in (request().replace(b"HTTP/1.1", b"HTTP/1.0"), request().replace(b"GET", b"PUT")):
        assert outcome(lambda raw=raw: ws.request_from(*as_uvicorn_read_it(raw))) == (
            400,
            "a WebSocket handshake is an HTTP/1.1 GET",
        )
