"""The hub in-process: two replicas on a shared memory bus, and the sweep driven by a
fake clock (no sleeping for idle, expiry or stalled sends, nor for a room's next tick:
:func:`settle` fires the hubs' flush timers)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from presence.backplane.memory import MemoryBackplane, MemoryBus
from presence.codecs.json import ENCODER
from presence.config import Settings
from presence.core.identity import Identity, IdentityFactory
from presence.endpoints.json import join
from presence.hub.hub import CLOSE_EXPIRED, Hub
from presence.hub.outbox import Outbox
from presence.metrics import watch_hub
from presence.yjs.view import YjsView
from tests.test_outbox import Peer

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_hub(name: str, bus: MemoryBus, clock: Clock) -> Hub:
    settings = Settings(idle_after=3, expire_after=30, slow_client_timeout=10, seed=1)
    return Hub(
        settings,
        identities=IdentityFactory(b"k", seed=hash(name) % 100),
        backplane=MemoryBackplane(name, bus),
        clock=clock,
    )


def outbox_for(hub: Hub, peer: Peer) -> Outbox[str]:
    return Outbox(peer, ENCODER, max_backlog=8, clock=hub.clock, metrics=hub.metrics)


def messages(peer: Peer) -> list[dict[str, object]]:
    return [orjson.loads(f) for f in peer.frames]


async def settle(*hubs: Hub) -> None:
    """Let what is ready run (the bus delivers on the next loop turn), and flush the rooms
    of ``hubs`` that wait for their next tick now rather than sleeping until it."""
    for _ in range(10):
        await asyncio.sleep(0)
        for hub in hubs:
            for room, timer in list(hub._waiting.items()):
                timer.cancel()
                hub._flush_waiting(room, timer.when())


async def test_two_replicas_share_a_room_through_the_bus() -> None:
    bus, clock = MemoryBus(), Clock()
    a, b = make_hub("A", bus, clock), make_hub("B", bus, clock)
    await a.start()
    await b.start()
    pa, pb = Peer(), Peer()
    oa, ob = outbox_for(a, pa), outbox_for(b, pb)
    ma = await join(a, "doc", oa, None)
    await settle(a, b)
    mb = await join(b, "doc", ob, None)
    assert [m.id for m in mb.others] == [ma.member.id]  # B's snapshot has A's member
    a.update("doc", ma.member.id, {"cursor": {"x": 1}})
    await settle(a, b)
    updates = [m for m in messages(pb) if m["type"] == "update"]
    assert updates[-1]["updates"] == [{"id": ma.member.id, "state": {"cursor": {"x": 1}}}]
    # Replica A dies: B removes its member and tells its own connections.
    b.on_replica_down("A")
    await settle(a, b)
    assert {"type": "leave", "ids": [ma.member.id]} in messages(pb)
    await a.stop()
    await b.stop()


async def test_sweep_idles_expires_and_closes_by_the_clock() -> None:
    bus, clock = MemoryBus(), Clock()
    hub = make_hub("A", bus, clock)
    await hub.start()
    quiet, watcher = Peer(), Peer()
    oq, ow = outbox_for(hub, quiet), outbox_for(hub, watcher)
    mq = await join(hub, "doc", oq, None)
    mw = await join(hub, "doc", ow, None)
    await settle(hub)
    clock.now += 3
    hub.sweep()
    await settle(hub)
    assert {"type": "idle", "ids": [mq.member.id, mw.member.id]} in messages(watcher)
    clock.now += 20
    hub.heartbeat("doc", mw.member.id)
    clock.now += 10  # 33 s of silence for the quiet one, 10 s for the watcher
    hub.sweep()
    await settle(hub)
    assert {"type": "leave", "ids": [mq.member.id]} in messages(watcher)
    assert quiet.closed is not None and quiet.closed[0] == CLOSE_EXPIRED
    assert watcher.closed is None
    await hub.stop()


async def test_sweep_cuts_a_stalled_connection() -> None:
    bus, clock = MemoryBus(), Clock()
    hub = make_hub("A", bus, clock)
    await hub.start()
    stuck, fine = Peer(writable=False), Peer()  # stuck's client stopped reading
    os_, of = outbox_for(hub, stuck), outbox_for(hub, fine)
    ms = await join(hub, "doc", os_, None)
    await join(hub, "doc", of, None)  # a join for stuck: now something waits
    await settle(hub)
    assert os_.blocked_since is not None
    clock.now += 9
    hub.sweep()
    assert stuck.closed is None  # stalled, but not for long enough yet
    clock.now += 2
    hub.sweep()
    await settle(hub)
    assert stuck.closed is not None and stuck.closed[0] == 1013
    assert hub.metrics.slow_client_disconnects == 1
    assert {"type": "leave", "ids": [ms.member.id]} in messages(fine)
    await hub.stop()


async def test_the_tick_stretches_when_timers_run_late() -> None:
    hub = make_hub("A", MemoryBus(), Clock())
    base = hub.settings.flush_interval
    for _ in range(200):
        hub.observe_lag(0.0002)  # a responsive process
    assert base < hub.tick_interval < base + 0.001
    for _ in range(200):
        hub.observe_lag(0.001)  # timers 1 ms late: the tick grows by 4 ms
    assert base + 0.0035 < hub.tick_interval <= base + 0.004
    watch_hub(hub.metrics, hub)
    assert f"presence_tick_seconds {hub.tick_interval:g}" in hub.metrics.render()
    for _ in range(200):
        hub.observe_lag(0.050)  # far behind: at most four times the flush interval
    assert hub.tick_interval == 4 * base
    for _ in range(200):
        hub.observe_lag(0.0)
    assert hub.tick_interval < base + 0.0001


async def test_room_observers_see_sweeps_and_keep_yjs_sockets_on_expiry() -> None:
    clock = Clock()
    hub = make_hub("A", MemoryBus(), clock)
    await hub.start()
    room = await hub.open("doc")
    view = hub.observer(room, YjsView)
    assert hub.observer(room, YjsView) is view  # one per room and maker
    ypeer, jpeer = Peer(), Peer()
    youtbox: Outbox[bytes] = Outbox(
        ypeer, view, max_backlog=8, clock=hub.clock, metrics=hub.metrics
    )
    view.attach(youtbox)
    hub.attach(room, youtbox)
    hub.admit(room, youtbox, "y7", None, {"cursor": None})
    await join(hub, "doc", outbox_for(hub, jpeer), None)
    await settle(hub)
    sent = len(ypeer.frames)
    clock.now += 16  # past expire_after / 2: the view re-announces every state
    hub.sweep()
    assert len(ypeer.frames) == sent + 1
    clock.now += 15  # both members expired: the JSON socket closes, the Yjs one stays
    hub.sweep()
    assert jpeer.closed is not None and jpeer.closed[0] == CLOSE_EXPIRED
    assert ypeer.closed is None and not youtbox.members and "y7" not in room
    # The room is forgotten with its last connection, and its observers with it.
    view.detach(youtbox)
    hub.disconnect("doc", youtbox)
    await settle(hub)
    assert "doc" not in hub.rooms
    assert hub.observer(await hub.open("doc"), YjsView) is not view
    await hub.stop()


async def test_a_quiet_room_sends_at_once_whatever_a_busy_one_does() -> None:
    hub = make_hub("A", MemoryBus(), Clock())
    await hub.start()
    busy, quiet = await hub.open("busy"), await hub.open("quiet")
    peers = {}
    for room in (busy, quiet):
        peers[room.name] = Peer()
        hub.attach(room, outbox_for(hub, peers[room.name]))
        room.join("m", Identity("u", "Io", "IO", "#332288"), 0.0)
    hub._mark("busy")
    hub._flush_soon()  # the busy room just sent
    sent = len(peers["busy"].frames)
    busy.update("m", {"x": 1}, 0.0)
    hub._mark("busy")
    quiet.update("m", {"x": 1}, 0.0)
    hub._mark("quiet")  # from this replica, like the busy one's
    assert "busy" in hub._waiting  # sent a moment ago: batches until its next tick
    assert "quiet" in hub._soon  # sent nothing lately: at the end of this loop pass
    await asyncio.sleep(0)  # the end of the pass
    # (its join and its update, in one frame)
    assert [m["members"][0]["state"] for m in messages(peers["quiet"])] == [{"x": 1}]
    assert len(peers["busy"].frames) == sent  # still waiting for its tick
    timer = hub._waiting["busy"]
    loop_time = asyncio.get_running_loop().time()
    assert loop_time < timer.when() <= loop_time + hub.tick_interval  # its next tick
    await settle(hub)  # the tick comes
    assert len(peers["busy"].frames) > sent
    busy.update("m", {"x": 2}, 0.0)
    hub._mark("busy", at_once=True)  # from another replica: never waits
    assert "busy" in hub._soon
    await hub.stop()


async def test_every_connection_hears_each_state_every_15_s_whatever_others_are_sent() -> None:
    # y-protocols drops a state it has not heard for 30 s. A snapshot sent to one
    # connection (a joiner, a query) must not push back the others' renewals.
    from presence.yjs import codec as yjs

    clock, wall = Clock(), [1_700_000_000.0]
    hub = make_hub("A", MemoryBus(), clock)
    room = await hub.open("doc")
    view = hub.observer(room, lambda r, h: YjsView(r, h, wall=lambda: wall[0]))
    peer = Peer()
    outbox: Outbox[bytes] = Outbox(peer, view, max_backlog=8, clock=clock, metrics=hub.metrics)
    view.attach(outbox)
    hub.attach(room, outbox)
    room.join("y42", Identity("u", "Io", "IO", "#332288"), clock.now, {"x": 1})
    hub._mark("doc")
    await settle(hub)

    def heard() -> int:
        frames = [yjs.read_message(f) for f in peer.frames]
        return sum(e.client_id == 42 for _, r in frames for e in yjs.read_awareness(r))

    told, last, gaps = heard(), 0.0, []
    for step in range(1, 161):  # 40 s of sweeps
        wall[0] += 0.25
        clock.now += 0.25
        room.heartbeat("y42", clock.now)  # alive, unchanged
        if step in (56, 112):  # someone joins at 14 s and at 28 s
            joiner = Outbox(Peer(), view, max_backlog=8, clock=clock, metrics=hub.metrics)
            view.full(view.snapshot(), joiner)
        view.swept(clock.now)
        if heard() > told:
            told, gaps, last = heard(), [*gaps, step / 4 - last], step / 4
    assert told == 3 and gaps == [15.0, 15.0]


async def test_a_frame_is_encoded_once_for_the_room_and_its_echo_is_recognised() -> None:
    # Stock clients send back every update they apply: a byte-for-byte copy of a message
    # a connection was sent is dropped without decoding, once, for that connection only.
    from presence.yjs import codec as yjs
    from presence.yjs.echoes import ECHO_MESSAGES, ECHO_WINDOW

    clock = Clock()
    hub = make_hub("A", MemoryBus(), clock)
    room = await hub.open("doc")
    view = hub.observer(room, YjsView)
    peers = [Peer() for _ in range(3)]
    outboxes = [Outbox(p, view, max_backlog=8, clock=clock, metrics=hub.metrics) for p in peers]
    for outbox in outboxes:
        view.attach(outbox)
        hub.attach(room, outbox)
    hub.admit(room, outboxes[0], "y1", None, {"x": 1})
    await settle(hub)
    hub.replace("doc", "y1", {"x": 2})
    await settle(hub)
    sent = [p.frames[-1] for p in peers[1:]]
    assert sent[0] is sent[1]  # one encoding (and one framing) for both receivers
    assert all(
        yjs.client_id_of("y1") != e.client_id
        for f in peers[0].frames
        for e in yjs.read_awareness(yjs.read_message(f)[1])
    )  # never its own
    message = sent[0]
    assert not view.echoes.echoed(outboxes[0], message)  # not sent to the sender
    assert not view.echoes.echoed(outboxes[1], message[:-1] + b" ")  # other bytes
    assert view.echoes.echoed(outboxes[1], bytes(message))  # a copy, not the same object
    assert not view.echoes.echoed(outboxes[1], message)  # a message is echoed once
    assert view.echoes.echoed(outboxes[2], message)
    # Only the last few messages of a connection are kept, and not for long.
    for x in range(3, 3 + ECHO_MESSAGES + 1):
        hub.replace("doc", "y1", {"x": x})
        await settle(hub)
    assert len(view.echoes.recent[outboxes[1]]) == ECHO_MESSAGES
    assert not view.echoes.echoed(outboxes[1], peers[1].frames[-ECHO_MESSAGES - 1])
    assert view.echoes.echoed(outboxes[1], peers[1].frames[-1])
    clock.now += ECHO_WINDOW
    view.swept(clock.now)
    assert outboxes[1] not in view.echoes.recent  # an idle connection keeps none
    # A joiner's snapshot is its own: recognised when it comes back, but not kept for
    # the room; a connection never attached keeps nothing (nothing would forget it).
    snapshot = view.snapshot()
    joined = view.full(snapshot, outboxes[2])
    assert view._encoded[0] is not snapshot
    assert view.echoes.echoed(outboxes[2], joined)
    stranger = Outbox(Peer(), view, max_backlog=8, clock=clock, metrics=hub.metrics)
    view.full(view.snapshot(), stranger)
    assert stranger not in view.echoes.recent
    await hub.stop()
