"""Replication in process: replicas on a memory bus driven by a fake clock. Messages are
delivered when the test pumps the bus, so deaths, stalls, lost messages and re-syncs
play out in milliseconds, exactly. At the end, the Redis transport's own handling of
failures (lost connections, stalls, crashed tasks), on fake sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from presence.backplane import redis as redis_transport
from presence.backplane.base import Held
from presence.backplane.memory import MemoryBackplane, MemoryBus
from presence.backplane.redis import RedisTransport
from presence.backplane.resp import RespConnection
from presence.backplane.transport import HashDel, HashReplace, Op, Publish
from presence.codecs import replica as codec
from presence.core.events import Event, Joined, MemberInfo
from presence.core.identity import Identity
from presence.core.room import Room

pytestmark = pytest.mark.unit

TIMEOUT = 5.0  # --replica-timeout: heartbeat 1 s, check 0.5 s, down after 3.5 s
PERMDOWN = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A replica's rooms, as the hub keeps them (without asyncio): the listener of its
    backplane."""

    def __init__(self, name: str, bus: MemoryBus, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.backplane = MemoryBackplane(
            name,
            bus,
            clock,
            replica_timeout=TIMEOUT,
            permdown_after=PERMDOWN,
            ticking=False,
            wall=clock,
        )
        self.rooms: dict[str, Room] = {}
        self.held: list[tuple[str, list[Held]]] = []
        self.reconnected = 0
        self.ops: list[Op] = []  # everything its backplane wrote
        transport = self.backplane.transport
        send = transport.send

        def record(ops: Sequence[Op]) -> None:
            self.ops.extend(ops)
            send(ops)

        transport.send = record  # type: ignore[method-assign]

    # -- backplane.base.Listener ---------------------------------------------------------

    def on_events(self, room: str, events: Sequence[Event]) -> None:
        if room in self.rooms:
            self.rooms[room].apply(events)

    def on_full_state(self, room: str, origin: str, members: Sequence[MemberInfo]) -> None:
        if room in self.rooms:
            self.rooms[room].sync_origin(origin, members)

    def on_sync_request(self, room: str) -> None:
        if room in self.rooms and self.rooms[room].has_local_members:
            self.backplane.publish_full_state(room, self.rooms[room].local_members())

    def on_holds(self, room: str, held: Sequence[Held]) -> None:
        self.held.append((room, list(held)))

    def on_replica_down(self, origin: str) -> None:
        for room in self.rooms.values():
            room.drop_origin(origin)

    def on_reconnected(self) -> None:
        self.reconnected += 1
        for name, room in self.rooms.items():
            self.backplane.publish_full_state(name, room.local_members())
            self.backplane.request_sync(name)

    # -- what the hub does ---------------------------------------------------------------

    async def join(self, room_name: str, member: str) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, replica=self.name)
            room.apply(await self.backplane.open_room(room_name))
            room.take()
        n = len(member)
        room.join(member, Identity(member, f"User {member}", f"U{n}", "#1f77b4"), self.clock())
        self.flush()

    def update(self, room_name: str, member: str, **state: object) -> None:
        self.rooms[room_name].update(member, dict(state), self.clock())
        self.flush()

    def leave(self, room_name: str, member: str) -> None:
        self.rooms[room_name].leave(member)
        self.flush()

    def close(self, room_name: str) -> None:
        """The room's last local member left: the hub forgets it."""
        del self.rooms[room_name]
        self.backplane.close_room(room_name)

    def flush(self) -> None:
        for name, room in self.rooms.items():
            local, _remote = room.take()
            if local:
                self.backplane.publish(name, *room.outgoing(local))

    def sees(self, room: str = "doc") -> set[str]:
        return {m.id for m in self.rooms[room].snapshot()} if room in self.rooms else set()

    def state_of(self, member: str, room: str = "doc") -> dict[str, object]:
        return self.rooms[room].member(member).state


