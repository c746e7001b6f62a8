"""Several replicas on a real Redis: each test starts its own Redis and server processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from harness.processes import RedisCluster, RedisProcess
from presence.codecs.replica import open_envelope
from tests.conftest import FAST, Client, Server
from tests.test_json_protocol import closed_with, join

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]


def replicas(factory: ServerFactory, redis_url: str, n: int = 2, *extra: str) -> list[Server]:
    return [
        factory(*FAST, "--redis-url", redis_url, "--replica-timeout", "2", *extra) for _ in range(n)
    ]


async def published(redis: RedisProcess, room: str = "doc", members: int = 1) -> None:
    """Wait until ``members`` of the room are in Redis. A member who joined another replica
    a moment ago may otherwise arrive as a ``join`` just after the welcome, not in it."""
    with redis.client() as client:
        for _ in range(100):
            if client.hlen(f"presence:{{{room}}}:members") >= members:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{members} member(s) of {room!r} never reached Redis")


def logged(server: Server, prefix: str = "") -> list[dict[str, Any]]:
    """The server's JSON log entries whose message starts with ``prefix``."""
    lines = server.output().splitlines()
    entries = [orjson.loads(line) for line in lines if line.startswith("{")]
    return [e for e in entries if e["msg"].startswith(prefix)]


def sees(client: Client, other: Client, **state: object) -> Callable[[dict[str, object]], bool]:
    """A predicate: ``client`` knows ``other`` with at least these state fields."""

    def check(_: dict[str, object]) -> bool:
        member = client.members.get(other.id)
        return member is not None and all(member["state"].get(k) == v for k, v in state.items())

    return check


