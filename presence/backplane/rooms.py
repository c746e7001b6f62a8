"""Room sync: the rooms this replica has open, as replication shares them. Sans-I/O: it
numbers messages, finds gaps, merges a room's snapshot with what arrived while it was
read, and says what to write (:mod:`.transport` ops); :mod:`.replication` sends them.

Pub/sub is at-most-once: a gap in a sender's numbers (a subscriber buffer overflow, a
lost message) makes us ask that sender for its full state in that room; an outage makes
everyone re-announce. State is re-synchronised, never replayed. A replica numbers its
messages in a room on from where it left off in all rooms: one that closes a room and
opens it again jumps; its first message there, an untargeted request, carries its
number, which is where the others count from.

The members hash of a room holds each member's latest state with the number of the
message that wrote it; it is written on joins and leaves at once, and otherwise at most
every ``HASH_INTERVAL``. Full states are coalesced: asking for one marks it due
(:attr:`Link.due`), and it goes out once, ``SYNC_DELAY`` later.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from presence.backplane.base import Held
from presence.backplane.keys import Keys
from presence.backplane.transport import HashDel, HashReplace, HashSet, Op, Publish
from presence.codecs import replica as codec
from presence.core.events import Event, Joined, Left, MemberInfo

log = logging.getLogger("presence.replication")

HASH_TTL_MS = 24 * 3600 * 1000  # backstop for hashes left by replicas that all died
HASH_INTERVAL = 1.0  # seconds between writes of a moving member's state to the hash
# A room's held client IDs outlive their grace in Redis by this much at most: the key
# expires then, and each writer deletes its own fields once they lapsed.
HOLD_MARGIN_MS = 5000
SYNC_DELAY = 0.05  # seconds requests for a full state are gathered before it is sent
MAX_CLOSED = 100_000  # rooms closed lately, remembered to be emptied after an outage
MAX_HOLD_SECONDS = 3600.0  # a replica's claim is believed up to this long

# Link.due: a full state is owed in the room because someone asked for it (sent if we
# have members there), or because we must re-announce ourselves (sent even if empty).
ASKED, OWED = 1, 2

Snapshot = dict[str, tuple[int, MemberInfo]]  # field -> (its number, the member)


@dataclass(slots=True)
class Link:
    """A room this replica has open."""

    seq: int  # the number of our last message in the room
    heard: dict[str, int] = field(default_factory=dict)  # replica -> its last number here
    opening: list[tuple[str, dict[str, Any]]] | None = None  # arrived during the snapshot
    pending: dict[str, MemberInfo | None] = field(default_factory=dict)  # hash writes due
    hash_written: float = -float("inf")
    due: int = 0  # a full state owed: 0, ASKED or OWED


class Rooms:
    def __init__(self, replica_id: str, keys: Keys) -> None:
        self.replica_id = replica_id
        self.keys = keys
        self.links: dict[str, Link] = {}
        # Rooms closed while Redis was away (or shortly before), by when: their last
        # leaves may have been lost, so they are emptied when it is back.
        self.closed: dict[str, float] = {}
        self.sent = 0  # messages sent in all rooms: a reopened room's numbers go on
        # Our fields in rooms' holds keys, by when they lapse (monotonic), to delete.
        self._holds_out: deque[tuple[float, str, str]] = deque()
        self._holds_last: dict[tuple[str, str], float] = {}  # the latest lapse of each
        self.gaps = 0  # messages found missing from another replica

    def envelope(self, message: dict[str, Any]) -> bytes:
        return codec.envelope(self.replica_id, message)

    # -- opening and closing -----------------------------------------------------------

    def open(self, room: str) -> Link:
        """A room opens: its messages are buffered until :meth:`merge`."""
        link = self.links[room] = Link(seq=self.sent, opening=[])
        self.closed.pop(room, None)
        return link

    def close(self, room: str, now: float) -> None:
        """Remembered, to be emptied if Redis turns out to have been away."""
        self.closed.pop(room, None)  # kept in the order they were closed
        self.closed[room] = now
        while len(self.closed) > MAX_CLOSED:
            del self.closed[next(iter(self.closed))]

    def forget_closed(self, now: float, timeout: float) -> None:
        """Rooms closed over ``timeout`` ago while connected: their leaves went out."""
        for room, closed in list(self.closed.items()):  # oldest first
            if now - closed <= timeout:
                break
            del self.closed[room]

    def reconnected(self) -> list[str]:
        """Back after an outage: numbers from before are no basis for finding gaps. Returns
        the rooms closed meanwhile (their leaves may be lost: to empty)."""
        for link in self.links.values():
            link.heard.clear()
        closed, self.closed = self.closed, {}
        return [room for room in closed if room not in self.links]

    def read_snapshot(self, room: str, raw: dict[str, bytes]) -> Snapshot:
        """A room's members hash as read, less our own members."""
        snapshot: Snapshot = {}
        bad = 0
        for name, value in raw.items():
            if not name.startswith(self.replica_id + "/"):
                try:
                    entry = codec.loads(value)
                    snapshot[name] = (int(entry["s"]), codec.member_from_json(entry["m"]))
                except Exception:
                    bad += 1
        if bad:
            log.warning(
                "unreadable fields in a room's members hash skipped",
                extra={"room": room, "fields": bad},
            )
        return snapshot

    @staticmethod
    def read_holds(raw: dict[str, bytes], wall: float) -> list[Held] | None:
        """A room's holds hash as read: the held client IDs that have not lapsed (None
        if no field has)."""
        held = []
        for name, value in raw.items():
            try:
                entry = codec.loads(value)
                seconds = entry["u"] / 1000 - wall
                if seconds > 0:
                    held.append([name.split("/", 1)[0], entry["k"], seconds])
            except Exception:
                continue  # lapses with the key
        return held_ids(held) if held else None

    def merge(
        self,
        room: str,
        link: Link,
        snapshot: Snapshot,
        buffered: list[tuple[str, dict[str, Any]]],
        deliver: Callable[[str, Link, str, dict[str, Any]], None],
    ) -> list[Event]:
        """The snapshot as events, followed by what arrived while it was read, in order,
        less what it already has. A field of the hash holds the number of its writer's
        last message when it was written: a message not newer is in the snapshot.
        Requests and holds that arrived meanwhile go to ``deliver``."""
        events: list[Event] = [Joined(m) for _, m in snapshot.values()]
        seqs = {m.id: s for s, m in snapshot.values()}  # member -> its record's number
        newest: dict[str, int] = {}  # replica -> the newest number of its fields
        present = {m.id: m.origin for _, m in snapshot.values()}  # as the events stand
        for s, m in snapshot.values():
            newest[m.origin] = max(newest.get(m.origin, s), s)
        for origin, message in buffered:
            kind, seq = message.get("k"), message.get("s")
            try:
                if kind in ("q", "o"):
                    deliver(room, link, origin, message)
                    continue
                if kind not in ("e", "f"):
                    continue
                if message.get("r") == 1 and isinstance(seq, int):
                    link.heard[origin] = max(link.heard.get(origin, seq), seq)
                if kind == "e":
                    for event in codec.events_from_json(message["e"]):
                        member_id = event.member.id if isinstance(event, Joined) else event.id
                        if isinstance(seq, int) and seqs.get(member_id, -1) >= seq:
                            continue  # the snapshot has this or newer
                        events.append(event)
                        if isinstance(event, Joined):
                            present[member_id] = origin
                        elif isinstance(event, Left):
                            present.pop(member_id, None)
                    continue
                # A full state older than the snapshot's fields of its sender would
                # bring back members who left since (their leaves are in the snapshot,
                # or buffered before it): skipped. A newer one replaces them.
                if isinstance(seq, int) and newest.get(origin, -1) >= seq:
                    continue
                members = [codec.member_from_json(m) for m in message["m"]]
                ids = {m.id for m in members if m.origin == origin}
                for member_id, o in list(present.items()):
                    if o == origin and member_id not in ids:
                        events.append(Left(member_id))
                        del present[member_id]
                for m in members:
                    if m.origin == origin:
                        events.append(Joined(m))
                        present[m.id] = origin
            except Exception:
                log.exception("bad backplane message ignored")
        return events

    # -- what arrives ------------------------------------------------------------------

    def numbered(self, room: str, link: Link, origin: str, message: dict[str, Any]) -> bool:
        """Follow ``origin``'s numbers in the room; True if messages from it are missing
        (ask it for its state)."""
        kind, seq = message.get("k"), message.get("s")
        if kind in ("e", "f") and message.get("r") == 1 and isinstance(seq, int):
            last = link.heard.get(origin)
            link.heard[origin] = seq if last is None else max(last, seq)
            if kind == "e" and last is not None and seq > last + 1:
                self.gaps += 1
                log.info(
                    "messages from a replica lost: asking for its state",
                    extra={"replica": origin, "room": room, "missing": seq - last - 1},
                )
                return True
        elif kind == "q" and message.get("t") is None:
            # To everyone: sent by a replica that opens the room (its numbering here
            # jumps if it had it open before), or that lost messages. Count from it.
            if message.get("r") == 1 and isinstance(seq, int):
                link.heard[origin] = seq
            else:
                link.heard.pop(origin, None)
        return False

    def back(self, origin: str) -> list[str]:
        """``origin`` is back from down: the rooms to ask it for its state in (asked, a
        gap in its numbers there need not ask again)."""
        for link in self.links.values():
            link.heard.pop(origin, None)
        return list(self.links)

    # -- what we send ------------------------------------------------------------------

    def link(self, room: str) -> Link | None:
        link = self.links.get(room)
        if link is None:
            # The hub publishes only in rooms it has open: a bug. Numbered out of any
            # link, the message would make the others count a gap (and ask us in vain).
            log.error("publishing in a room not open: dropped", extra={"room": room})
        return link

    def _next(self, link: Link) -> int:
        self.sent += 1
        link.seq += 1
        return link.seq

    def events(
        self,
        room: str,
        link: Link,
        events: Sequence[Event],
        current: Sequence[MemberInfo],
        gone: Sequence[str],
        now: float,
    ) -> list[Op]:
        seq = self._next(link)
        events_json = codec.events_to_json(events)
        message = self.envelope({"k": "e", "s": seq, "r": 1, "e": events_json})
        # The members hash only serves replicas that open the room later: it is written
        # on joins and leaves at once, and otherwise at most every HASH_INTERVAL, not on
        # every tick of a moving cursor.
        for m in current:
            link.pending[m.id] = m
        for member_id in gone:
            link.pending[member_id] = None
        urgent = any(isinstance(e, Joined | Left) for e in events)
        due = urgent or now - link.hash_written >= HASH_INTERVAL
        ops = self._hash_ops(room, link, now) if due else []
        ops.append(Publish(self.keys.channel(room), message))
        return ops

    def due_hash_ops(self, now: float) -> list[Op]:
        """The hash writes of moving members that waited for HASH_INTERVAL."""
        ops: list[Op] = []
        for room, link in self.links.items():
            if link.pending and now - link.hash_written >= HASH_INTERVAL:
                ops += self._hash_ops(room, link, now)
        return ops

    def _hash_ops(self, room: str, link: Link, now: float) -> list[Op]:
        """Write our members' due fields, with the number of our last message: they
        reflect at least everything up to it."""
        link.hash_written = now
        due, link.pending = link.pending, {}
        key, prefix = self.keys.members(room), self.replica_id + "/"
        fields = {
            prefix + member_id: codec.dumps({"s": link.seq, "m": codec.member_to_json(m)})
            for member_id, m in due.items()
            if m is not None
        }
        gone = [prefix + member_id for member_id, m in due.items() if m is None]
        ops: list[Op] = []
        if fields:
            ops.append(HashSet(key, fields, HASH_TTL_MS))
        if gone:
            ops.append(HashDel(key, gone))
        return ops

    def full_state(
        self, room: str, link: Link | None, members: Sequence[MemberInfo], now: float
    ) -> list[Op]:
        """Our complete set of members in ``room`` (``link``: None if not open)."""
        if link is None:
            self.sent += 1
            seq = self.sent
        else:
            seq = self._next(link)
            link.pending.clear()  # superseded
            link.hash_written = now
            link.due = 0
        fields = {
            f"{m.origin}/{m.id}": codec.dumps({"s": seq, "m": codec.member_to_json(m)})
            for m in members
        }
        message = {"k": "f", "s": seq, "r": 1, "m": [codec.member_to_json(m) for m in members]}
        return [
            HashReplace(self.keys.members(room), self.replica_id + "/", fields, HASH_TTL_MS),
            Publish(self.keys.channel(room), self.envelope(message)),
        ]

    def ask(self, room: str, target: str | None = None) -> Publish:
        """A request to every replica (or only ``target``) for its full state in
        ``room``, saying where our numbering there stands."""
        link = self.links.get(room)
        message: dict[str, Any] = {"k": "q"}
        if link is not None:
            message.update(s=link.seq, r=1)
        if target is not None:
            message["t"] = target
        return Publish(self.keys.channel(room), self.envelope(message))

    def forget(self, origin: str) -> list[Op]:
        """Delete a forgotten replica's fields from the hashes of the rooms we have open."""
        prefix = origin + "/"
        return [HashReplace(self.keys.members(r), prefix, {}, 0) for r in self.links]

    # -- held client IDs ---------------------------------------------------------------

    def hold(self, room: str, held: Sequence[Held], now: float, wall: float) -> list[Op]:
        """Tell the others, and the hash, of client IDs held here."""
        wall_ms = wall * 1000
        fields = {}
        for h in held:
            name = f"{h.item}/{self.replica_id}"  # ours alone: we delete it when it lapses
            fields[name] = codec.dumps({"k": h.key, "u": round(wall_ms + h.seconds * 1000)})
            self._holds_out.append((now + h.seconds, room, name))
            self._holds_last[(room, name)] = now + h.seconds
        longest = max(h.seconds for h in held)
        message = {"k": "o", "h": [[h.item, h.key, round(h.seconds, 3)] for h in held]}
        # Before the leaves that follow (one ordered path): no replica sees the client ID
        # free in between.
        return [
            HashSet(self.keys.holds(room), fields, round(longest * 1000) + HOLD_MARGIN_MS),
            Publish(self.keys.channel(room), self.envelope(message)),
        ]

    def expire_holds(self, now: float) -> dict[str, list[str]]:
        """Our fields of holds that lapsed, by room (the key itself expires a grace after
        its last write, but a busy room's key may live on)."""
        lapsed: dict[str, list[str]] = {}
        while self._holds_out and self._holds_out[0][0] <= now:
            _, room, name = self._holds_out.popleft()
            if self._holds_last.get((room, name), 0.0) <= now:  # not held again since
                self._holds_last.pop((room, name), None)
                lapsed.setdefault(room, []).append(name)
        return lapsed

    def holds_lapsed(self, lapsed: dict[str, list[str]]) -> list[Op]:
        return [HashDel(self.keys.holds(room), names) for room, names in lapsed.items()]


def held_ids(data: Any) -> list[Held]:
    """Held client IDs from a message (``[[item, key, seconds], …]``); what is malformed
    is skipped."""
    held = []
    for entry in data if isinstance(data, list) else ():
        try:
            item, key, seconds = entry
            if isinstance(item, str) and (key is None or isinstance(key, str)):
                held.append(Held(item, key, min(float(seconds), MAX_HOLD_SECONDS)))
        except (TypeError, ValueError):
            continue
    return held