class Cluster:
    def __init__(self, *names: str) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock, manual=True)
        self.nodes = {name: Node(name, self.bus, self.clock) for name in names}
        self.stopped: set[str] = set()  # frozen or dead: their code does not run
        # (channel, message with "from" and "to") for every delivery to another replica
        self.sent: list[tuple[str, dict[str, object]]] = []
        self.bus.drop = self._record

    def _record(self, channel: str, data: bytes, receiver: str) -> bool:
        sender, body = codec.open_envelope(data)
        if sender.decode() != receiver and body.startswith(b"{"):
            message = {**orjson.loads(body), "from": sender.decode(), "to": receiver}
            self.sent.append((channel, message))
        return self.lose(channel, data, receiver)

    def lose(self, channel: str, data: bytes, receiver: str) -> bool:
        return False  # tests replace this to lose chosen messages

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    async def start(self) -> None:
        for node in self.nodes.values():
            await node.backplane.start(node)
        self.settle()

    def settle(self) -> None:
        """Deliver until nothing moves (a network with no latency). The full states due
        go out once deliveries are over: SYNC_DELAY is longer than round trips."""
        for _ in range(100):
            for name, node in self.nodes.items():
                if name not in self.stopped:
                    node.flush()
            if self.bus.pump():
                continue
            queued = len(self.bus.queue)
            for name, node in self.nodes.items():
                if name not in self.stopped:
                    node.backplane.send_full_states()
            if len(self.bus.queue) == queued:
                return
        raise AssertionError("messages kept flowing")

    def run(self, seconds: float) -> None:
        """Let time pass: the running replicas tick every 0.1 s, messages flow."""
        for _ in range(round(seconds / 0.1)):
            self.clock.now += 0.1
            for name, node in self.nodes.items():
                if name not in self.stopped:
                    node.backplane.tick()
            self.settle()

    def until(self, condition: object, limit: float) -> float:
        """Seconds of fake time until ``condition()`` holds."""
        assert callable(condition)
        start = self.clock.now
        while not condition():
            assert self.clock.now - start < limit, f"not within {limit} s"
            self.run(0.1)
        return round(self.clock.now - start, 3)

    def stop(self, name: str) -> None:
        """SIGSTOP (or SIGKILL, if never resumed): its code stops, messages to it wait."""
        self.stopped.add(name)
        self.bus.freeze(name)

    def resume(self, name: str) -> None:
        self.stopped.discard(name)
        self.bus.thaw(name)


async def three_in_a_room() -> Cluster:
    c = Cluster("A", "B", "C")
    await c.start()
    for name in "ABC":
        await c[name].join("doc", name.lower())
        c.settle()
    c.run(1.0)
    for name in "ABC":
        assert c[name].sees() == {"a", "b", "c"}
    return c


async def test_members_and_updates_cross_replicas_and_late_joiners_get_a_snapshot() -> None:
    c = await three_in_a_room()
    c["B"].update("doc", "b", cursor=1)
    c.settle()
    assert c["A"].state_of("b") == {"cursor": 1} == c["C"].state_of("b")
    late = Node("D", c.bus, c.clock)
    c.nodes["D"] = late
    await late.backplane.start(late)
    await late.join("doc", "d")
    assert late.sees() == {"a", "b", "c", "d"}
    c.settle()
    assert all(c[n].sees() == {"a", "b", "c", "d"} for n in "ABCD")


async def test_a_dead_replica_goes_down_within_the_timeout_then_is_forgotten() -> None:
    c = await three_in_a_room()
    c.run(0.55)  # any phase of the heartbeat
    c.stop("B")  # SIGKILL: never resumed
    gone = c.until(lambda: "b" not in c["A"].sees() and "b" not in c["C"].sees(), TIMEOUT)
    # Heard last at most one heartbeat before the kill; down after 3.5 s of silence,
    # noticed at the next check.
    assert 0.5 * TIMEOUT <= gone <= 0.8 * TIMEOUT
    assert c["A"].backplane.peers["B"].down_since is not None
    assert c.bus.hashes["presence:{doc}:members"].keys() >= {"B/b"}  # kept while down
    # A replica that never heard B skips its members: B's liveness key has expired.
    late = c.nodes["D"] = Node("D", c.bus, c.clock)
    await late.backplane.start(late)
    await late.join("doc", "d")
    assert late.sees() == {"a", "c", "d"}
    c.run(PERMDOWN)
    assert "B" not in c["A"].backplane.peers
    assert "B/b" not in c.bus.hashes["presence:{doc}:members"]  # permdown: discarded
    assert all(c[n].sees() == {"a", "c", "d"} for n in "ACD")


async def test_a_replica_stalled_past_the_timeout_comes_back_whole_at_once() -> None:
    c = await three_in_a_room()
    c.stop("B")  # SIGSTOP
    c.until(lambda: "b" not in c["A"].sees() and "b" not in c["C"].sees(), TIMEOUT)
    c.run(10)
    assert c["B"].sees() == {"a", "b", "c"}  # it was not running: it noticed nothing
    c.resume("B")
    # Its first tick finds its timers 10 s late: it re-announces; the others ask it too.
    c.run(0.1)
    assert all(c[n].sees() == {"a", "b", "c"} for n in "ABC")
    assert c["B"].backplane.stalls == 1 and c["B"].reconnected == 2  # start, then stall
    # Everything it sends later is relayed.
    for i in range(20):
        c["B"].update("doc", "b", cursor=i)
        c.settle()
    assert c["A"].state_of("b") == {"cursor": 19} == c["C"].state_of("b")
    c.run(3 * TIMEOUT)
    assert all(c[n].sees() == {"a", "b", "c"} for n in "ABC")


