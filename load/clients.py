"""Load clients: members that move their cursor on an open-loop schedule and record what
they see of the others. One worker process runs many clients (``run_worker``)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from load.hist import Histogram
from presence.yjs import codec as yjs


@dataclass
class Plan:
    urls: list[str]  # one per client: replica and room chosen by the caller
    hz: float
    warmup: float
    duration: float
    protocol: str  # "json" or "yjs"
    start_at: float  # wall-clock time at which every client starts moving


@dataclass
class Tally:
    sent: int = 0
    latency: Histogram = field(default_factory=Histogram)
    received: int = 0  # peer updates observed (measurement window)
    # receiver -> sender -> highest sequence number seen
    highest: dict[str, dict[str, int]] = field(default_factory=dict)
    sent_by: dict[str, int] = field(default_factory=dict)  # sender -> updates sent
    first_by: dict[str, int] = field(default_factory=dict)  # sender -> first measured seq
    errors: int = 0
    disconnects: int = 0
    joined: int = 0


class Member:
    def __init__(self, index: int, url: str, plan: Plan, tally: Tally) -> None:
        self.index = index
        self.url = url
        self.plan = plan
        self.tally = tally
        self.name = f"c{index}"
        self.highest = tally.highest.setdefault(self.name, {})

    async def run(self) -> None:
        try:
            async with websockets.connect(
                self.url, max_size=2**22, open_timeout=30, ping_interval=None
            ) as ws:
                if self.plan.protocol == "yjs":
                    await ws.send(yjs.awareness_message([]))  # like a provider's hello
                self.tally.joined += 1
                reader = asyncio.create_task(self._read(ws))
                try:
                    await self._send(ws)
                    await asyncio.sleep(1.0)  # let the last updates arrive
                finally:
                    reader.cancel()
        except (OSError, websockets.WebSocketException, TimeoutError):
            self.tally.errors += 1

    async def _send(self, ws: websockets.ClientConnection) -> None:
        plan = self.plan
        period = 1 / plan.hz
        start = plan.start_at + random.random() * period  # spread the phases
        end = plan.start_at + plan.warmup + plan.duration
        measure_from = plan.start_at + plan.warmup
        seq = 0
        clock = 0
        while True:
            intended = start + seq * period
            if intended >= end:
                break
            delay = intended - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Open loop: the timestamp is when the update *should* have gone out, so a
            # stalled sender shows up as latency, not as a lower rate.
            state = {
                "cursor": {"x": seq % 800, "y": self.index % 500},
                "t": intended,
                "s": seq,
                "n": self.name,
            }
            if plan.protocol == "json":
                await ws.send(orjson.dumps({"type": "update", "state": state}).decode())
            else:
                clock += 1
                body = orjson.dumps(state)
                await ws.send(yjs.awareness_message([yjs.entry(self.index + 1, clock, body)]))
            if intended >= measure_from:
                self.tally.sent += 1
                self.tally.sent_by[self.name] = self.tally.sent_by.get(self.name, 0) + 1
                self.tally.first_by.setdefault(self.name, seq)
            seq += 1

    async def _read(self, ws: websockets.ClientConnection) -> None:
        try:
            async for message in ws:
                now = time.time()
                for state in self._states(message):
                    sender = state.get("n")
                    if not isinstance(sender, str) or sender == self.name:
                        continue
                    seq = state.get("s")
                    if isinstance(seq, int) and seq > self.highest.get(sender, -1):
                        self.highest[sender] = seq
                    t = state.get("t")
                    if isinstance(t, float) and t >= self.plan.start_at + self.plan.warmup:
                        self.tally.received += 1
                        self.tally.latency.record(now - t)
        except websockets.ConnectionClosed:
            self.tally.disconnects += 1

    def _states(self, message: Any) -> list[dict[str, Any]]:
        if self.plan.protocol == "json":
            frame = orjson.loads(message)
            if frame["type"] == "update":
                return [u["state"] for u in frame["updates"]]
            if frame["type"] == "join":
                return [m["state"] for m in frame["members"]]
            return []
        kind, reader = yjs.read_message(message)
        if kind != yjs.AWARENESS:
            return []
        states = []
        for entry in yjs.read_awareness(reader):
            state = orjson.loads(entry.state)
            if isinstance(state, dict):
                states.append(state)
        return states


def run_worker(indices: list[int], plan: Plan) -> dict[str, Any]:
    """Entry point of a worker process: clients ``indices`` (one URL each, in ``plan``).
    Returns a picklable summary."""

    async def go() -> Tally:
        tally = Tally()
        members = [Member(i, url, plan, tally) for i, url in zip(indices, plan.urls, strict=True)]
        await asyncio.gather(*(m.run() for m in members))
        return tally

    tally = asyncio.run(go())
    return {
        "sent": tally.sent,
        "received": tally.received,
        "errors": tally.errors,
        "disconnects": tally.disconnects,
        "joined": tally.joined,
        "latency": tally.latency.to_json(),
        "highest": tally.highest,
        "sent_by": tally.sent_by,
        "first_by": tally.first_by,
    }


async def _idle(urls: list[str], hold: float) -> dict[str, Any]:
    """Open connections that do nothing but stay, for the memory measurement."""
    opened: list[websockets.ClientConnection] = []
    errors = 0
    for url in urls:
        try:
            ws = await websockets.connect(url, open_timeout=30, ping_interval=None)
            if "/yjs/" in url:  # a Yjs client is a member once it has a state
                entry = yjs.entry(random.getrandbits(31) | 1, 1, b'{"cursor":null}')
                await ws.send(yjs.awareness_message([entry]))
            await ws.recv()  # the welcome (JSON), the room's states (Yjs): the member is in
            opened.append(ws)
        except (OSError, websockets.WebSocketException, TimeoutError):
            errors += 1
    await asyncio.sleep(hold)
    for ws in opened:
        await ws.close()
    return {"joined": len(opened), "errors": errors}


def run_idle_worker(urls: list[str], hold: float) -> dict[str, Any]:
    return asyncio.run(_idle(urls, hold))


async def _churn(base: str, rooms: int, rate: float, duration: float) -> dict[str, Any]:
    """Join and leave at ``rate`` per second: each visitor joins, moves once, leaves."""
    done = errors = 0

    async def visit(i: int) -> None:
        nonlocal done, errors
        try:
            async with websockets.connect(
                f"{base}/rooms/churn-{i % rooms}", open_timeout=30, ping_interval=None
            ) as ws:
                await ws.recv()
                await ws.send('{"type":"update","state":{"cursor":{"x":1,"y":1}}}')
            done += 1
        except (OSError, websockets.WebSocketException, TimeoutError):
            errors += 1

    tasks = []
    start = time.monotonic()
    i = 0
    while (now := time.monotonic()) - start < duration:
        tasks.append(asyncio.create_task(visit(i)))
        i += 1
        await asyncio.sleep(max(0.0, start + i / rate - now))
    await asyncio.gather(*tasks)
    return {"visits": done, "errors": errors}


def run_churn_worker(base: str, rooms: int, rate: float, duration: float) -> dict[str, Any]:
    return asyncio.run(_churn(base, rooms, rate, duration))
