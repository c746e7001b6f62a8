"""The outgoing side of one connection, with a sink we control."""

import orjson
import pytest

from presence.codecs.json import ENCODER, encode_batch
from presence.core.events import Batch, Updated
from presence.hub.outbox import Outbox
from presence.metrics import Metrics

pytestmark = pytest.mark.unit


class Peer:
    """A socket whose send buffer is full while ``writable`` is false."""

    def __init__(self, *, writable: bool = True) -> None:
        self.frames: list[str] = []
        self.writable = writable
        self.closed: tuple[int, str] | None = None

    def send(self, frames: list[str]) -> None:
        assert self.writable, "sent to a socket whose buffer is full"
        self.frames.extend(frames)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def batch_of(**patches: dict[str, object]) -> Batch:
    batch = Batch()
    for member, patch in patches.items():
        batch.add(Updated(member, patch))
    return batch


def outbox_for(peer: Peer, metrics: Metrics, now: float = 0.0) -> Outbox[str]:
    return Outbox(peer, ENCODER, max_backlog=4, clock=lambda: now, metrics=metrics)


def test_fast_connection_gets_the_shared_frames_at_once() -> None:
    peer, metrics = Peer(), Metrics()
    outbox = outbox_for(peer, metrics)
    outbox.push_batch(batch_of(a={"x": 1}), ["shared-frame"])
    assert peer.frames == ["shared-frame"]
    assert metrics.messages_out == 1
    assert len(outbox) == 0 and outbox.blocked_since is None


def test_a_stalled_connection_coalesces_its_backlog() -> None:
    peer, metrics = Peer(writable=False), Metrics()
    outbox = outbox_for(peer, metrics, now=7.0)
    outbox.push(["welcome"])
    for i in range(1000):
        batch = batch_of(a={"x": i}, b={"y": i} if i % 2 else {"z": i})
        outbox.push_batch(batch, encode_batch(batch))
        assert len(outbox) <= 5  # bounded, however long the stall
    assert metrics.updates_coalesced > 1900
    assert outbox.blocked_since == 7.0
    peer.writable = True
    outbox.resume()
    assert outbox.blocked_since is None
    assert peer.frames[0] == "welcome"
    # Latest state per member wins; every field that was touched is there.
    seen: dict[str, dict[str, object]] = {}
    for frame in peer.frames[1:]:
        for update in orjson.loads(frame)["updates"]:
            seen.setdefault(update["id"], {}).update(update["state"])
    assert seen == {"a": {"x": 999}, "b": {"y": 999, "z": 998}}
    assert len(peer.frames) < 10


def test_resume_stops_when_the_socket_fills_again() -> None:
    class Small(Peer):
        def send(self, frames: list[str]) -> None:
            super().send(frames)
            self.writable = False  # each write fills the buffer

    peer = Small(writable=False)
    outbox = outbox_for(peer, Metrics())
    outbox.push(["one"])
    outbox.push(["two"])
    peer.writable = True
    outbox.resume()
    assert peer.frames == ["one"] and len(outbox) == 1 and outbox.blocked_since is not None
    peer.writable = True
    outbox.resume()
    assert peer.frames == ["one", "two"] and outbox.blocked_since is None


def test_abort_drops_what_waits_and_closes() -> None:
    peer = Peer(writable=False)
    outbox = outbox_for(peer, Metrics())
    outbox.push(["stuck"])
    outbox.abort(1013, "too slow")
    assert peer.closed == (1013, "too slow")
    assert len(outbox) == 0
    peer.writable = True
    outbox.push(["ignored after close"])
    outbox.resume()
    assert peer.frames == []
