"""Connections that never become requests cannot hold a replica: headers of any size are
cut off at the request limit with 431 while they arrive, connections that do not send a
whole request in time (slowloris) are closed, and one address, or everyone together,
cannot open more connections than the limits allow: one more is answered 503, counted
in /metrics, while the rooms already open keep relaying. ``-s`` prints the figures."""

from __future__ import annotations

import asyncio
import resource
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable

import pytest

from harness import processes
from presence.websocket.frames import MAX_REQUEST_BYTES
from tests.conftest import Client, Server
from tests.test_websocket_flood import assert_not_flooded, measure, rss
from tests.test_websocket_server import handshake

pytestmark = pytest.mark.e2e

MiB = 1 << 20
OTHER_IP = "127.0.0.2"  # a second source address on the loopback interface


def refused(reason: str) -> str:
    return f'presence_connections_refused_total{{reason="{reason}"}}'


class BigHeader(threading.Thread):
    """Sends one request whose headers never end: ``total`` bytes of one header line."""

    def __init__(self, server: Server, total: int = 64 * MiB) -> None:
        super().__init__(daemon=True)
        self.server, self.total = server, total
        self.stop = threading.Event()
        self.sent = 0
        self.response = b""
        self.closed_after: float | None = None

    def run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        started = time.monotonic()
        chunk = b"a" * 65536
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while self.sent < self.total and not self.stop.is_set():
                self.sent += sock.send(chunk)
        except OSError:
            pass  # the server closed the connection (reset: it stopped reading)
        self.closed_after = time.monotonic() - started
        try:
            sock.settimeout(2)
            while chunk := sock.recv(65536):
                self.response += chunk
        except OSError:
            pass
        sock.close()


class Attackers(threading.Thread):
    """Several attacks run as one (the interface ``measure`` expects)."""

    def __init__(self, attacks: list[BigHeader]) -> None:
        super().__init__(daemon=True)
        self.attacks = attacks
        self.stop = threading.Event()

    def run(self) -> None:
        for attack in self.attacks:
            attack.start()
        self.stop.wait()
        for attack in self.attacks:
            attack.stop.set()
            attack.join(10)


async def test_unfinished_64_mib_headers_are_answered_431_while_they_arrive(
    server_factory: Callable[..., Server],
) -> None:
    """Before: 4 such headers took the server from 42 to 299 MiB, and no answer came."""
    server = server_factory("--seed", "21")
    attacks = [BigHeader(server) for _ in range(4)]
    figures = await measure(server, Attackers(attacks))
    sent = [a.sent / MiB for a in attacks]
    print(f"\n64 MiB headers: sent {[round(s, 2) for s in sent]} MiB each; {figures}")
    answered = sum(a.response.startswith(b"HTTP/1.1 431 ") for a in attacks)
    print(f"{answered} of them read the 431 (the others' was lost to the reset)")
    for attack in attacks:
        # What was sent includes what the kernels' socket buffers took (MiBs on loopback).
        assert attack.sent < 12 * MiB, f"{attack.sent} bytes of headers were taken"
        assert attack.closed_after is not None and attack.closed_after < 5
        # Its reply may be lost to the reset (the client went on sending): the count is not.
        assert attack.response == b"" or attack.response.startswith(b"HTTP/1.1 431 ")
    assert server.metrics()[refused("header_too_large")] == 4
    assert_not_flooded(figures)
    assert figures.rss_growth < 20, figures


async def test_headers_up_to_the_limit_are_served(server: Server) -> None:
    padding = b"X-Pad: " + b"a" * (MAX_REQUEST_BYTES - 200) + b"\r\n"
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for i in range(0, len(request), 100):  # in small pieces: counted across reads
            sock.sendall(request[i : i + 100])
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


