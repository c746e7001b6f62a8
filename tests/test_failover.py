"""Redis Cluster failover: three primaries with a replica each; a primary is killed
(SIGKILL), its replica is promoted, and the presence replicas relay again, every member
intact. ``-s`` prints the measured bound."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from harness.processes import RedisCluster
from tests.conftest import FAST, Client, Server
from tests.test_json_protocol import join

pytestmark = pytest.mark.e2e

NODE_TIMEOUT = 2000  # ms a primary may be silent before its replica takes over
REPLICA_TIMEOUT = 5.0  # presence's default --replica-timeout
ROOMS = ["doc", "notebook", "whiteboard", "json:notebook:42", "slides", "board"]


async def relays(sender: Client, receiver: Client, deadline: float) -> float:
    """Seconds until an update of ``sender`` reaches ``receiver``, sending one every
    50 ms (some are lost while Redis fails over)."""
    started = time.monotonic()
    n = 0
    while time.monotonic() < deadline:
        n += 1
        await sender.update(cursor={"x": n, "y": 0})
        try:
            await receiver.until(
                lambda m, n=n: any(  # type: ignore[misc]
                    u["id"] == sender.id and u["state"].get("cursor", {}).get("x") == n
                    for u in m.get("updates", ())
                ),
                timeout=0.05,
            )
            return time.monotonic() - started
        except TimeoutError:
            continue
    raise AssertionError("updates never got through again")


async def test_a_primary_killed_fails_over_and_every_room_relays_again_intact(
    server_factory: Callable[..., Server],
) -> None:
    cluster = RedisCluster(replicas=1, node_timeout=NODE_TIMEOUT).start()
    try:
        args = (*FAST, "--expire-after", "60", "--redis-cluster")
        r1 = server_factory(*args, "--redis-url", cluster.nodes[0].url)
        r2 = server_factory(*args, "--redis-url", cluster.nodes[1].url)
        pairs = {room: (await join(r1, room=room), await join(r2, room=room)) for room in ROOMS}
        for a, b in pairs.values():
            await b.until(lambda m, a=a, b=b: a.id in b.members, timeout=5)
        # The primary that serves the first room goes; its replica takes its slots.
        victim = cluster.primary_of("presence:{doc}")
        survivor = next(n for n in cluster.nodes if n is not victim)
        served = {room: cluster.primary_of(f"presence:{{{room}}}", ask=survivor) for room in ROOMS}
        assert any(node is not victim for node in served.values()), "rooms span shards"
        killed = time.monotonic()
        victim.stop(signal.SIGKILL)
        deadline = killed + 60
        a, b = pairs["doc"]
        back_after = {}
        for room, (a, b) in pairs.items():
            await relays(a, b, deadline)
            back_after[room] = time.monotonic() - killed
        promoted = cluster.primary_of("presence:{doc}", ask=survivor)
        assert promoted is not victim
        # Both ways, and nobody lost or doubled on either replica: each side sees exactly
        # its room's other member, still there after a replica timeout.
        for a, b in pairs.values():
            await relays(b, a, deadline)
        await asyncio.sleep(REPLICA_TIMEOUT + 1)
        for room, (a, b) in pairs.items():
            assert set(a.members) == {b.id}, (room, a.members)
            assert set(b.members) == {a.id}, (room, b.members)
        worst = max(back_after.values())
        print(
            f"\nfailover: primary killed; every room relayed again within {worst:.2f} s "
            f"({back_after['doc']:.2f} s for a room of the killed primary; node timeout "
            f"{NODE_TIMEOUT / 1000:g} s)"
        )
        assert worst < NODE_TIMEOUT / 1000 + 10
    finally:
        cluster.stop()
