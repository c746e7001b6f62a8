"""Replication in process: replicas on a memory bus driven by a fake clock. Messages are
delivered when the test pumps the bus, so deaths, stalls, lost messages and re-syncs
play out in milliseconds, exactly."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from presence.backplane.memory import MemoryBackplane, MemoryBus
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
            name, bus, clock, replica_timeout=TIMEOUT, permdown_after=PERMDOWN, ticking=False
        )
        self.rooms: dict[str, Room] = {}
        self.reconnected = 0

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

    def flush(self) -> None:
        for name, room in self.rooms.items():
            local, _remote = room.take()
            if local:
                events = local.events()
                touched = {e.member.id if isinstance(e, Joined) else e.id for e in events}
                current = [room.member(i) for i in touched if i in room]
                gone = [i for i in touched if i not in room]
                self.backplane.publish(name, events, current, gone)

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
        """Deliver until nothing moves (a network with no latency)."""
        for _ in range(100):
            for name, node in self.nodes.items():
                if name not in self.stopped:
                    node.flush()
            if not self.bus.pump():
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