class Slowloris(threading.Thread):
    """``dribbling`` sockets send a WebSocket handshake a byte at a time (one every
    ``every`` seconds each) and ``silent`` ones send nothing; notes when each is closed."""

    def __init__(self, server: Server, dribbling: int, silent: int, every: float) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.stop = threading.Event()
        self.request = handshake("/rooms/flood")
        self.sockets: list[socket.socket] = []
        for _ in range(dribbling + silent):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setblocking(False)
            self.sockets.append(sock)
        self.dribbling = set(self.sockets[:dribbling])
        self.opened = time.monotonic()
        self.closed: dict[socket.socket, float] = {}

    def run(self) -> None:
        position = 0
        while not self.stop.is_set() and len(self.closed) < len(self.sockets):
            for sock in self.dribbling - self.closed.keys():
                try:
                    sock.send(self.request[position : position + 1])
                except OSError:
                    self.closed[sock] = time.monotonic() - self.opened
            position = min(position + 1, len(self.request) - 2)  # never completes
            deadline = time.monotonic() + self.every
            while (left := deadline - time.monotonic()) > 0:
                waiting = [s for s in self.sockets if s not in self.closed]
                readable, _, _ = select.select(waiting, [], [], left)
                for sock in readable:
                    try:
                        if not sock.recv(4096):
                            self.closed[sock] = time.monotonic() - self.opened
                    except OSError:
                        self.closed[sock] = time.monotonic() - self.opened
                if not readable:
                    break
        for sock in self.sockets:
            sock.close()


async def test_slowloris_handshakes_and_silent_sockets_are_closed_in_time(
    server_factory: Callable[..., Server],
) -> None:
    """Before: 1,000 dribbling handshakes and 1,000 silent sockets, none closed after
    45 s. Here with --handshake-timeout 1: all closed within it and a little slack."""
    timeout = 1.0
    server = server_factory(
        "--seed", "22", "--handshake-timeout", str(timeout), "--max-connections-per-ip", "1000"
    )
    attack = Slowloris(server, dribbling=200, silent=200, every=0.25)
    figures = await measure(server, attack)  # runs it while an observer measures
    times = sorted(attack.closed.values())
    print(
        f"\nslowloris: {len(times)}/{len(attack.sockets)} closed, the last after "
        f"{max(times, default=float('nan')):.2f} s (timeout {timeout} s); {figures}"
    )
    assert len(times) == len(attack.sockets)
    assert times[-1] < timeout + 2.5
    assert_not_flooded(figures)
    assert server.metrics()[refused("handshake_timeout")] == len(attack.sockets)


def connect(server: Server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def ask(sock: socket.socket, request: bytes) -> bytes:
    """The status line of the reply to ``request``."""
    sock.sendall(request)
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply.split(b"\r\n", 1)[0]


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def upgrade(*headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers).encode()
    return handshake("/rooms/limits").replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1)


async def relaying(sender: Client, observer: Client, n: int = 20) -> list[float]:
    """Latencies of ``n`` updates from ``sender`` to ``observer``, sorted; fails if one
    does not arrive."""
    latencies = []
    for i in range(n):
        sent = time.monotonic()
        await sender.update(cursor={"x": i, "y": 0})
        await observer.until(
            lambda m, i=i: any(  # type: ignore[misc]
                u["id"] == sender.id and u["state"].get("cursor", {}).get("x") == i
                for u in m.get("updates", ())
            ),
            timeout=10,
        )
        latencies.append(time.monotonic() - sent)
        await asyncio.sleep(0.05)
    return sorted(latencies)


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def room(server: Server) -> tuple[Client, Client]:
    sender = await Client.connect(f"{server.ws}/rooms/limits")
    observer = await Client.connect(f"{server.ws}/rooms/limits")
    await observer.until(lambda m: sender.id in observer.members)
    return sender, observer