async def test_any_message_from_a_down_replica_brings_its_state_back() -> None:
    c = await three_in_a_room()
    c.stop("B")
    c.until(lambda: "b" not in c["A"].sees(), TIMEOUT)
    c.resume("B")
    # Before B's timers run, a room message from it: an update for a member the others
    # dropped. They ask B, and B alone, for its state.
    c.sent.clear()
    c["B"].update("doc", "b", cursor=7)
    c.settle()
    assert c["A"].sees() == {"a", "b", "c"} == c["C"].sees()
    assert c["A"].state_of("b") == {"cursor": 7}
    asks = [m for _, m in c.sent if m["k"] == "q"]
    assert asks and all(m["t"] == "B" for m in asks)
    assert {m["from"] for _, m in c.sent if m["k"] == "f"} == {"B"}


async def test_a_lost_message_is_noticed_by_its_number_and_re_synced() -> None:
    c = await three_in_a_room()
    dropped: list[dict[str, object]] = []

    def lose(channel: str, data: bytes, receiver: str) -> bool:
        _, body = codec.open_envelope(data)
        message = orjson.loads(body)
        if receiver == "A" and message["k"] == "e" and not dropped:
            dropped.append(message)
            return True
        return False

    c.lose = lose  # type: ignore[method-assign]
    c["B"].update("doc", "b", cursor=1)  # lost on its way to A
    c.settle()
    assert dropped and c["A"].state_of("b") == {} and c["C"].state_of("b") == {"cursor": 1}
    c.sent.clear()
    c["B"].update("doc", "b", mood="ok")  # A sees a gap in B's numbers
    c.settle()
    assert c["A"].state_of("b") == {"cursor": 1, "mood": "ok"}
    assert c["A"].backplane.gaps == 1
    assert {(m["from"], m["t"]) for _, m in c.sent if m["k"] == "q"} == {("A", "B")}
    assert {m["from"] for _, m in c.sent if m["k"] == "f"} == {"B"}


async def test_the_goodbye_comes_after_the_last_events_and_stragglers_are_ignored() -> None:
    c = await three_in_a_room()
    c["B"].update("doc", "b", cursor=3)
    c["B"].rooms["doc"].leave("b")
    c["B"].flush()
    await c["B"].backplane.stop()
    c.sent.clear()
    c.settle()
    for receiver in "AC":
        kinds = [m["k"] for _, m in c.sent if m["from"] == "B" and m["to"] == receiver]
        assert kinds == ["e", "e", "b"]  # the update, the leave, then the goodbye
    assert c["A"].sees() == {"a", "c"} == c["C"].sees()
    # A message of B's arriving after its goodbye cannot bring a member back.
    late = codec.envelope(
        "B",
        {
            "k": "e",
            "s": 99,
            "e": [
                [
                    "j",
                    codec.member_to_json(
                        MemberInfo("b", Identity("b", "User b", "U1", "#1f77b4"), {}, False, "B")
                    ),
                ]
            ],
        },
    )
    c.bus.publish("presence:{doc}", late)
    c.settle()
    assert c["A"].sees() == {"a", "c"}


async def test_a_silent_bus_is_not_taken_for_everyones_death() -> None:
    c = await three_in_a_room()
    for name in "ABC":
        c.bus.freeze(name)  # Redis stopped: nothing is delivered, nobody hears itself
    c.run(3 * TIMEOUT)
    for name in "ABC":
        c.bus.thaw(name)
    c.settle()
    assert all(c[n].sees() == {"a", "b", "c"} for n in "ABC")
    assert all(c[n].backplane.downs == 0 for n in "ABC")


async def test_refused_writes_make_a_replica_unready_but_crashes_are_still_detected() -> None:
    c = await three_in_a_room()
    assert c["A"].backplane.ready
    c.bus.refuse_writes = True  # maxmemory with noeviction: publishing still works
    c.run(1.0)
    assert not c["A"].backplane.ready
    c.stop("B")
    c.until(lambda: "b" not in c["A"].sees(), TIMEOUT)
    assert c["A"].sees() == {"a", "c"} == c["C"].sees()
    c.bus.refuse_writes = False
    c.run(1.0)  # the next heartbeat's write succeeds
    assert c["A"].backplane.ready


async def test_unknown_messages_are_ignored() -> None:
    c = await three_in_a_room()
    for body in ({"k": "zz", "s": 1}, {"k": "e", "s": "x", "e": []}):
        c.bus.publish("presence:{doc}", codec.envelope("B", body))
    c.bus.publish("presence:{doc}", b"B not-json")
    # An older replica numbered its messages across rooms (no "r"): no gap is taken.
    for seq in (5, 50):
        c.bus.publish("presence:{doc}", codec.envelope("B", {"k": "e", "s": seq, "e": []}))
    c.settle()
    assert c["A"].backplane.gaps == 0
    c["B"].update("doc", "b", cursor=2)
    c.settle()
    assert c["A"].state_of("b") == {"cursor": 2}