async def test_members_on_different_replicas_see_each_other(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(server_factory, redis_server.url)
    a = await join(r1)
    await published(redis_server)
    b = await join(r2)
    # b's snapshot, taken on the other replica, includes a.
    assert [m["id"] for m in b.welcome["members"]] == [a.id]
    await a.until(sees(a, b))
    await a.update(cursor={"x": 1, "y": 1})
    await b.until(sees(b, a, cursor={"x": 1, "y": 1}))
    # Order is kept across replicas.
    for i in range(100):
        await b.update(cursor={"x": i, "y": 0})
    xs: list[int] = []

    def collect(m: dict[str, object]) -> bool:
        if m["type"] == "update":
            xs.extend(
                u["state"]["cursor"]["x"]
                for u in m["updates"]  # type: ignore[attr-defined]
                if u["id"] == b.id and "cursor" in u["state"]
            )
        return bool(xs) and xs[-1] == 99

    await a.until(collect, timeout=10)
    assert xs == sorted(xs)
    # A late joiner on either replica sees everyone with their current state.
    c = await join(r1)
    snapshot = {m["id"]: m["state"] for m in c.welcome["members"]}
    assert snapshot == {a.id: {"cursor": {"x": 1, "y": 1}}, b.id: {"cursor": {"x": 99, "y": 0}}}
    # Idle crosses replicas, and so does leave.
    await c.until(lambda m: m["type"] == "idle" and b.id in m["ids"], timeout=5)
    await b.close()
    await a.until(lambda m: m["type"] == "leave" and b.id in m["ids"], timeout=3)
    await c.until(lambda m: b.id not in c.members, timeout=3)


async def test_replica_subscribes_only_to_rooms_with_local_members(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(server_factory, redis_server.url)
    a = await join(r1, room="only-on-r1")
    b = await join(r2, room="only-on-r2")
    with redis_server.client() as client:

        def subscribers(room: str) -> int:
            return int(
                dict(client.pubsub_numsub(f"presence:{{{room}}}"))[f"presence:{{{room}}}".encode()]
            )

        assert subscribers("only-on-r1") == 1
        assert subscribers("only-on-r2") == 1
        c = await join(r2, room="only-on-r1")
        await a.until(sees(a, c))
        assert subscribers("only-on-r1") == 2
        await c.close()
        await a.until(lambda m: c.id not in a.members)
        for _ in range(50):
            if subscribers("only-on-r1") == 1:
                break
            await asyncio.sleep(0.05)
        assert subscribers("only-on-r1") == 1
        await a.close()
        await b.close()
        for _ in range(50):
            if not client.pubsub_channels("presence:{*"):
                break
            await asyncio.sleep(0.05)
        assert client.pubsub_channels("presence:{*") == []


async def test_one_publish_per_room_per_tick(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(
        server_factory, redis_server.url, 2, "--flush-interval", "0.2", "--rate-limit", "1000"
    )
    a = await join(r1)
    b = await join(r2)
    await a.until(sees(a, b))
    with redis_server.client() as client:
        pubsub = client.pubsub()
        pubsub.subscribe("presence:{doc}")
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        started = time.monotonic()
        for i in range(100):
            await a.update(cursor={"x": i, "y": 0})
        await b.until(sees(b, a, cursor={"x": 99, "y": 0}), timeout=5)
        elapsed = time.monotonic() - started
        published = 0  # messages carrying a's updates (idle marks may come too)
        while (message := pubsub.get_message(timeout=0.3)) is not None:
            _sender, body = open_envelope(message["data"])
            data = orjson.loads(body)
            published += any(e[0] == "u" for e in data.get("e", []))
        pubsub.close()
    # At most one message per tick (plus the first one, sent at once).
    assert 1 <= published <= elapsed / 0.2 + 2, (published, elapsed)


async def test_sigkill_of_a_replica_removes_its_members_everywhere(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    # The default replica timeout: 5 s.
    r1 = server_factory(*FAST, "--redis-url", redis_server.url)
    r2 = server_factory(*FAST, "--redis-url", redis_server.url)
    a = await join(r1)
    ghost = await join(r2)
    await a.until(sees(a, ghost))
    killed = time.monotonic()
    r2.stop(signal.SIGKILL)
    # a keeps a heartbeat going; the ghost must be gone within the timeout.
    while ghost.id in a.members and time.monotonic() - killed < 15:
        await a.send({"type": "heartbeat"})
        with contextlib.suppress(TimeoutError):
            await a.until(lambda m: ghost.id not in a.members, timeout=0.5)
    removed_after = time.monotonic() - killed
    print(f"\nghost removed {removed_after:.2f}s after SIGKILL (replica timeout 5 s)")
    assert ghost.id not in a.members, "ghost still there 15 s after SIGKILL"
    # Within the timeout (0.5 to 0.8 x of it, tested with a fake clock), plus a second
    # of slack for a busy machine.
    assert removed_after <= 5.0 + 1.0
    # A restarted replica is a new replica: its old members never come back.
    r3 = server_factory(*FAST, "--redis-url", redis_server.url)
    late = await join(r3)
    assert [m["id"] for m in late.welcome["members"]] == [a.id]


async def test_sigkill_leave_arrives_within_replica_timeout(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    timeout = 2.0  # replicas()'s --replica-timeout
    r1, r2 = replicas(server_factory, redis_server.url)
    a = await join(r1)
    ghost = await join(r2)
    await a.until(sees(a, ghost))
    killed = time.monotonic()
    r2.stop(signal.SIGKILL)
    await a.until(lambda m: m["type"] == "leave" and ghost.id in m["ids"], timeout=timeout + 5)
    after = time.monotonic() - killed
    print(f"\nleave {after:.2f}s after SIGKILL (replica timeout {timeout:g} s)")
    # The bound itself (0.5 to 0.8 x the timeout) is checked with a fake clock in
    # tests/test_replication.py; here: never so early that a live replica's late
    # heartbeat could be taken for its death, and within the timeout, plus a second of
    # slack for a busy machine.
    assert 0.3 * timeout < after <= timeout + 1.0


async def test_sigterm_members_leave_everywhere_at_once(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(server_factory, redis_server.url)
    a = await join(r1)
    b = await join(r2)
    await a.until(sees(a, b))
    stopped = time.monotonic()
    r2.stop(signal.SIGTERM)
    await a.until(lambda m: b.id not in a.members, timeout=5)
    left = time.monotonic() - stopped
    print(f"\nleft {left:.2f} s after SIGTERM (replica timeout 2 s)")
    # At once: by the goodbye, not by the timeout (a lost goodbye takes 1 s or more).
    assert left < 1.0
    code, _ = await closed_with(b)
    assert code == 1012


async def test_redis_restart_everyone_sees_everyone_again(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(server_factory, redis_server.url)
    a = await join(r1)
    b = await join(r2)
    await a.until(sees(a, b))
    redis_server.stop(signal.SIGKILL)
    # Local members keep being served while Redis is down.
    local = await join(r1)
    await a.update(cursor={"x": 5, "y": 5})
    await local.until(sees(local, a, cursor={"x": 5, "y": 5}))
    async with httpx.AsyncClient() as http:
        for _ in range(50):
            if (await http.get(r1.http + "/readyz")).status_code == 503:
                break
            await asyncio.sleep(0.1)
        ready = await http.get(r1.http + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"]["state"] == "down" and ready.json()["redis"]["error"]
        assert r1.metrics()["presence_backplane_up"] == 0
        restarted = time.monotonic()
        redis_again = RedisProcess(port=redis_server.port).start()
        # Recovery: after the restart, b sees the update a made during the outage and the
        # member that joined meanwhile; and a sees b's new moves.
        await b.until(sees(b, a, cursor={"x": 5, "y": 5}), timeout=15)
        await b.until(sees(b, local), timeout=15)
        recovered = time.monotonic() - restarted
        await b.update(cursor={"x": 9, "y": 9})
        await a.until(sees(a, b, cursor={"x": 9, "y": 9}), timeout=5)
        print(f"\nrecovered {recovered:.2f}s after Redis came back")
        for r in (r1, r2):
            ready = await http.get(r.http + "/readyz")
            assert ready.status_code == 200 and ready.json()["redis"]["state"] == "up"
            metrics = r.metrics()
            assert metrics["presence_backplane_up"] == 1
            assert metrics["presence_backplane_reconnects_total"] == 1
            # One line when it went down, one when it came back; none per retry.
            changes = [e for e in logged(r, "redis") if not e["msg"].startswith("redis still")]
            assert [(e["level"], e["msg"].split(" (")[0]) for e in changes] == [
                ("info", "redis connected"),
                ("warning", "redis connection lost"),
                ("info", "redis reconnected"),
            ]
            assert changes[1]["url"] == redis_server.url and changes[1]["error"]
        # What could not be published while Redis was away is counted (then re-synced).
        assert r1.metrics()["presence_backplane_dropped_total"] >= 1
    late = await join(r2)
    assert {m["id"] for m in late.welcome["members"]} == {a.id, b.id, local.id}
    redis_again.stop()


async def test_unreachable_redis_is_logged_at_once_and_shown(
    server_factory: ServerFactory,
) -> None:
    # Nothing listens on port 1.
    server = server_factory("--redis-url", "redis://:s3cret@127.0.0.1:1/0", ready=False)
    masked = "redis://***@127.0.0.1:1/0"
    started = time.monotonic()
    while not logged(server, "redis unavailable") and time.monotonic() - started < 5:
        await asyncio.sleep(0.05)
    [warning] = logged(server, "redis unavailable")
    assert warning["level"] == "warning" and warning["url"] == masked
    assert warning["error"].startswith("ConnectionError")
    assert masked in warning["msg"] and warning["error"] in warning["msg"]  # text logs too
    ready = httpx.get(server.http + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    redis = ready.json()["redis"]
    assert (redis["state"], redis["url"], redis["error"]) == ("down", masked, warning["error"])
    # Seconds in this state: the outage goes on, so it grows with the time between reads.
    await asyncio.sleep(0.5)
    later = httpx.get(server.http + "/readyz").json()["redis"]
    assert later["state"] == "down"
    assert 0.3 <= later["since"] - redis["since"] <= 2.0
    assert server.metrics()["presence_backplane_up"] == 0
    # Retries are not logged one by one: the outage is reported again once the fast
    # retries are over (the backoff reaches 5 s after 0.1 + 0.2 + ... + 3.2 s).
    while not logged(server, "redis still unavailable") and time.monotonic() - started < 15:
        await asyncio.sleep(0.1)
    assert len(logged(server, "redis still unavailable")) == 1
    assert len(logged(server, "redis unavailable")) == 1
    assert server.metrics()["presence_backplane_connect_failures_total"] >= 6
    assert "s3cret" not in server.output()


async def test_redis_unavailable_at_start_up(server_factory: ServerFactory) -> None:
    redis_later = RedisProcess()
    r1 = server_factory(
        *FAST, "--redis-url", redis_later.url, "--replica-timeout", "2", ready=False
    )
    async with httpx.AsyncClient() as http:
        ready = await http.get(r1.http + "/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        # Local members are served anyway.
        a = await join(r1)
        redis_later.start()
        try:
            for _ in range(100):
                if (await http.get(r1.http + "/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get(r1.http + "/readyz")).status_code == 200
            r2 = server_factory(*FAST, "--redis-url", redis_later.url)
            await published(redis_later)
            b = await join(r2)
            assert [m["id"] for m in b.welcome["members"]] == [a.id]
        finally:
            redis_later.stop()


async def test_sharded_pubsub(server_factory: ServerFactory, redis_server: RedisProcess) -> None:
    r1, r2 = replicas(server_factory, redis_server.url, 2, "--redis-sharded")
    a = await join(r1)
    await published(redis_server)
    b = await join(r2)
    assert [m["id"] for m in b.welcome["members"]] == [a.id]
    await b.update(cursor={"x": 3, "y": 4})
    await a.until(sees(a, b, cursor={"x": 3, "y": 4}))
    with redis_server.client() as client:
        assert client.execute_command("PUBSUB", "SHARDCHANNELS", "presence:{doc}") == [
            b"presence:{doc}"
        ]
        assert client.pubsub_channels("presence:{doc}") == []
    await a.close()
    await b.until(lambda m: a.id not in b.members)


async def test_redis_password_in_the_url(server_factory: ServerFactory) -> None:
    secured = RedisProcess("--requirepass", "s3cret").start()
    try:
        r1, r2 = replicas(server_factory, secured.url)
        a = await join(r1)
        await published(secured)
        b = await join(r2)
        assert [m["id"] for m in b.welcome["members"]] == [a.id]
        wrong = server_factory(
            "--redis-url", f"redis://:wrong@127.0.0.1:{secured.port}", ready=False
        )
        assert httpx.get(wrong.http + "/readyz").status_code == 503
    finally:
        secured.stop()


def test_several_workers_need_redis() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "presence", "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--redis-url" in result.stderr and "Traceback" not in result.stderr


async def test_workers_without_a_secret_warn_once(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    server = server_factory(
        "--redis-url", redis_server.url, "--workers", "2", env={"PRESENCE_SECRET": ""}
    )
    with redis_server.client() as client:  # both workers are up once both heartbeat
        for _ in range(100):
            if len(client.keys("presence:replica:*")) == 2:
                break
            await asyncio.sleep(0.1)
    assert len(logged(server, "PRESENCE_SECRET is not set")) == 1


async def test_workers_share_presence_through_redis(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    server = server_factory(*FAST, "--redis-url", redis_server.url, "--workers", "2")
    clients = [await join(server) for _ in range(6)]
    # Whichever worker took each connection, everyone sees everyone.
    for c in clients:
        await c.until(lambda m, c=c: len(c.members) == 5, timeout=5)
    # Each worker is a replica of its own.
    with redis_server.client() as client:
        for _ in range(50):
            if len(client.keys("presence:replica:*")) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(client.keys("presence:replica:*")) == 2


async def test_redis_cluster_with_sharded_pubsub(server_factory: ServerFactory) -> None:
    cluster = RedisCluster().start()
    try:
        # Each replica is pointed at a different node; they find the rest.
        r1 = server_factory(*FAST, "--redis-url", cluster.nodes[0].url, "--redis-cluster")
        r2 = server_factory(*FAST, "--redis-url", cluster.nodes[1].url, "--redis-cluster")
        r3 = server_factory(*FAST, "--redis-url", cluster.nodes[2].url, "--redis-cluster")
        rooms = ["doc", "notebook", "whiteboard", "json:notebook:42"]  # spread over slots
        for room in rooms:
            a = await join(r1, room=room)
            b = await join(r2, room=room)
            await a.update(cursor={"x": 1, "y": 2})
            await b.until(sees(b, a, cursor={"x": 1, "y": 2}))
            await b.update(cursor={"x": 3, "y": 4})
            await a.until(sees(a, b, cursor={"x": 3, "y": 4}))
            # A replica that opens the room reads the members hash from the owning node.
            late = await join(r3, room=room)
            assert {m["id"] for m in late.welcome["members"]} == {a.id, b.id}
        # Each room's channel is subscribed on the node that owns its slot, and only there.
        owners = set()
        for room in rooms:
            channel = f"presence:{{{room}}}"
            holders = []
            for node in cluster.nodes:
                with node.client() as client:
                    if client.execute_command("PUBSUB", "SHARDCHANNELS", channel):
                        holders.append(node.port)
            assert len(holders) == 1, (room, holders)
            owners.add(holders[0])
        assert len(owners) > 1, "the test rooms should span several shards"
        await b.close()
        await a.until(lambda m: b.id not in a.members)
    finally:
        cluster.stop()


async def test_redis_over_tls(server_factory: ServerFactory) -> None:
    secured = RedisProcess(tls=True).start()
    try:
        assert secured.url.startswith("rediss://")
        r1, r2 = replicas(server_factory, secured.url)
        a = await join(r1)
        await published(secured)
        b = await join(r2)
        assert [m["id"] for m in b.welcome["members"]] == [a.id]
        await a.update(cursor={"x": 1, "y": 1})
        await b.until(sees(b, a, cursor={"x": 1, "y": 1}))
    finally:
        secured.stop()
