"""``python -m load faults``: what members see while replicas and Redis fail under load.

Two replicas on one Redis, rooms with members on both, every member moving its cursor.
Faults, one after the other, each followed by a check that everyone sees everyone again:

- ``stall``: one replica stopped (SIGSTOP) past ``--replica-timeout``, then resumed;
- ``redis-restart``: Redis killed (SIGKILL) and started again on its port;
- ``redis-freeze``: Redis stopped (SIGSTOP), then resumed;
- ``kill``: one replica killed (SIGKILL) for good.

For each: when the other replica's members stopped seeing the faulty side's members (or
its updates), when they saw them again, whether ``/readyz`` noticed, and how many updates
from the faulty side reached the other side afterwards. Times are seconds from the fault.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import websockets

from harness.processes import SECRET as LOAD_SECRET
from harness.processes import RedisProcess, Server

ROOMS = 4
MEMBERS = 10  # per room, alternating between the two replicas
HZ = 5
TIMEOUT = 5.0  # --replica-timeout of the replicas


@dataclass
class Viewer:
    """A member that moves and records who it sees, and when it last heard each one."""

    replica: int
    room: str
    id: str = ""
    sees: set[str] = field(default_factory=set)
    heard: dict[str, float] = field(default_factory=dict)  # member id -> last update seen
    updates: int = 0  # updates seen from members of the other replica
    ws: Any = None


async def member(url: str, viewer: Viewer, others: dict[str, int], stop: asyncio.Event) -> None:
    """Stay in the room (reconnecting after a close) until ``stop``."""
    while not stop.is_set():
        try:
            async with websockets.connect(url, open_timeout=5) as ws:
                viewer.ws = ws
                welcome = orjson.loads(await ws.recv())
                viewer.id = welcome["you"]["id"]
                others[viewer.id] = viewer.replica
                viewer.sees = {m["id"] for m in welcome["members"]}
                mover = asyncio.create_task(move(ws, stop))
                try:
                    async for raw in ws:
                        see(viewer, orjson.loads(raw), others)
                finally:
                    mover.cancel()
        except (OSError, websockets.WebSocketException, TimeoutError):
            await asyncio.sleep(0.2)


async def move(ws: Any, stop: asyncio.Event) -> None:
    x = 0
    await asyncio.sleep(random.random() / HZ)
    while not stop.is_set():
        x += 1
        await ws.send(orjson.dumps({"type": "update", "state": {"cursor": {"x": x}}}).decode())
        await asyncio.sleep(1 / HZ)


def see(viewer: Viewer, message: dict[str, Any], others: dict[str, int]) -> None:
    kind = message["type"]
    now = time.monotonic()
    if kind == "join":
        viewer.sees |= {m["id"] for m in message["members"]} - {viewer.id}
    elif kind == "leave":
        viewer.sees -= set(message["ids"])
    elif kind == "update":
        for u in message["updates"]:
            viewer.heard[u["id"]] = now
            if others.get(u["id"], viewer.replica) != viewer.replica:
                viewer.updates += 1


class Run:
    def __init__(self) -> None:
        self.redis = RedisProcess().start()
        args = ["--log-level", "warning", "--replica-timeout", str(TIMEOUT)]
        args += ["--redis-url", self.redis.url, "--expire-after", "60"]
        self.replicas = [Server(args, {"PRESENCE_SECRET": LOAD_SECRET}).start() for _ in range(2)]
        self.viewers = [
            Viewer(replica=i % 2, room=f"faults-{i // MEMBERS}") for i in range(ROOMS * MEMBERS)
        ]
        self.ids: dict[str, int] = {}  # member id -> replica

    def room_ids(self, viewer: Viewer, replica: int | None = None) -> set[str]:
        return {
            v.id
            for v in self.viewers
            if v.room == viewer.room
            and v is not viewer
            and v.id
            and (replica is None or v.replica == replica)
        }

    def whole(self) -> bool:
        """Everyone sees exactly the other members of their room."""
        return all(v.sees == self.room_ids(v) for v in self.viewers)

    def lost(self, faulty: int) -> bool:
        """Every member of the healthy replica stopped seeing the faulty one's members."""
        return all(
            not (v.sees & self.room_ids(v, faulty)) for v in self.viewers if v.replica != faulty
        )

    def heard_from(self, faulty: int, since: float) -> bool:
        """Every member of the healthy replica had an update from the faulty side."""
        return all(
            any(v.heard.get(i, 0) > since for i in self.room_ids(v, faulty))
            for v in self.viewers
            if v.replica != faulty
        )

    def updates_across(self, faulty: int) -> int:
        return sum(v.updates for v in self.viewers if v.replica != faulty)

    def ready(self, replica: int) -> bool:
        try:
            r = httpx.get(self.replicas[replica].http + "/readyz", timeout=0.5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200


async def until(check: Any, timeout: float, started: float) -> float | None:
    """Seconds from ``started`` until ``check()`` holds, or None within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.02)
    return None


async def watch_ready(run: Run, replica: int, started: float, seconds: float) -> float | None:
    """When /readyz of ``replica`` first said not ready within ``seconds``, if it did."""
    deadline = started + seconds
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(run.ready, replica):
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.2)
    return None


async def stall(run: Run, seconds: float) -> dict[str, Any]:
    pid = run.replicas[1].proc.pid  # type: ignore[union-attr]
    before = run.updates_across(1)
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    lost = await until(lambda: run.lost(1), seconds, started)
    await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
    os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    back = await until(run.whole, 30, resumed)
    relayed = await until(lambda: run.heard_from(1, resumed), 30, resumed)
    await asyncio.sleep(3)
    return {
        "stopped_s": seconds,
        "members_left_after_s": lost,
        "everyone_again_after_resume_s": back,
        "updates_flow_again_after_resume_s": relayed,
        "updates_relayed_3s_after": run.updates_across(1) - before,
    }


async def redis_outage(run: Run, *, freeze: float | None) -> dict[str, Any]:
    started = time.monotonic()
    if freeze is None:
        run.redis.stop(signal.SIGKILL)
        not_ready = await watch_ready(run, 0, started, 2)
        await asyncio.sleep(max(0.0, started + 2 - time.monotonic()))
        run.redis.start()
    else:
        assert run.redis.proc is not None
        os.kill(run.redis.proc.pid, signal.SIGSTOP)
        not_ready = await watch_ready(run, 0, started, freeze)
        await asyncio.sleep(max(0.0, started + freeze - time.monotonic()))
        os.kill(run.redis.proc.pid, signal.SIGCONT)
    back = time.monotonic()
    return {
        "outage_s": round(back - started, 3),
        "not_ready_after_s": not_ready,
        "ready_again_after_s": await until(lambda: run.ready(0) and run.ready(1), 30, back),
        "updates_flow_again_after_s": await until(lambda: run.heard_from(1, back), 30, back),
        "everyone_again_after_s": await until(run.whole, 30, back),
    }


async def kill(run: Run) -> dict[str, Any]:
    started = time.monotonic()
    run.replicas[1].stop(signal.SIGKILL)
    return {"members_left_after_s": await until(lambda: run.lost(1), 30, started)}


async def scenario(stall_seconds: float, freeze_seconds: float) -> dict[str, Any]:
    run = Run()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            member(f"{run.replicas[v.replica].ws}/rooms/{v.room}", v, run.ids, stop)
        )
        for v in run.viewers
    ]
    try:
        settled = await until(run.whole, 20, time.monotonic())
        if settled is None:
            raise RuntimeError("the members never all saw each other before the faults")
        await asyncio.sleep(2)
        result: dict[str, Any] = {
            "scenario": "faults",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "members": len(run.viewers),
            "rooms": ROOMS,
            "hz": HZ,
            "replica_timeout_s": TIMEOUT,
        }
        result["stall"] = await stall(run, stall_seconds)
        result["redis_restart"] = await redis_outage(run, freeze=None)
        result["redis_freeze"] = await redis_outage(run, freeze=freeze_seconds)
        # A replica's own members reconnect elsewhere only if the load balancer sends
        # them; here they retry the dead replica, so its members must simply leave.
        result["kill"] = await kill(run)
        return result
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in run.replicas:
            r.stop(signal.SIGKILL)
        run.redis.stop()


def run_faults(stall_seconds: float = 10, freeze_seconds: float = 12) -> dict[str, Any]:
    return asyncio.run(scenario(stall_seconds, freeze_seconds))