def test_a_cluster_url_with_a_database_is_refused() -> None:
    from presence.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="only database 0"):
        Settings(redis_url="redis://node:6379/3", redis_cluster=True)
    assert Settings(redis_url="redis://node:6379/0", redis_cluster=True).redis_cluster
    with pytest.raises(ConfigError, match="replica_permdown"):
        Settings(replica_timeout=10, replica_permdown=5)


# -- numbering, coalesced full states, snapshots ---------------------------------------


def published(c: Cluster, kind: str, room: str = "doc") -> list[tuple[object, object]]:
    """(sender, number) of every message of ``kind`` published in ``room`` (once, however
    many replicas received it)."""
    channel = f"presence:{{{room}}}"
    return sorted({(m["from"], m["s"]) for ch, m in c.sent if ch == channel and m["k"] == kind})


async def test_a_room_closed_and_opened_again_is_not_taken_for_lost_messages() -> None:
    c = await three_in_a_room()
    await c["B"].join("other", "x")  # B's numbers move on in another room meanwhile
    for i in range(5):
        c["B"].update("other", "x", cursor=i)
        c.settle()
    c["B"].leave("doc", "b")
    c.settle()
    c["B"].close("doc")
    c.sent.clear()
    await c["B"].join("doc", "b")  # its numbers in the room jump
    c.settle()
    c["B"].update("doc", "b", cursor=1)
    c.settle()
    assert c["A"].state_of("b") == {"cursor": 1} == c["C"].state_of("b")
    assert c["A"].backplane.gaps == 0 == c["C"].backplane.gaps
    assert not [m for _, m in c.sent if m["k"] == "q" and "t" in m]  # nobody asked B
    # And a message lost after that is still noticed.
    c.lose = lambda channel, data, receiver: receiver == "A" and b'"k":"e"' in data  # type: ignore[method-assign]
    c["B"].update("doc", "b", cursor=2)
    c.settle()
    c.lose = lambda channel, data, receiver: False  # type: ignore[method-assign]
    c["B"].update("doc", "b", mood="ok")
    c.settle()
    assert c["A"].backplane.gaps == 1
    assert c["A"].state_of("b") == {"cursor": 2, "mood": "ok"}


async def test_a_replica_back_with_a_gap_in_the_same_message_is_asked_once() -> None:
    c = await three_in_a_room()

    def lose(channel: str, data: bytes, receiver: str) -> bool:
        # A hears nothing from B for a while: heartbeats, then one room message.
        return receiver == "A" and data.startswith(b"B ")

    c.lose = lose  # type: ignore[method-assign]
    c.until(lambda: "b" not in c["A"].sees(), TIMEOUT)
    c["B"].update("doc", "b", cursor=1)  # lost too: B's next message has a gap
    c.settle()
    c.lose = lambda channel, data, receiver: False  # type: ignore[method-assign]
    c.sent.clear()
    c["B"].update("doc", "b", cursor=2)  # B is back, and a message is missing
    c.settle()
    asks = [m for _, m in c.sent if m["k"] == "q" and m["from"] == "A" and m["to"] == "B"]
    assert len(asks) == 1 and asks[0]["t"] == "B"
    assert c["A"].backplane.gaps == 0  # counted from the "back", not as a gap
    assert c["A"].sees() == {"a", "b", "c"} and c["A"].state_of("b") == {"cursor": 2}
    assert published(c, "f") == [("B", published(c, "f")[0][1])]  # one full state, B's


async def everyone_in_two_rooms(names: str) -> Cluster:
    """Replicas ``names``, each with a member in rooms "doc" and "sheet" ("adoc", …)."""
    c = Cluster(*names)
    await c.start()
    for room in ("doc", "sheet"):
        for n in names:
            await c[n].join(room, n.lower() + room)
            c.settle()
    c.run(1.0)
    return c


async def test_one_full_state_per_replica_and_room_after_a_bus_wide_reconnect() -> None:
    names = "ABCDEF"
    c = await everyone_in_two_rooms(names)
    c.sent.clear()
    for n in names:  # Redis restarted, or thawed: every replica's on_up
        c[n].backplane.on_up()
    c.settle()
    for room in ("doc", "sheet"):
        senders = [sender for sender, _ in published(c, "f", room)]
        # Each replica asked everyone, and was asked by the five others: one each.
        assert sorted(senders) == list(names), senders
        assert all(c[n].sees(room) == {x.lower() + room for x in names} for n in names)


