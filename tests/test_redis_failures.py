"""Replicas on a real Redis when something goes wrong: a replica or Redis frozen (SIGSTOP),
Redis refusing writes (maxmemory with noeviction), connections killed by Redis again and
again (CLIENT KILL), a database other than 0. Each test
starts its own Redis and server processes, waits on conditions (never fixed sleeps
before an assertion) and prints what it measured."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import redis

from harness.processes import RedisProcess
from tests.conftest import FAST, Client, Server
from tests.test_json_protocol import join
from tests.test_replicas import logged, replicas, sees

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def ready(server: Server) -> bool:
    async with httpx.AsyncClient() as http:
        return (await http.get(server.http + "/readyz", timeout=2)).status_code == 200


async def settled(client: Client, check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds on what ``client`` was told."""
    started = time.monotonic()
    try:
        await client.until(lambda _: check(), timeout=timeout)
    except TimeoutError:
        if not check():
            raise AssertionError(f"{what}: not within {timeout:g} s") from None
    return time.monotonic() - started


def freeze(server: Server | RedisProcess) -> int:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    return server.proc.pid


async def test_a_replica_stalled_past_the_timeout_is_whole_again_within_a_second(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2, r3 = replicas(server_factory, redis_server.url, 3)
    a, b, c = await join(r1), await join(r2), await join(r3)
    for x, others in ((a, (b, c)), (b, (a, c)), (c, (a, b))):
        for y in others:
            await x.until(sees(x, y), timeout=5)
    pid = freeze(r2)  # longer than --replica-timeout (2 s): the others give up on it
    try:
        gone = await settled(a, lambda: b.id not in a.members, 5, "b dropped")
        await settled(c, lambda: b.id not in c.members, 5, "b dropped on r3")
        await asyncio.sleep(2.0)  # stays stopped well past the timeout
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    await settled(a, lambda: b.id in a.members, 5, "b back on r1")
    await settled(c, lambda: b.id in c.members, 5, "b back on r3")
    await settled(b, lambda: {a.id, c.id} <= b.members.keys(), 5, "r2 sees everyone")
    whole = time.monotonic() - resumed
    # And it keeps relaying: every later update of b reaches a.
    for i in range(20):
        await b.update(cursor={"x": i})
    await a.until(sees(a, b, cursor={"x": 19}), timeout=5)
    print(f"\nb dropped {gone:.2f} s after SIGSTOP; everyone whole {whole:.2f} s after SIGCONT")
    assert whole <= 1.0
    assert r1.metrics()["presence_backplane_replicas_down_total"] == 1
    assert r1.metrics()["presence_backplane_replicas"] == 2
    assert r2.metrics()["presence_backplane_stalls_total"] == 1  # it noticed, re-announced
    assert r2.metrics()["presence_backplane_replicas_down_total"] == 0


async def test_members_hash_and_snapshots_use_the_urls_database(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    url = redis_server.url + "/3"
    r1, r2 = replicas(server_factory, url)
    a = await join(r1)
    with redis.Redis.from_url(url) as db3, redis.Redis.from_url(redis_server.url) as db0:
        waited = 0.0
        while db3.hlen("presence:{doc}:members") < 1 and waited < 5:
            await asyncio.sleep(0.05)
            waited += 0.05
        assert db3.hlen("presence:{doc}:members") == 1
        assert db0.keys("presence:*") == []
    b = await join(r2)  # r2's snapshot is read from db 3
    assert [m["id"] for m in b.welcome["members"]] == [a.id]
    r3 = server_factory(*FAST, "--redis-url", url)  # no member there: read-only views
    async with httpx.AsyncClient() as http:
        members = (await http.get(f"{r3.http}/rooms/doc")).json()["members"]
        assert {m["id"] for m in members} == {a.id, b.id}


async def test_a_frozen_redis_makes_replicas_unready_and_they_recover_on_thaw(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = replicas(server_factory, redis_server.url)
    a, b = await join(r1), await join(r2)
    await a.until(sees(a, b))
    pid = freeze(redis_server)
    try:

        async def unready() -> bool:
            return not await ready(r1) and not await ready(r2)

        detected = await poll(unready, 10, "/readyz 503 with Redis frozen")
        async with httpx.AsyncClient() as http:
            body = (await http.get(r1.http + "/readyz")).json()
        assert body["redis"]["state"] == "down" and "Timeout" in body["redis"]["error"]
        # Local members are served meanwhile.
        await a.update(cursor={"x": 1})
        await asyncio.sleep(max(0.0, 4.0 - detected))  # frozen longer than the timeout
    finally:
        os.kill(pid, signal.SIGCONT)
    thawed = time.monotonic()
    await b.until(sees(b, a, cursor={"x": 1}), timeout=5)
    relayed = time.monotonic() - thawed

    async def both_ready() -> bool:
        return await ready(r1) and await ready(r2)

    back = await poll(both_ready, 5, "/readyz 200 after thaw")
    await b.update(cursor={"x": 2})
    await a.until(sees(a, b, cursor={"x": 2}), timeout=5)
    assert a.id in b.members and b.id in a.members  # nobody was taken for dead
    print(
        f"\n/readyz 503 {detected:.2f} s after Redis froze; relay back {relayed:.2f} s and "
        f"/readyz 200 {relayed + back:.2f} s after thaw"
    )
    warnings = [e for e in logged(r1, "redis") if e["level"] == "warning"]
    assert warnings, "the stall was not logged at warning level"


async def test_redis_refusing_writes_is_not_ready_and_crashes_are_still_detected(
    server_factory: ServerFactory,
) -> None:
    full = RedisProcess("--maxmemory-policy", "noeviction").start()
    try:
        r1, r2 = replicas(server_factory, full.url)
        a, ghost = await join(r1), await join(r2)
        await a.until(sees(a, ghost))
        with full.client() as client:
            # Full: memory in use above maxmemory, nothing to evict. Writes are refused
            # (OOM), PUBLISH still works.
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used // 2)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set("one-more", "x")
            filled = time.monotonic()

            async def refused() -> bool:
                return not await ready(r1)

            unready = await poll(refused, 5, "/readyz 503 while Redis refuses writes")
            async with httpx.AsyncClient() as http:
                body = (await http.get(r1.http + "/readyz")).json()
            assert "OOM" in (body["redis"]["error"] or ""), body
            assert body["redis"]["writable"] is False
            warned = [e for e in logged(r1) if e["level"] == "warning" and "OOM" in e["msg"]]
            assert len(warned) == 1, "refused writes are logged once, at warning level"
            # Members come and go meanwhile: the replicas still tell each other.
            late = await join(r2)
            await a.until(sees(a, late))
            await a.send({"type": "heartbeat"})  # a is not expired meanwhile (FAST: 6 s)
            killed = time.monotonic()
            r2.stop(signal.SIGKILL)
            gone = {ghost.id, late.id}
            await settled(a, lambda: not gone & a.members.keys(), 5, "killed replica removed")
            removed = time.monotonic() - killed
            assert r1.metrics()["presence_backplane_up"] == 0
            client.config_set("maxmemory", 0)  # room again

            async def writable() -> bool:
                return await ready(r1)

            back = await poll(writable, 5, "/readyz 200 once Redis accepts writes")
        print(
            f"\n/readyz 503 {unready:.2f} s after Redis filled up; SIGKILLed replica removed "
            f"{removed:.2f} s after the kill; ready {back:.2f} s after memory was freed "
            f"({time.monotonic() - filled:.1f} s full)"
        )
        assert removed <= 2.0  # --replica-timeout
        newcomer = await join(r1)
        assert [m["id"] for m in newcomer.welcome["members"]] == [a.id]
    finally:
        full.stop()


ROUNDS = 50


def uses_uvloop(server: Server) -> bool:
    """Whether the server process has uvloop loaded (Linux: its memory map)."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/maps") as maps:
        return "uvloop" in maps.read()


async def test_connections_killed_again_and_again_under_uvloop(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    # Under uvloop (what `presence serve` runs on), a connection Redis closes is closed
    # at once but reported a loop turn later: a write in between raised RuntimeError,
    # which once killed the writer for good (nothing published, /readyz still 200).
    r1, r2 = replicas(server_factory, redis_server.url, 2, "--flush-interval", "0.001")
    if sys.platform == "linux":
        assert all(uses_uvloop(r) for r in (r1, r2)), "presence serve runs on uvloop"
    a, b = await join(r1), await join(r2)
    await a.until(sees(a, b))
    await b.until(sees(b, a))
    movers = [await join(r, room=f"busy-{i}") for r in (r1, r2) for i in range(3)]
    moving = True

    async def move(client: Client) -> None:
        i = 0
        while moving:  # updates every millisecond: writes are queued at any moment
            i += 1
            await client.update(cursor={"x": i})
            await asyncio.sleep(0.001)

    async def drain(client: Client) -> None:
        while True:
            await client.recv(timeout=30)

    tasks = [asyncio.create_task(f(c)) for f in (move, drain) for c in (a, b, *movers)]
    kills = 0
    with redis_server.client() as client:
        for _ in range(ROUNDS):
            await asyncio.sleep(0.1)
            kills += client.client_kill_filter(_type="normal")
            kills += client.client_kill_filter(_type="pubsub")
    moving = False
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopped = time.monotonic()

    async def both_ready() -> bool:
        return await ready(r1) and await ready(r2)

    await poll(both_ready, 10, "/readyz 200 after the kills")
    # Relay works both ways, and members are visible across replicas.
    await a.update(cursor={"x": -1})
    await b.until(sees(b, a, cursor={"x": -1}), timeout=10)
    await b.update(cursor={"x": -2})
    await a.until(sees(a, b, cursor={"x": -2}), timeout=10)
    recovered = time.monotonic() - stopped
    late = await join(r2)
    assert {m["id"] for m in late.welcome["members"]} == {a.id, b.id}
    await a.until(sees(a, late), timeout=10)
    for r in (r1, r2):
        assert r.metrics()["presence_backplane_replicas"] == 1  # heartbeats flow
        errors = [e for e in logged(r) if e["level"] in ("error", "critical")]
        assert not errors, "\n".join(map(str, errors))
    print(
        f"\n{kills} connections killed in {ROUNDS} rounds; relay and /readyz back "
        f"{recovered:.2f} s after"
    )
