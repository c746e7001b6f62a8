"""The read-only views under abuse: an event stream whose reader stops reading is closed
(its TCP connection, not only its place in the room), and what one snapshot of a room
costs is bounded by ``--max-room-state-bytes``. ``-s`` prints the figures."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.conftest import FAST, Client, Server
from tests.test_websocket_flood import rss
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SLOW = 1.0  # --slow-client-timeout of these tests, seconds
UPDATE_EVERY = 0.05  # under the default rate limit (30/s): no update is merged away
BLOB = 12_000  # characters of a sender's state field: under max_message_bytes (16 KiB)
SENDERS = 4  # members sending BLOB every UPDATE_EVERY: 1 MB/s for the stream


TCP_CONNECTIONS = "presence_tcp_connections"
SLOW_DISCONNECTS = "presence_slow_client_disconnects_total"


def open_connections(server: Server) -> float:
    # This request's own connection is open while it is counted: one less is the rest.
    return server.metrics()[TCP_CONNECTIONS] - 1


def never_reading_stream(server: Server, room: str) -> socket.socket:
    """A client of ``GET /rooms/{room}/events`` that never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills sooner
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /rooms/{room}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def ended(sock: socket.socket, timeout: float) -> str:
    """Read what the server sent until it ends: 'reset', 'eof', or 'open' at timeout."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        pass
    return "open"


async def test_an_event_stream_that_stops_reading_is_closed(
    server_factory: Callable[..., Server],
) -> None:
    """A dashboard that opens a room's event stream and never reads, while 4 members send
    12 KB states 20 times a second: once the server's buffers for it are full it is
    judged slow after --slow-client-timeout, and its TCP connection is closed then
    (aborted: what waits for it in the server is dropped), while an observer member
    keeps getting every update. Before, the hub counted it as a slow client and forgot
    it, but the response stayed blocked on the full socket: the connection was held open
    for good."""
    server = server_factory(*FAST, "--expire-after", "120", "--slow-client-timeout", str(SLOW))
    room = f"{server.ws}/rooms/stream"
    senders = [await Client.connect(room) for _ in range(SENDERS)]
    sender = senders[0]
    observer = await Client.connect(room)
    await observer.until(lambda m: all(s.id in observer.members for s in senders))
    before = open_connections(server)
    resting = peak = rss(server)
    sock = never_reading_stream(server, "stream")
    opened = time.monotonic()
    received: set[int] = set()
    sent = 0
    judged_at = closed_at = None

    async def observe() -> None:
        while True:
            message = await observer.recv(timeout=60)
            for update in message.get("updates", ()):
                if update["id"] == sender.id and "n" in update["state"]:
                    received.add(update["state"]["n"])

    async def drain(client: Client) -> None:
        while True:  # like a frontend
            await client.recv(timeout=60)

    observing = asyncio.create_task(observe())
    draining = [asyncio.create_task(drain(s)) for s in senders]
    try:
        deadline = opened + 60
        while closed_at is None and time.monotonic() < deadline:
            for s in senders:
                await s.update(n=sent, blob=secrets.token_hex(BLOB // 2))
            sent += 1
            await asyncio.sleep(UPDATE_EVERY)
            peak = max(peak, rss(server))
            if sent % 4:
                continue
            # One scrape for both: the hub counts the stream slow, then aborts it, so a
            # scrape that finds it closed finds it counted (two scrapes could fall either
            # side of that moment, and the stream looked closed but never judged).
            metrics = server.metrics()
            if judged_at is None and metrics[SLOW_DISCONNECTS] >= 1:
                judged_at = time.monotonic()
            if metrics[TCP_CONNECTIONS] - 1 <= before:
                closed_at = time.monotonic()
        # The last updates on their way to the observer.
        wait_until = time.monotonic() + 5
        while len(received) < sent and time.monotonic() < wait_until:
            await asyncio.sleep(0.05)
    finally:
        for task in [observing, *draining]:
            task.cancel()
        for client in [*senders, observer]:
            await client.close()
    how = await asyncio.to_thread(ended, sock, 5)
    sock.close()

    def after(t: float | None) -> str:
        return "never" if t is None else f"{t - opened:.1f} s"

    print(
        f"\nstream judged slow {after(judged_at)} after opening, "
        f"closed {after(closed_at)} after opening ({how}); "
        f"observer got {len(received)}/{sent} updates; "
        f"server RSS +{peak - resting:.1f} MiB"
    )
    assert judged_at is not None, "the stream was never judged slow"
    assert closed_at is not None, "the stream's connection stayed open"
    assert closed_at - judged_at < SLOW + 2  # the sweep's step and this loop's: slack
    assert how in ("reset", "eof")
    assert len(received) >= 0.9 * sent
    assert peak - resting < 50


MEMBERS = 100
BIG = 16_000  # bytes of one member's state: under max_state_bytes and max_message_bytes


ROOM_STATE_TOO_LARGE = 'presence_protocol_errors_total{code="room_state_too_large"}'


async def fill_room(server: Server, room: str) -> tuple[list[Client], int]:
    """MEMBERS members that each send a BIG state, read like frontends; returns them and
    how many states were refused with room_state_too_large, once each was either
    refused or is in the room."""
    url = f"{server.ws}/rooms/{room}"
    members = await asyncio.gather(*(Client.connect(url, max_size=None) for _ in range(MEMBERS)))
    errors: list[str] = []

    async def read(member: Client) -> None:
        while True:
            message = await member.recv(timeout=120)
            if message["type"] == "error":
                errors.append(message["code"])

    readers = [asyncio.create_task(read(m)) for m in members]
    blob = "x" * (BIG - len('{"blob":""}'))
    await asyncio.gather(*(m.update(blob=blob) for m in members))
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=server.http) as http:
        while True:
            body = (await http.get(f"/rooms/{room}")).json()
            admitted = sum(1 for m in body["members"] if m["state"])
            if admitted + len(errors) >= MEMBERS or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    for reader in readers:
        reader.cancel()
    assert admitted + len(errors) == MEMBERS, (admitted, errors)
    assert set(errors) <= {"room_state_too_large"}, errors
    return members, len(errors)


async def snapshot_sizes(server: Server, room: str) -> tuple[int, int]:
    """The bytes of a new joiner's welcome and of GET /rooms/{room}."""
    joiner = await Client.connect(f"{server.ws}/rooms/{room}", max_size=None)
    welcome = len(orjson.dumps(joiner.welcome))
    await joiner.close()
    async with httpx.AsyncClient(base_url=server.http) as http:
        rest = len((await http.get(f"/rooms/{room}")).content)
    return welcome, rest