async def test_a_replica_back_from_a_stall_gets_and_sends_one_full_state_per_room() -> None:
    names = "ABCDE"
    c = await everyone_in_two_rooms(names)
    c.stop("B")  # SIGSTOP past the timeout
    c.until(lambda: all("bdoc" not in c[n].sees() for n in "ACDE"), TIMEOUT)
    c.run(5)
    c.sent.clear()
    c.resume("B")
    c.run(0.1)
    for room in ("doc", "sheet"):
        senders = sorted(sender for sender, _ in published(c, "f", room))
        # B's own (asked by its stall and by the four others, who heard it back), and
        # one from each of the others (B asked everyone).
        assert senders == list(names), senders
        assert all(c[n].sees(room) == {x.lower() + room for x in names} for n in names)


async def test_replicas_that_said_goodbye_are_forgotten_without_cleaning_up_after_them() -> None:
    c = await three_in_a_room()
    c["B"].leave("doc", "b")
    await c["B"].backplane.stop()
    c.stopped.add("B")
    c.settle()
    assert "presence:replica:B" not in c.bus.expiry  # its liveness key went with it
    c["A"].ops.clear()
    c.run(PERMDOWN + 1)
    assert "B" not in c["A"].backplane.peers
    assert not [op for op in c["A"].ops if isinstance(op, HashReplace)]  # nothing to delete


async def test_a_replica_forgotten_after_permdown_comes_back_whole() -> None:
    c = await three_in_a_room()
    c.stop("B")
    c.run(PERMDOWN + TIMEOUT)
    assert "B" not in c["A"].backplane.peers and "B" not in c["C"].backplane.peers
    assert "B/b" not in c.bus.hashes["presence:{doc}:members"]
    assert c["A"].sees() == {"a", "c"}
    c.resume("B")
    c.run(0.1)  # it finds it stalled, and announces itself
    assert all(c[n].sees() == {"a", "b", "c"} for n in "ABC")
    assert "B/b" in c.bus.hashes["presence:{doc}:members"]
    c["B"].update("doc", "b", cursor=4)
    c.settle()
    assert c["A"].state_of("b") == {"cursor": 4} == c["C"].state_of("b")
    late = c.nodes["D"] = Node("D", c.bus, c.clock)
    await late.backplane.start(late)
    await late.join("doc", "d")
    assert late.sees() == {"a", "b", "c", "d"}


async def test_what_arrives_while_the_snapshot_is_read_is_applied_in_order() -> None:
    c = await three_in_a_room()
    await c["B"].join("doc", "b2")
    c.settle()
    late = c.nodes["D"] = Node("D", c.bus, c.clock)
    await late.backplane.start(late)

    def during_read(key: str) -> None:
        c.bus.on_read = None
        # B answers a request (a full state, with b2), b2 leaves, b moves (written to
        # the hash), and moves again (a message only): all reach D, subscribed already,
        # before its read. The full state is older than the snapshot: applied, it would
        # put b's old state back (the move after it is in the snapshot, so skipped).
        c["B"].backplane.publish_full_state("doc", c["B"].rooms["doc"].local_members())
        c["B"].backplane.send_full_states()
        c["B"].leave("doc", "b2")
        c.clock.now += 1.5
        c["B"].update("doc", "b", cursor=5)  # the hash's next write is due: written
        c["B"].update("doc", "b", mood="ok")  # not written to the hash yet
        c.bus.pump()

    c.bus.on_read = during_read
    await late.join("doc", "d")
    assert late.sees() == {"a", "b", "c", "d"}
    assert late.state_of("b") == {"cursor": 5, "mood": "ok"}
    c.settle()
    assert late.sees() == {"a", "b", "c", "d"}
    assert late.state_of("b") == {"cursor": 5, "mood": "ok"}
    c["B"].update("doc", "b", cursor=6)
    c.settle()
    assert late.state_of("b") == {"cursor": 6, "mood": "ok"} and late.backplane.gaps == 0


async def test_a_full_state_newer_than_the_snapshot_replaces_its_senders_members() -> None:
    c = await three_in_a_room()
    late = c.nodes["D"] = Node("D", c.bus, c.clock)
    await late.backplane.start(late)

    def during_read(key: str) -> None:
        c.bus.on_read = None
        snapshot = dict(c.bus.hashes[key])
        # After the read: b leaves and b3 joins, and B re-announces (a full state
        # newer than the snapshot), all before D looks at what it buffered.
        c["B"].leave("doc", "b")
        c.bus.hashes[key] = snapshot  # the read saw the hash as it was
        c["B"].rooms["doc"].join("b3", Identity("b3", "User b3", "U3", "#2ca02c"), c.clock())
        c["B"].rooms["doc"].take()
        c["B"].backplane.publish_full_state("doc", [])
        c["B"].backplane.send_full_states()
        c.bus.pump()

    c.bus.on_read = during_read
    await late.join("doc", "d")
    assert late.sees() == {"a", "b3", "c", "d"}


