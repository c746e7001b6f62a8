"""Network faults between a replica and Redis, injected by harness/faultproxy.py (a
user-space TCP proxy: the kernel here has no netem). A blackhole is a partition: no
error, no close, only silence, with what was sent delivered once it heals."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from harness.faultproxy import FaultProxy
from harness.processes import RedisProcess
from tests.conftest import FAST, Client, Server
from tests.test_json_protocol import join
from tests.test_replicas import published

pytestmark = pytest.mark.e2e

REPLICA_TIMEOUT = 2.0  # --replica-timeout of these replicas: heartbeats every 0.4 s


@pytest.fixture
def proxy(redis_server: RedisProcess) -> Iterator[FaultProxy]:
    faulty = FaultProxy("127.0.0.1", redis_server.port).start()
    yield faulty
    faulty.stop()


def test_the_proxy_holds_a_blackholed_stream_and_delivers_it_in_order_when_healed() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = FaultProxy("127.0.0.1", upstream.getsockname()[1]).start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        server, _ = upstream.accept()
        server.settimeout(0.5)
        client.sendall(b"one ")
        assert server.recv(100) == b"one "
        proxy.blackhole()
        client.sendall(b"two ")
        with pytest.raises(TimeoutError):
            server.recv(100)  # silence, not an error
        proxy.heal()
        client.sendall(b"three")
        received = b""
        while len(received) < len(b"two three"):
            received += server.recv(100)
        assert received == b"two three"
        proxy.delay(0.3)
        time.sleep(0.05)  # the proxy's loop takes the new delay
        sent = time.monotonic()
        client.sendall(b"late")
        server.settimeout(5)
        assert server.recv(100) == b"late"
        assert time.monotonic() - sent >= 0.3
        proxy.heal()
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            while client.recv(100):
                pass
        server.close()
        client.close()
    finally:
        proxy.stop()
        upstream.close()


def ready(server: Server) -> bool:
    return httpx.get(f"{server.http}/readyz", timeout=5).status_code == 200


async def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not within the bound"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def members(server: Server, room: str) -> list[str]:
    body = httpx.get(f"{server.http}/rooms/{room}", timeout=5).json()
    return sorted(m["id"] for m in body["members"])


async def test_a_replica_cut_from_redis_by_a_blackhole_recovers_whole(
    server_factory: Callable[..., Server], redis_server: RedisProcess, proxy: FaultProxy
) -> None:
    timing = (*FAST, "--replica-timeout", str(REPLICA_TIMEOUT))
    cut = server_factory(*timing, "--redis-url", f"redis://{proxy.address}")
    other = server_factory(*timing, "--redis-url", redis_server.url)
    a1, a2 = await join(cut, room="r"), await join(cut, room="r")
    b = await join(other, room="r")
    await published(redis_server, "r", members=3)
    everyone = sorted([a1.id, a2.id, b.id])
    await b.until(lambda m: {a1.id, a2.id} <= set(b.members))

    proxy.blackhole()
    unready_after = await until(lambda: not ready(cut), timeout=3 * REPLICA_TIMEOUT)
    # Cut off, it still relays between its own members.
    await a1.update(cursor={"x": 1})
    await a2.until(lambda m: a2.members[a1.id]["state"].get("cursor") == {"x": 1})
    # The other replica takes the silent one for down and drops its members meanwhile.
    await b.until(lambda m: a1.id not in b.members, timeout=3 * REPLICA_TIMEOUT)

    proxy.heal()
    healed = time.monotonic()
    await until(lambda: ready(cut), timeout=5)
    ready_after = time.monotonic() - healed
    await a1.update(cursor={"x": 2})
    await b.until(
        lambda m: b.members.get(a1.id, {}).get("state", {}).get("cursor") == {"x": 2},
        timeout=5,
    )
    whole_after = time.monotonic() - healed
    # Nobody lost or twice, on either replica, and in every client's view.
    for replica in (cut, other):
        assert members(replica, "r") == everyone
    for client in (a1, a2, b):  # each as its messages say, once read
        await client.until(lambda m, c=client: sorted([*c.members, c.id]) == everyone, timeout=2)
    print(
        f"\nblackhole: not ready after {unready_after:.2f} s; healed: ready after "
        f"{ready_after:.2f} s, relaying across replicas after {whole_after:.2f} s"
    )
    # The README's bound, 1.5 x max(1 s, 0.4 x replica_timeout), and a little for timers
    # running late on a busy machine.
    assert unready_after <= 1.5 * max(1.0, 0.4 * REPLICA_TIMEOUT) + 0.5
    assert whole_after < 1.0
    for client in (a1, a2, b):
        await client.close()


async def test_a_replica_whose_redis_link_is_slow_stays_ready_and_relays_late(
    server_factory: Callable[..., Server], redis_server: RedisProcess, proxy: FaultProxy
) -> None:
    """300 ms each way between a replica and Redis (a congested link): under the stall
    bound, so it stays ready; its members' updates reach the others that much later."""
    timing = (*FAST, "--replica-timeout", str(REPLICA_TIMEOUT))
    slow = server_factory(*timing, "--redis-url", f"redis://{proxy.address}")
    other = server_factory(*timing, "--redis-url", redis_server.url)
    a, b = await join(slow, room="d"), await join(other, room="d")
    await b.until(lambda m: a.id in b.members)
    proxy.delay(0.3)
    await asyncio.sleep(0.1)
    latencies = []
    for i in range(5):
        sent = time.monotonic()
        await a.update(cursor={"x": i})
        await b.until(lambda m, i=i: b.members[a.id]["state"].get("cursor") == {"x": i}, timeout=5)
        latencies.append(time.monotonic() - sent)
    assert ready(slow) and ready(other)
    assert all(0.3 <= t < 2.0 for t in latencies), latencies
    print(f"\nRedis link delayed 0.3 s: relayed in {min(latencies):.2f}-{max(latencies):.2f} s")
    proxy.heal()


async def test_a_client_whose_packets_blackhole_is_closed_by_keepalive(
    server_factory: Callable[..., Server],
) -> None:
    """A laptop that lost its network: no close, no error. The replica's pings go
    unanswered, and the member leaves everyone's screen within two ping intervals
    (docs/protocol.md: no pong for a whole interval closes it)."""
    ping = 1.0
    server = server_factory(*FAST, "--ping-interval", str(ping))
    upstream = FaultProxy("127.0.0.1", server.port).start()
    try:
        watcher = await join(server, room="k")
        lost = await Client.connect(f"ws://{upstream.address}/rooms/k")
        await watcher.until(lambda m: lost.id in watcher.members)
        upstream.blackhole()
        cut = time.monotonic()
        await watcher.until(lambda m: lost.id not in watcher.members, timeout=4 * ping)
        gone_after = time.monotonic() - cut
        print(f"\nclient blackholed: gone from the room after {gone_after:.2f} s (ping {ping} s)")
        assert gone_after <= 2 * ping + 1.0  # timers on two shared cores run late
        await watcher.close()
    finally:
        upstream.stop()