async def test_one_address_over_its_limit_is_refused_with_503_and_others_get_in(
    server_factory: Callable[..., Server],
) -> None:
    """Before: 10,000 silent sockets from one IP were all held."""
    limit = 20
    server = server_factory(
        "--seed", "23", "--max-connections-per-ip", str(limit), "--handshake-timeout", "60"
    )
    sender, observer = await room(server)
    # The limit counts WebSockets and connections that have sent nothing alike.
    held = [connect(server, OTHER_IP) for _ in range(limit // 2)]
    for sock in held:
        assert ask(sock, upgrade()).startswith(b"HTTP/1.1 101 ")
    held += [connect(server, OTHER_IP) for _ in range(limit - len(held))]
    started = time.monotonic()
    statuses = [ask(connect(server, OTHER_IP), r) for r in (upgrade(), get("/healthz"))]
    refusing = time.monotonic() - started
    assert all(s.startswith(b"HTTP/1.1 503 ") for s in statuses), statuses
    # Another address gets in: a new WebSocket, HTTP, and the room keeps relaying.
    other = connect(server)
    assert ask(other, upgrade()).startswith(b"HTTP/1.1 101 ")
    latencies = await relaying(sender, observer)
    assert server.metrics()[refused("per_ip")] == 2
    # One closes (a WebSocket): its place is free again.
    held.pop(0).close()
    deadline = time.monotonic() + 5
    while not ask(connect(server, OTHER_IP), upgrade()).startswith(b"HTTP/1.1 101 "):
        assert time.monotonic() < deadline, "a closed WebSocket still counts"
        await asyncio.sleep(0.05)
    print(
        f"\nper IP: 2 refused in {refusing * 1000:.0f} ms; observer p50 "
        f"{statistics.median(latencies) * 1000:.0f} ms, p99 {p99(latencies) * 1000:.0f} ms"
    )
    assert p99(latencies) < 0.5
    for sock in [*held, other]:
        sock.close()


async def test_behind_a_proxy_the_forwarded_client_is_counted(
    server_factory: Callable[..., Server],
) -> None:
    # 127.0.0.1 is the proxy here.
    server = server_factory(
        "--seed", "24", "--max-connections-per-ip", "3", "--forwarded-allow-ips", "127.0.0.1"
    )
    held = [connect(server) for _ in range(3)]
    for sock in held:
        assert ask(sock, upgrade("X-Forwarded-For: 10.0.0.1")).startswith(b"HTTP/1.1 101 ")
    assert ask(connect(server), upgrade("X-Forwarded-For: 10.0.0.1")).startswith(b"HTTP/1.1 503 ")
    assert ask(connect(server), get("/healthz", "X-Forwarded-For: 10.0.0.1")).startswith(
        b"HTTP/1.1 503 "
    )
    for client in ("10.0.0.2", "10.0.0.3, 10.0.0.1"):  # the last one is the client
        status = ask(connect(server), upgrade(f"X-Forwarded-For: {client}"))
        assert status.startswith(b"HTTP/1.1 101 ") == (client == "10.0.0.2"), (client, status)
    assert server.metrics()[refused("per_ip")] == 3
    # An address that is no proxy cannot pass for another one.
    limited = server_factory(
        "--seed", "25", "--max-connections-per-ip", "1", "--handshake-timeout", "60"
    )
    first = connect(limited, OTHER_IP)
    status = ask(connect(limited, OTHER_IP), upgrade("X-Forwarded-For: 10.0.0.9"))
    assert status.startswith(b"HTTP/1.1 503 "), status
    # Trusting every proxy ("*"), the entry the nearest proxy added counts, not what a
    # client wrote before it: new made-up addresses each time do not get it more places.
    everyone_trusting = server_factory(
        "--seed", "27", "--max-connections-per-ip", "2", "--forwarded-allow-ips", "*"
    )
    for sock in held:
        sock.close()
    held = [connect(everyone_trusting) for _ in range(2)]
    for i, sock in enumerate(held):
        status = ask(sock, upgrade(f"X-Forwarded-For: 6.6.6.{i}, 10.0.0.1"))
        assert status.startswith(b"HTTP/1.1 101 "), status
    status = ask(connect(everyone_trusting), upgrade("X-Forwarded-For: 6.6.6.9, 10.0.0.1"))
    assert status.startswith(b"HTTP/1.1 503 "), status
    for sock in [*held, first]:
        sock.close()


async def test_no_address_is_a_proxy_by_default_not_even_the_loopback(
    server_factory: Callable[..., Server],
) -> None:
    """Before: 127.0.0.1 was trusted by default. Any local process dodged the per-IP
    limit with a new X-Forwarded-For per connection, and its silent connections were not
    counted at all (10,000 held before the handshake timeout)."""
    server = server_factory(
        "--seed", "29", "--max-connections-per-ip", "3", "--handshake-timeout", "60"
    )
    held = [connect(server) for _ in range(2)]
    for i, sock in enumerate(held):
        status = ask(sock, upgrade(f"X-Forwarded-For: 10.0.0.{i}"))
        assert status.startswith(b"HTTP/1.1 101 "), status
    held.append(connect(server))  # silent: counted from the moment it connects
    status = ask(connect(server), upgrade("X-Forwarded-For: 10.0.0.9"))
    assert status.startswith(b"HTTP/1.1 503 "), status
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 5
    while True:  # the metrics come over a connection from 127.0.0.1 too, once one is free
        try:
            assert server.metrics()[refused("per_ip")] == 1
            break
        except ValueError:
            assert time.monotonic() < deadline, "127.0.0.1's connections stayed counted"
            await asyncio.sleep(0.05)


async def test_a_lecture_hall_behind_one_address_gets_in_with_the_defaults(
    server_factory: Callable[..., Server],
) -> None:
    """Before: with 256 connections per IP, students 257 to 300 were refused (503)."""
    server = server_factory("--seed", "30")  # the default limits
    students: list[Client] = []
    started = time.monotonic()
    for _wave in range(6):  # 300 within a few seconds, 50 at once
        students += await asyncio.gather(
            *(Client.connect(f"{server.ws}/rooms/hall") for _ in range(50))
        )
    joined = time.monotonic() - started
    last = students[-1]
    assert len(last.welcome["members"]) == 299  # everyone else
    assert not any(k.startswith("presence_connections_refused_total") for k in server.metrics())
    sender, observer = students[0], students[-1]
    latencies = await relaying(sender, observer)
    print(
        f"\nlecture hall: 300 joined from one address in {joined:.2f} s; observer p99 "
        f"{p99(latencies) * 1000:.0f} ms"
    )
    await asyncio.gather(*(s.close() for s in students))


async def test_one_address_opening_connections_too_fast_gets_429(
    server_factory: Callable[..., Server],
) -> None:
    """New connections past the rate (after its burst) are refused with 429, others'
    still get in, and the room relays."""
    server = server_factory("--seed", "31", "--connection-rate-per-ip", "5")  # bursts of 50
    sender, observer = await room(server)
    statuses = []
    for _ in range(60):
        sock = connect(server, OTHER_IP)
        statuses.append(ask(sock, get("/healthz")))
        sock.close()
    assert all(s.startswith(b"HTTP/1.1 200 ") for s in statuses[:48]), statuses
    assert sum(s.startswith(b"HTTP/1.1 429 ") for s in statuses) >= 8, statuses
    assert ask(connect(server), get("/healthz")).startswith(b"HTTP/1.1 200 ")
    assert server.metrics()[refused("per_ip_rate")] >= 8
    await relaying(sender, observer)


async def test_over_the_total_limit_everyone_is_refused_and_the_rooms_go_on(
    server_factory: Callable[..., Server],
) -> None:
    limit = 40
    server = server_factory(
        "--seed", "26", "--max-connections", str(limit), "--handshake-timeout", "60"
    )
    sender, observer = await room(server)  # 2 of the limit
    held = [connect(server, OTHER_IP) for _ in range(limit - 2)]
    for source in (OTHER_IP, "127.0.0.1", "127.0.0.3"):
        for request in (upgrade(), get("/healthz")):
            status = ask(connect(server, source), request)
            assert status.startswith(b"HTTP/1.1 503 "), (source, status)
    latencies = await relaying(sender, observer)
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            metrics = server.metrics()
            break
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    print(
        f"\ntotal: 6 refused; observer p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {p99(latencies) * 1000:.0f} ms; RSS {rss(server):.0f} MiB"
    )
    assert metrics[refused("total")] >= 6
    assert metrics["presence_tcp_connections_limit"] == limit
    assert p99(latencies) < 0.5


async def test_near_the_fd_limit_new_connections_are_refused_and_rooms_go_on(
    server_factory: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: one client holding the fd limit (1,024) had everyone else refused until it
    let go (here, at 128, a new client's upgrade was reset). With `ulimit -n 128` and the
    default --max-connections (128 less 64), a client opening more than the process
    can hold gets 503s, new clients too, and the room already open keeps relaying."""
    fds = 128
    start_as_child = processes.die_with_parent

    def limited() -> None:
        start_as_child()
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    monkeypatch.setattr(processes, "die_with_parent", limited)
    server = server_factory("--seed", "27", "--handshake-timeout", "60")
    assert server.metrics()["presence_tcp_connections_limit"] == fds - 64
    sender, observer = await room(server)
    started = time.monotonic()
    held = [connect(server, OTHER_IP) for _ in range(2 * fds)]  # more than it can hold
    statuses = [ask(connect(server, source), upgrade()) for source in (OTHER_IP, "127.0.0.1")]
    refusing = time.monotonic() - started
    assert all(s.startswith(b"HTTP/1.1 503 ") for s in statuses), statuses
    latencies = await relaying(sender, observer)
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while not ask(connect(server), upgrade()).startswith(b"HTTP/1.1 101 "):
        assert time.monotonic() < deadline, "not admitted again once the others let go"
        await asyncio.sleep(0.1)
    print(
        f"\nfd limit {fds}: {2 * fds} opened, refused in {refusing:.2f} s; observer p50 "
        f"{statistics.median(latencies) * 1000:.0f} ms, p99 {p99(latencies) * 1000:.0f} ms"
    )
    assert p99(latencies) < 0.5
    assert "Too many open files" not in server.output()