async def test_a_failed_read_leaves_no_room_buffering_forever() -> None:
    c = await three_in_a_room()
    late = c.nodes["D"] = Node("D", c.bus, c.clock)
    await late.backplane.start(late)

    def fail(key: str) -> None:
        c.bus.on_read = None
        raise RuntimeError("a bug while reading")

    c.bus.on_read = fail
    await late.join("doc", "d")
    assert late.backplane.links["doc"].opening is None
    c.settle()  # the others answer its request
    assert late.sees() == {"a", "b", "c", "d"}
    c["B"].update("doc", "b", cursor=1)
    c.settle()
    assert late.state_of("b") == {"cursor": 1}
    # A field it cannot read is skipped, not fatal.
    c.bus.hashes["presence:{doc}:members"]["X/zz"] = b"not json"
    other = c.nodes["E"] = Node("E", c.bus, c.clock)
    await other.backplane.start(other)
    await other.join("doc", "e")
    assert other.sees() == {"a", "b", "c", "d", "e"}


async def test_a_room_closed_while_cut_off_is_emptied_when_back() -> None:
    c = await three_in_a_room()
    c.lose = lambda channel, data, receiver: data.startswith(b"B ")  # type: ignore[method-assign]
    c["B"].leave("doc", "b")  # the leave is lost, like anything sent while Redis is away
    c.settle()
    c["B"].close("doc")
    c.lose = lambda channel, data, receiver: False  # type: ignore[method-assign]
    assert c["A"].sees() == {"a", "b", "c"}
    c["B"].backplane.on_up()  # back
    c.settle()
    assert c["A"].sees() == {"a", "c"} == c["C"].sees()


async def test_a_lone_replica_publishes_and_writes_nothing() -> None:
    alone = MemoryBackplane("solo")
    node = Node("A", MemoryBus(), Clock())  # a listener; its own backplane is not used
    await alone.start(node)
    assert await alone.open_room("doc") == []
    m = MemberInfo("m", Identity("m", "User m", "U1", "#1f77b4"), {}, False, "solo")
    alone.publish("doc", [Joined(m)], [m], [])
    alone.publish_full_state("doc", [m])
    alone.request_sync("doc")
    assert not alone.bus.queue and not alone.bus.hashes and alone._driver is None
    await alone.stop()


async def test_publishing_in_a_room_not_open_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    c = await three_in_a_room()
    m = MemberInfo("m", Identity("m", "User m", "U1", "#1f77b4"), {}, False, "A")
    c["A"].ops.clear()
    c["A"].backplane.publish("closed", [Joined(m)], [m], [])
    assert c["A"].ops == [] and "presence:{closed}:members" not in c.bus.hashes
    assert "not open" in caplog.text


# -- the Redis transport's failure handling, on fake sockets ----------------------------


class FakeSocket:
    """What RespConnection writes to: records writes; can be closing (uvloop closes a
    transport a loop turn before it reports the loss) or fail."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.error: Exception | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Receiver:
    def __init__(self, fail: bool = False) -> None:
        self.ups = 0
        self.fail = fail

    def on_message(self, channel: str, data: bytes) -> None:
        pass

    def on_up(self) -> None:
        self.ups += 1
        if self.fail:
            raise RuntimeError("a bug in on_up")


def connected(
    timeout: float = 2.0, clock: Clock | None = None
) -> tuple[RedisTransport, FakeSocket]:
    """A Redis transport that believes it is connected, over a fake socket."""
    t = RedisTransport("redis://127.0.0.1:1", timeout=timeout, clock=clock or time.monotonic)
    socket = FakeSocket()
    conn = RespConnection(t._connection_lost, clock=t.clock)
    conn.connection_made(socket)  # type: ignore[arg-type]
    t._links[""] = conn
    t._connected, t.state = True, "up"
    return t, socket


async def turns(n: int = 10) -> None:
    """Let the loop run what is ready (tasks, callbacks), without waiting for time."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_redis_writer_survives_any_write_error() -> None:
    for error in (None, RuntimeError("unable to perform operation on <TCPTransport closed>")):
        t, socket = connected()
        writer = asyncio.create_task(t._write_forever())
        writer.add_done_callback(t._task_done)
        if error is None:
            socket.closing = True  # closed by uvloop, connection_lost not yet called
        else:
            socket.error = error  # any other error from a write
        t.send([Publish("presence:{doc}", b"x"), HashDel("presence:{doc}:members", ["A/a"])])
        await turns()
        assert not writer.done(), writer
        assert (t._connected, t.ready, t.state) == (False, False, "down")
        assert t.dropped == 1  # one message (the hash write is not one)
        assert t._lost.is_set()  # the supervisor reconnects
        # Reconnected: the writer writes again.
        t2, socket2 = connected()
        t._links, t._connected, t.state = t2._links, True, "up"
        t.send([Publish("presence:{doc}", b"y")])
        await turns()
        assert socket2.written and b"PUBLISH" in socket2.written[0]
        assert t.ready and t.crashed is None
        writer.cancel()


