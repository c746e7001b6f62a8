"""The connection class in process: a fake transport records what is written and whether
the socket is read; a fake endpoint records what it is told."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from presence.codecs import websocket as ws
from presence.server.connection import FRAMES_PER_TURN, Connection
from presence.server.metrics import Metrics
from tests.test_websocket_codec import client_frame, fragmented, request

pytestmark = pytest.mark.unit


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = not self.closing

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing, self.reading = True, False

    def abort(self) -> None:
        self.close()
        self.written.clear()  # what was not sent yet is lost
        self.aborted = True

    def frames(self) -> list[tuple[int, bytes]]:
        """The frames written after the 101 response (short ones only)."""
        data = bytes(self.written).partition(b"\r\n\r\n")[2]
        frames = []
        while data:
            opcode, length = data[0] & 0x0F, data[1]
            assert length < 126
            frames.append((opcode, data[2 : 2 + length]))
            data = data[2 + length :]
        return frames


class Endpoint:
    text: ClassVar[bool | None] = True
    gate: ClassVar[asyncio.Event]  # open() returns once it is set: the member has joined

    def __init__(self, connection: Connection, hub: Any, room: str) -> None:
        self.received: list[Any] = []
        self.closed_calls = 0

    async def open(self) -> None:
        await self.gate.wait()

    def receive(self, message: Any) -> None:
        self.received.append(message)

    def closed(self) -> None:
        self.closed_calls += 1


class FakeConnection(Connection):
    routes: ClassVar[dict[str, Any]] = {"rooms": Endpoint}


async def connect(
    data: bytes = b"", *, joined: bool = True, ping_interval: float = 60
) -> tuple[Connection, Endpoint, Transport]:
    """A connection whose handshake (with ``data`` in the same read) was received."""
    settings = SimpleNamespace(max_message_bytes=1000, ping_interval=ping_interval)
    hub = SimpleNamespace(settings=settings, metrics=Metrics())
    Endpoint.gate = asyncio.Event()
    connection = FakeConnection(None, SimpleNamespace(connections=set()), {"hub": hub})
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(request() + data)
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    endpoint = connection.endpoint
    assert isinstance(endpoint, Endpoint)
    if joined:
        Endpoint.gate.set()
        await until(lambda: connection.state == "open")
    return connection, endpoint, transport


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_frames_sent_with_the_request_are_handled_once_joined() -> None:
    # uvicorn passes on what followed the request in the same read (HttpProtocol).
    data = client_frame(ws.TEXT, b"hello") + client_frame(ws.PING, b"p")
    connection, endpoint, transport = await connect(data, joined=False)
    assert not transport.reading and endpoint.received == []
    Endpoint.gate.set()
    await until(lambda: connection.state == "open")
    assert endpoint.received == ["hello"]
    assert transport.frames() == [(ws.PONG, b"p")] and transport.reading


async def test_a_connection_lost_while_joining_tells_its_endpoint_once() -> None:
    connection, endpoint, _ = await connect(joined=False)
    connection.connection_lost(None)
    assert endpoint.closed_calls == 0  # not yet: the join may still add its member
    Endpoint.gate.set()
    await until(lambda: endpoint.closed_calls > 0)
    await asyncio.sleep(0.01)
    assert endpoint.closed_calls == 1 and connection.state == "closed"


async def test_keepalive_timeout_sends_its_close_frame_then_closes() -> None:
    connection, endpoint, transport = await connect(ping_interval=0.01)
    await until(lambda: transport.closing)  # no pong came
    ping, (opcode, payload) = transport.frames()
    assert ping == (ws.PING, b"") and opcode == ws.CLOSE
    assert ws.parse_close(payload) == (1011, "keepalive ping timeout")
    assert not transport.aborted  # close() sends what was written, abort() would not
    assert endpoint.closed_calls == 1  # its members leave now, not after the close timeout
    connection.connection_lost(None)
    assert endpoint.closed_calls == 1


async def test_pings_are_answered_while_the_client_reads() -> None:
    pings = b"".join(client_frame(ws.PING, bytes([i])) for i in range(3))
    connection, _, transport = await connect()
    connection.data_received(pings)
    assert transport.frames() == [(ws.PONG, bytes([i])) for i in range(3)]


async def test_a_client_that_does_not_read_is_not_read_and_its_last_ping_is_answered() -> None:
    connection, endpoint, transport = await connect()
    connection.pause_writing()  # the socket's buffer is full: the client does not read
    assert not transport.reading
    # What was read already is handled; of its pings only the last gets an answer, later.
    connection.data_received(b"".join(client_frame(ws.PING, bytes([i])) for i in range(5)))
    connection.data_received(client_frame(ws.TEXT, b"still heard"))
    assert transport.frames() == [] and endpoint.received == ["still heard"]
    connection.resume_writing()
    assert transport.frames() == [(ws.PONG, b"\x04")] and transport.reading


async def test_a_turn_handles_at_most_frames_per_turn_frames() -> None:
    connection, endpoint, transport = await connect()
    n = 3 * FRAMES_PER_TURN + 1
    connection.data_received(b"".join(client_frame(ws.TEXT, b"%d" % i) for i in range(n)))
    # One turn's worth now, the socket unread until the rest has had its turns.
    assert len(endpoint.received) == FRAMES_PER_TURN and not transport.reading
    await until(lambda: len(endpoint.received) == n)
    assert endpoint.received == [str(i) for i in range(n)] and transport.reading


@pytest.mark.parametrize("code", [1012, 1013, 1014])
async def test_a_client_may_close_with_restart_try_again_and_bad_gateway(code: int) -> None:
    connection, endpoint, transport = await connect()
    connection.data_received(client_frame(ws.CLOSE, struct.pack("!H", code)))
    assert transport.frames() == [(ws.CLOSE, struct.pack("!H", code))]  # echoed, not 1002
    connection.connection_lost(None)
    assert endpoint.closed_calls == 1


async def test_endless_fragments_are_closed_with_1009() -> None:
    connection, endpoint, transport = await connect()
    connection.data_received(fragmented(ws.MAX_FRAGMENTS + 1))
    await until(lambda: transport.closing)
    (opcode, payload), *_ = transport.frames()
    assert opcode == ws.CLOSE and ws.parse_close(payload) == (1009, "too many fragments")
    assert endpoint.received == []
