"""The connection class in process: a fake transport records what is written and whether
the socket is read; a fake endpoint records what it is told."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from presence.metrics import Metrics
from presence.websocket import connection as connection_module
from presence.websocket import frames as ws
from presence.websocket.connection import FRAMES_PER_TURN, Connection
from tests.test_websocket_codec import client_frame, fragmented, request

pytestmark = pytest.mark.unit


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closing = False  # close() never finishes: no connection_lost follows
        self.aborted = False
        self.told = 0  # calls of pause_reading and resume_reading

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False
        self.told += 1

    def resume_reading(self) -> None:
        self.reading = not self.closing
        self.told += 1

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
        self.connection = connection
        self.received: list[Any] = []
        self.closed_calls = 0

    async def open(self) -> None:
        await self.gate.wait()

    def receive(self, message: Any) -> None:
        self.received.append(message)
        if message == "bad":  # like a JSON endpoint after too many invalid messages
            self.connection.close(1008, "too many invalid messages")
        elif message == "big":  # its reply fills the socket's buffer
            self.connection.pause_writing()

    def closed(self) -> None:
        self.closed_calls += 1


ROUTES: dict[str, Any] = {"rooms": Endpoint}


class FakeConnection(Connection):
    """A connection of an app with one route, to the endpoint above."""


async def connect(
    data: bytes = b"", *, joined: bool = True, ping_interval: float = 60
) -> tuple[Connection, Endpoint, Transport]:
    """A connection whose handshake (with ``data`` in the same read) was received."""
    settings = SimpleNamespace(max_message_bytes=1000, ping_interval=ping_interval)
    hub = SimpleNamespace(settings=settings, metrics=Metrics())
    Endpoint.gate = asyncio.Event()
    app_state = {"hub": hub, "websocket_routes": ROUTES}
    connection = FakeConnection(None, SimpleNamespace(connections=set()), app_state)
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


async def test_a_client_that_does_not_read_is_not_read_nor_are_its_frames_handled() -> None:
    connection, endpoint, transport = await connect()
    connection.pause_writing()  # the socket's buffer is full: the client does not read
    assert not transport.reading
    # What was read already waits too: every reply would go into our memory.
    connection.data_received(b"".join(client_frame(ws.PING, bytes([i])) for i in range(5)))
    connection.data_received(client_frame(ws.TEXT, b"heard later"))
    assert transport.frames() == [] and endpoint.received == []
    connection.resume_writing()  # it reads again: all of it is handled, in a turn
    await until(lambda: endpoint.received == ["heard later"])
    assert transport.frames() == [(ws.PONG, bytes([i])) for i in range(5)]
    assert transport.reading


async def test_a_reply_that_fills_the_buffer_stops_the_turn() -> None:
    connection, endpoint, transport = await connect()
    data = b"".join(client_frame(ws.TEXT, m) for m in (b"a", b"big", b"c", b"d"))
    connection.data_received(data + client_frame(ws.PING, b"p"))
    assert endpoint.received == ["a", "big"] and not transport.reading
    await asyncio.sleep(0.01)
    assert endpoint.received == ["a", "big"] and transport.frames() == []
    connection.resume_writing()
    await until(lambda: transport.frames() == [(ws.PONG, b"p")])
    assert endpoint.received == ["a", "big", "c", "d"] and transport.reading


async def test_a_client_that_does_not_read_is_dropped_by_the_keepalive() -> None:
    connection, endpoint, transport = await connect(ping_interval=0.02)
    connection.pause_writing()
    connection.data_received(client_frame(ws.TEXT, b"waits"))
    await until(lambda: transport.closing)
    assert ws.parse_close(transport.frames()[-1][1]) == (1011, "keepalive ping timeout")
    assert endpoint.closed_calls == 1 and endpoint.received == []


async def test_pongs_keep_a_client_that_reads_even_across_a_full_buffer() -> None:
    connection, endpoint, transport = await connect()  # its timer is not due in the test
    connection._timeout()  # a ping interval passed
    connection.data_received(client_frame(ws.PONG, b""))
    connection._timeout()
    connection.pause_writing()  # for a moment: the pong waits behind the full buffer
    connection.data_received(client_frame(ws.PONG, b""))
    connection.resume_writing()
    await asyncio.sleep(0)  # the turn that handles it
    connection._timeout()
    assert transport.frames() == [(ws.PING, b"")] * 3
    assert not transport.closing and endpoint.closed_calls == 0
    connection._timeout()  # no pong to the third ping
    assert transport.closing and endpoint.closed_calls == 1


async def test_the_transport_is_told_to_read_or_not_only_when_that_changes() -> None:
    connection, endpoint, transport = await connect()
    told = transport.told
    for i in range(100):
        connection.data_received(client_frame(ws.TEXT, b"%d" % i))
    assert len(endpoint.received) == 100 and transport.told == told and transport.reading


async def test_the_close_timeout_aborts_a_close_that_does_not_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.05)
    connection, endpoint, transport = await connect(ping_interval=0.01)
    await until(lambda: transport.closing)  # the keepalive timed out: close() was called
    assert not transport.aborted  # the close frame may still go out
    await until(lambda: transport.aborted)  # it did not in CLOSE_TIMEOUT: dropped
    connection.connection_lost(None)
    assert endpoint.closed_calls == 1


async def test_frames_after_one_the_endpoint_closed_on_are_still_read() -> None:
    # The client's close frame came in the same read: the closing handshake completes at
    # once, the TCP connection is not left to the close timeout (and a reset).
    connection, endpoint, transport = await connect()
    connection.data_received(
        client_frame(ws.TEXT, b"bad")
        + client_frame(ws.TEXT, b"skipped")
        + client_frame(ws.CLOSE, b"")
    )
    assert transport.closing and not transport.aborted
    assert ws.parse_close(transport.frames()[0][1]) == (1008, "too many invalid messages")
    assert len(transport.frames()) == 1 and endpoint.received == ["bad"]


async def test_a_close_frame_that_waited_for_writes_is_heard_once_we_close() -> None:
    connection, endpoint, transport = await connect()
    connection.pause_writing()
    connection.data_received(client_frame(ws.TEXT, b"skipped") + client_frame(ws.CLOSE, b""))
    connection.close(1013, "slow client")  # what the hub's sweep does
    await until(lambda: transport.closing)
    assert not transport.aborted and endpoint.received == []


@pytest.mark.parametrize("started", [False, True], ids=["before-open", "in-open"])
async def test_a_cancelled_join_tells_its_endpoint_once(started: bool) -> None:
    connection, endpoint, transport = await connect(joined=False)
    task = connection._opening
    assert task is not None
    if started:
        await asyncio.sleep(0)  # it waits in open()
    task.cancel()  # the event loop stops with the server
    await until(lambda: endpoint.closed_calls > 0)
    assert transport.closing and connection._opening is None
    assert ws.parse_close(transport.frames()[0][1]) == (1012, "server shutting down")
    connection.connection_lost(None)
    await asyncio.sleep(0.01)
    assert endpoint.closed_calls == 1


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