async def test_a_crashed_redis_task_leaves_the_replica_not_ready() -> None:
    t = RedisTransport("redis://127.0.0.1:1", timeout=0.2)

    async def crash() -> None:
        raise ValueError("a bug")

    t._watch_forever = crash  # type: ignore[method-assign]
    await t.start(Receiver())
    t.state = "up"  # as if connected
    await turns()
    assert t.crashed is not None and "redis-health" in t.crashed and "a bug" in t.crashed
    assert not t.ready and t.status()["state"] == "down"
    await t.stop()


async def test_the_write_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_transport, "MAX_QUEUED", 10)
    t, _ = connected()  # no writer runs: it is stuck
    for _ in range(11):
        t.send([Publish("presence:{doc}", b"x")])
    assert not t._queue and t.dropped == 11 and t.state == "down" and t._lost.is_set()
    t.send([Publish("presence:{doc}", b"x")])  # down: dropped, counted
    assert not t._queue and t.dropped == 12


def test_a_stalled_redis_is_noticed_and_its_return_re_syncs_even_if_on_up_fails() -> None:
    clock = Clock()
    t, _ = connected(timeout=0.2, clock=clock)  # the watcher checks every 0.1 s
    receiver = Receiver(fail=True)
    t.receiver = receiver
    t._links[""].send([(b"*1\r\n$4\r\nPING\r\n", None)])  # no reply comes
    due = clock.now + 0.1
    for _ in range(100):
        clock.now = due
        due = t._watch(due)
        if t._stalled:
            break
    assert t._stalled and not t.ready and t.state == "down"
    assert 0.2 < clock.now - 1000.0 <= 0.35  # noticed within a round of the timeout
    t._links[""].data_received(b"+PONG\r\n" * len(t._links[""]._replies))  # it thaws
    assert t.ready and receiver.ups == 1  # told, although on_up raised
    for _ in range(3):  # its rounds go on (their pings are answered in time)
        clock.now = due
        due = t._watch(due)
        t._links[""].data_received(b"+PONG\r\n" * len(t._links[""]._replies))
    assert t.ready and receiver.ups == 1


def test_a_paused_process_does_not_take_redis_for_stalled() -> None:
    clock = Clock()
    t, _ = connected(timeout=0.2, clock=clock)  # the watcher checks every 0.1 s
    receiver = Receiver()
    t.receiver = receiver
    conn = t._links[""]
    due = clock.now + 0.1
    clock.now = due
    due = t._watch(due)
    conn.data_received(b"+PONG\r\n" * len(conn._replies))
    clock.now += 0.05
    conn.send([(b"*1\r\n$4\r\nPING\r\n", None)])  # a write; Redis answers at once...
    # ... but this process is paused (a long callback, a GC) before it reads the reply;
    # after the pause, timers run before the socket is read (as uvloop does): the
    # watcher's round comes first, late, and judges nothing.
    clock.now += 0.5
    assert conn.waiting(clock.now) > t.timeout  # judged, it would be a stall
    due = t._watch(due)
    conn.data_received(b"+PONG\r\n" * len(conn._replies))
    clock.now = due
    due = t._watch(due)
    assert not t._stalled and t.state == "up" and receiver.ups == 0


def test_a_transport_uvloop_has_closed_counts_as_the_network_failing() -> None:
    # What uvloop raises on a write to a connection the peer closed a loop turn ago:
    # a reconnection like any other, not a bug logged as an error (it failed CI once).
    closed = RuntimeError(
        "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
    )
    network_error = redis_transport._network_error
    assert network_error(closed)
    assert network_error(ConnectionResetError()) and network_error(redis_transport.RedisError())
    assert not network_error(RuntimeError("dictionary changed size during iteration"))
    assert not network_error(KeyError("x"))


def test_held_client_ids_from_other_replicas_are_read_defensively() -> None:
    from presence.backplane.base import Held
    from presence.backplane.rooms import MAX_HOLD_SECONDS
    from presence.backplane.rooms import held_ids as _holds

    good = [["12", "k", 30], ["13", None, 1e9]]
    bad = [["14"], [15, "k", 1], ["16", 3, 1], "x", ["17", "k", "soon"], None]
    assert _holds(good + bad) == [Held("12", "k", 30.0), Held("13", None, MAX_HOLD_SECONDS)]
    assert _holds("junk") == [] and _holds(None) == []