@pytest.mark.parametrize("budget", [None, 512 * 1024, 64 * 1024])
async def test_what_one_snapshot_of_a_room_of_large_states_costs_is_bounded(
    server_factory: Callable[..., Server], budget: int | None
) -> None:
    """100 members each send a 16 KB state. Without a budget (as before: the budget set
    beyond them) every joiner's welcome and every GET /rooms/{room} is 1.6 MB; with the
    default of 512 KiB, or 64 KiB, the states that would grow the room past it are
    refused with room_state_too_large, and both stay within the budget and the members'
    identities (under 300 bytes each)."""
    args = ["--max-room-state-bytes", str(budget or 100 * MiB)]
    server = server_factory(*FAST, "--expire-after", "120", *args)
    members, refused = await fill_room(server, "big")
    welcome, rest = await snapshot_sizes(server, "big")
    errors = server.metrics().get(ROOM_STATE_TOO_LARGE, 0)
    # Together: a member that stopped reading waits out its close timeout (100 x 0.5 s).
    await asyncio.gather(*(member.close() for member in members))
    print(
        f"\nbudget {budget}: {refused} of {MEMBERS} states refused; "
        f"welcome {welcome} bytes, GET /rooms/big {rest} bytes"
    )
    assert errors == refused
    if budget is None:
        assert refused == 0 and welcome > MEMBERS * BIG and rest > MEMBERS * BIG
        return
    assert refused == MEMBERS - budget // BIG
    assert welcome < budget + (MEMBERS + 1) * 300
    assert rest < budget + MEMBERS * 300


async def test_a_yjs_state_past_the_budget_is_ignored_and_counted(
    server_factory: Callable[..., Server],
) -> None:
    """A Yjs client's state that would grow the room past its budget is ignored (not
    relayed, the client is no member), counted in presence_protocol_errors_total."""
    server = server_factory(*FAST, "--max-room-state-bytes", "20000")
    first = await YClient.connect(f"{server.ws}/yjs/y", {"blob": "x" * 15_000})
    second = await YClient.connect(f"{server.ws}/yjs/y", {"blob": "y" * 5_000})
    small = await YClient.connect(f"{server.ws}/yjs/y", {"cursor": 1})
    await small.until(lambda: first.id in small.states)
    async with httpx.AsyncClient(base_url=server.http) as http:
        body = (await http.get("/rooms/y")).json()
    errors = server.metrics().get(ROOM_STATE_TOO_LARGE, 0)
    for client in (first, second, small):
        await client.close()
    assert second.id not in small.states
    assert len(body["members"]) == 2
    assert errors == 1
