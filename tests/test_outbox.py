"""The send queue of one connection, with a send we control."""

import asyncio

import orjson

from presence.codecs.json import ENCODER, encode_batch
from presence.core.events import Batch, Updated
from presence.server.metrics import Metrics
from presence.server.outbox import Outbox


class Peer:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.gate = asyncio.Event()
        self.closed: tuple[int, str] | None = None

    async def send(self, frame: str) -> None:
        await self.gate.wait()
        self.frames.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def batch_of(**patches: dict[str, object]) -> Batch:
    batch = Batch()
    for member, patch in patches.items():
        batch.add(Updated(member, patch))
    return batch


async def test_fast_connection_gets_the_shared_frames() -> None:
    peer, metrics = Peer(), Metrics()
    peer.gate.set()
    outbox = Outbox(
        peer.send, peer.close, ENCODER, max_backlog=4, clock=lambda: 0.0, metrics=metrics
    )
    task = asyncio.create_task(outbox.run())
    outbox.push_batch(batch_of(a={"x": 1}), ["shared-frame"])
    await asyncio.sleep(0.01)
    assert peer.frames == ["shared-frame"]
    assert metrics.messages_out == 1
    outbox.close()
    await task


async def test_a_stalled_connection_coalesces_its_backlog() -> None:
    peer, metrics = Peer(), Metrics()
    outbox = Outbox(
        peer.send, peer.close, ENCODER, max_backlog=4, clock=lambda: 0.0, metrics=metrics
    )
    task = asyncio.create_task(outbox.run())
    outbox.push(["welcome"])
    await asyncio.sleep(0)  # the writer is now stuck sending "welcome"
    for i in range(1000):
        batch = batch_of(a={"x": i}, b={"y": i} if i % 2 else {"z": i})
        outbox.push_batch(batch, encode_batch(batch))
        assert len(outbox) <= 5  # bounded, however long the stall
    assert metrics.updates_coalesced > 1900
    peer.gate.set()
    await asyncio.sleep(0.01)
    assert peer.frames[0] == "welcome"
    # Latest state per member wins; every field that was touched is there.
    seen: dict[str, dict[str, object]] = {}
    for frame in peer.frames[1:]:
        for update in orjson.loads(frame)["updates"]:
            seen.setdefault(update["id"], {}).update(update["state"])
    assert seen == {"a": {"x": 999}, "b": {"y": 999, "z": 998}}
    assert len(peer.frames) < 10
    outbox.close()
    await task


async def test_abort_stops_a_stalled_send_and_closes() -> None:
    peer = Peer()
    outbox = Outbox(
        peer.send, peer.close, ENCODER, max_backlog=4, clock=lambda: 5.0, metrics=Metrics()
    )
    task = asyncio.create_task(outbox.run())
    outbox.push(["stuck"])
    await asyncio.sleep(0)
    assert outbox.sending_since == 5.0
    outbox.abort(1013, "too slow")
    await asyncio.wait_for(task, 1)
    assert peer.closed == (1013, "too slow")
    outbox.push(["ignored after close"])
    assert len(outbox) == 0