def test_holds_from_elsewhere_last_no_longer_than_ours_and_yield_to_our_sockets() -> None:
    from presence.backplane.base import Held
    from presence.yjs.view import Holds

    now = [100.0]
    published: list[tuple[str, list[Held]]] = []
    holds = Holds(30, lambda: now[0], lambda room, held: published.append((room, list(held))))
    mine: Any = object()  # an outbox of this replica
    holds.hold("doc", [1], mine, "key-a")
    assert published == [("doc", [Held("1", "key-a", 30)])]  # told to the other replicas
    holds.held_elsewhere(
        "doc",
        [
            Held("1", "key-b", 30),
            Held("2", None, 3600),
            Held("x", None, 5),
            Held(str(1 << 32), None, 5),
        ],
    )
    assert holds.get("doc", 1) is not None and holds.get("doc", 1).owner is mine  # type: ignore[union-attr]
    assert holds.get("doc", 2) is not None and holds.get("doc", 2).key is None  # type: ignore[union-attr]
    assert len(holds.held) == 2  # no hold on a non-ID or an ID Yjs never makes
    now[0] += 30.5
    assert holds.get("doc", 2) is None  # capped at our own grace


async def test_held_client_ids_reach_open_rooms_and_late_openers_and_then_go() -> None:
    c = Cluster("A", "B", "C")
    await c.start()
    await c["A"].join("doc", "a")
    await c["B"].join("doc", "b")
    c.settle()
    c["A"].backplane.publish_holds("doc", [Held("7", "key", 30.0)])
    c.settle()
    assert c["B"].held == [("doc", [Held("7", "key", 30.0)])]  # B has the room open
    c.run(10)
    await c["C"].join("doc", "c")  # C opens it later: from the holds hash, 20 s left
    assert [(r, [(h.item, h.key, round(h.seconds)) for h in held]) for r, held in c["C"].held] == [
        ("doc", [("7", "key", 20)])
    ]
    holds = c.bus.hashes[c["A"].backplane.keys.holds("doc")]
    assert list(holds) == ["7/A"]
    c.run(21)  # lapsed: A deletes its field (and the key expires after a margin)
    assert not c.bus.hashes.get(c["A"].backplane.keys.holds("doc"))
    await c["C"].join("doc", "c2")
    assert len(c["C"].held) == 1  # nothing more to read


def test_a_hold_renewed_before_it_lapses_is_not_deleted_by_the_first() -> None:
    bus, clock = MemoryBus(Clock(), manual=True), Clock()
    node = Node("A", bus, clock)
    node.backplane._alone = False
    node.backplane.publish_holds("doc", [Held("7", None, 30.0)])
    clock.now += 20
    node.backplane.publish_holds("doc", [Held("7", None, 30.0)])
    clock.now += 15  # the first lapsed, the second has 15 s to go
    node.backplane._expire_holds(clock.now)
    assert not [op for op in node.ops if isinstance(op, HashDel)]
    clock.now += 16
    node.backplane._expire_holds(clock.now)
    assert [op.fields for op in node.ops if isinstance(op, HashDel)] == [["7/A"]]


async def test_replicas_of_older_protocols_relay_and_one_too_old_is_refused_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = await three_in_a_room()
    beats = [m for _, m in c.sent if m.get("k") == "h"]
    assert beats and all(m["v"] == codec.PROTOCOL for m in beats)
    channel = c["A"].backplane.keys.replicas_channel
    caplog.set_level("INFO", logger="presence.replication")
    # C as a replica of the previous release: its heartbeats carry no version.
    c.bus.publish(channel, codec.envelope("C", {"k": "h"}))
    c.settle()
    c["C"].update("doc", "c", cursor=3)
    c.settle()
    assert c["A"].state_of("c") == {"cursor": 3}
    assert "replica C speaks replication protocol 1 (this one 2): relaying" in caplog.text
    # B as a replica older than the others read: refused, its members gone from them,
    # and each says why, once.
    c.bus.publish(channel, codec.envelope("B", {"k": "h", "v": codec.OLDEST_PROTOCOL - 1}))
    c.settle()
    assert c["A"].sees() == c["C"].sees() == {"a", "c"}
    c["B"].update("doc", "b", cursor=4)
    c.run(PERMDOWN + 1)  # B keeps beating: down for A and C, never forgotten, said once
    assert c["A"].sees() == c["C"].sees() == {"a", "c"}
    assert "B" in c["A"].backplane.peers and c["A"].backplane.peers["B"].down_since
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(refusals) == 2 and all("not heard until it is upgraded" in r for r in refusals)
