"""The WebSocket layer end to end, through uvicorn, byte by byte: what a library client
would not send, or would hide."""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest
import websockets

from presence.websocket import frames as ws
from tests.conftest import Client, Server

pytestmark = pytest.mark.e2e


def handshake(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame whose mask is zero: its payload goes out as it is."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def raw_connect(server: Server, path: str, rcvbuf: int | None = None) -> socket.socket:
    """An upgraded socket, its 101 response read; a small ``rcvbuf`` makes a peer that
    stops reading fill up fast."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(handshake(path))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)  # byte by byte: nothing after the response is consumed
        assert chunk, "closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101 "), response
    return sock


class Frames:
    """The frames a server sends on a raw socket (they are not masked)."""

    def __init__(self, sock: socket.socket, data: bytes = b"") -> None:
        self.sock, self.data = sock, data

    def next(self, timeout: float = 10) -> tuple[int, bytes] | None:
        """The next frame, or None when the server closed the TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)  # a timeout raises
            if not chunk:
                return None
            self.data += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        data = self.data
        if len(data) < 2:
            return None
        length, start = data[1] & 0x7F, {126: 4, 127: 10}.get(data[1] & 0x7F, 2)
        if len(data) < start:
            return None
        if length == 126:
            (length,) = struct.unpack_from("!H", data, 2)
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, 2)
        if len(data) < start + length:
            return None
        self.data = data[start + length :]
        return data[0] & 0x0F, data[start : start + length]


def response_to(server: Server, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        response = b""
        while b"\r\n\r\n" not in response and (chunk := sock.recv(65536)):
            response += chunk
        return response


async def test_frames_in_the_same_write_as_the_request_are_not_dropped(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(handshake("/rooms/doc") + masked(0x9, b"are you there"))
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        head, _, rest = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        frames = Frames(sock, rest)
        welcome = frames.next()
        assert welcome is not None and b'"welcome"' in welcome[1]
        assert frames.next() == (0xA, b"are you there")


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n"),
        lambda r: r.replace(b"Host: 127.0.0.1\r\n", b""),
    ],
    ids=["http-1.0", "no-host"],
)
async def test_handshakes_that_are_not_http_1_1_are_refused(
    server: Server, edit: Callable[[bytes], bytes]
) -> None:
    response = response_to(server, edit(handshake("/rooms/doc")))
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]


async def test_the_keepalive_close_frame_waits_behind_unread_data(
    server_factory: Callable[..., Server],
) -> None:
    """A client that stops reading, and so answering pings, is closed with 1011 after a
    ping interval; if it reads again it gets what the server had still to send, then the
    close frame (it used to be discarded with that data, by abort())."""
    server = server_factory(
        "--ping-interval", "1", "--rate-limit", "1000", "--max-state-bytes", "16384"
    )
    sock = raw_connect(server, "/rooms/doc", rcvbuf=4096)  # reads nothing for now
    while server.metrics()["presence_members"] < 1:  # the 101 comes before the join
        await asyncio.sleep(0.01)
    writers = [await Client.connect(f"{server.ws}/rooms/doc") for _ in range(4)]

    async def write(writer: Client) -> None:
        # Megabytes a second: more than the kernel's buffers hold for the silent client.
        for i in itertools.count():
            await writer.update(cursor={"x": i}, blob=str(i) * (16000 // len(str(i))))
            await asyncio.sleep(0.003)

    async def read(writer: Client) -> None:
        while True:
            await writer.recv(timeout=30)

    # The silent client joined first: the only member the first writer was welcomed by.
    (silent,) = (m["id"] for m in writers[0].welcome["members"])
    tasks = [asyncio.create_task(write(w)) for w in writers]
    tasks += [asyncio.create_task(read(w)) for w in writers[1:]]
    # The server gives up on the silent client: its member leaves.
    await writers[0].until(lambda m: m["type"] == "leave" and silent in m["ids"], timeout=15)
    for task in tasks:
        task.cancel()
    # Read it all now, with a window that lets it come: through the tiny one, TCP's
    # zero-window probes back off to seconds apart on a loaded machine.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    frames = Frames(sock)
    last, seen, drained = None, collections.Counter[int](), time.monotonic() + 30
    while (frame := frames.next()) is not None:
        last = frame
        seen[frame[0]] += 1
        # What waited for it is bounded (merged while it did not read): a stream that
        # never ends is a bug, and says what it was made of.
        assert time.monotonic() < drained, f"still sending after 30 s: opcodes {seen}"
    assert last is not None
    assert last[0] == 0x8, f"the last frame is no close frame but opcode {last[0]}"
    assert ws.parse_close(last[1]) == (1011, "keepalive ping timeout")
    sock.close()
    for writer in writers:
        await writer.close()


@pytest.mark.parametrize("code", [1012, 1013, 1014])
async def test_a_client_may_close_with_1012_1013_or_1014(server: Server, code: int) -> None:
    client = await websockets.connect(f"{server.ws}/rooms/doc")
    await client.close(code)
    assert client.close_code == code  # echoed, not refused with 1002
