"""Liveness: which other replicas are up, as heard from here. Sans-I/O: a plain object fed
the time and what was heard, answering with decisions; :mod:`.replication` acts on them.

It follows Phoenix.Tracker. A replica not heard for ``down_after`` is *down*: its members
leave our views. It is judged from heartbeats *received* (publishing works when Redis
refuses writes), and only while we hear our own heartbeats: a frozen Redis or a stalled
subscription is not taken for everyone's death. Anything from a down replica brings it
back up, and we ask it for its full state. A replica whose own timers ran late by more
than ``down_after`` (stopped, starved) knows the others gave up on it and re-announces
itself. After ``permdown_after`` of silence a replica is forgotten and its fields are
deleted from the hashes of the rooms we have open (other rooms' hashes keep them until
they expire; readers skip the fields of replicas whose liveness key is gone). A replica
that said goodbye deleted its own. One whose heartbeats say it speaks a protocol older
than ours reads is down for us while it runs (its members are not shown).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from presence.codecs import replica as codec

log = logging.getLogger("presence.replication")


@dataclass(slots=True)
class Peer:
    """Another replica, as heard from here."""

    last_seen: float
    down_since: float | None = None  # None while up
    gone: bool = False  # said goodbye: whatever comes after is a straggler
    protocol: int | None = None  # the format it speaks, once a heartbeat said
    refused: bool = False  # it speaks a format too old for this replica: not heard


@dataclass(frozen=True, slots=True)
class Heard:
    """What a message from another replica means for its liveness."""

    deliver: bool = True  # pass it on (False: a straggler, a goodbye, a refused replica's)
    down: bool = False  # it just went: its members leave (a goodbye, a protocol refused)
    back: bool = False  # it was down and is back: ask it for its state


@dataclass(slots=True)
class Judgement:
    """What :meth:`Liveness.judge` decided."""

    down: list[str] = field(default_factory=list)  # went down now: their members leave
    # Forgotten (permdown), with whether their fields must be deleted from the hashes of
    # the rooms we have open (not if they said goodbye: they deleted their own).
    forgotten: list[tuple[str, bool]] = field(default_factory=list)


class Liveness:
    def __init__(
        self, replica_id: str, replica_timeout: float = 5.0, permdown_after: float = 300.0
    ) -> None:
        self.replica_id = replica_id
        # A replica killed just after a heartbeat was last heard at the kill, and is
        # declared down at the first check after down_after: at most down_after +
        # check_interval (0.8 x replica_timeout) later; killed just before one, no sooner
        # than down_after - heartbeat_interval (0.5 x). The rest is slack for late timers
        # and the flush to clients. A live replica is declared down only after missing
        # three heartbeats in a row.
        self.replica_timeout = replica_timeout
        self.heartbeat_interval = replica_timeout / 5
        self.check_interval = replica_timeout / 10
        self.down_after = replica_timeout - self.heartbeat_interval - self.check_interval
        self.permdown_after = max(permdown_after, replica_timeout)
        self.peers: dict[str, Peer] = {}
        self._heard_self = -float("inf")  # when our last heartbeat came back to us
        self._last_tick: float | None = None
        self._last_beat = -float("inf")
        self.stalls = 0  # times this replica found its own timers far behind
        self.downs = 0  # times another replica was declared down

    @property
    def replicas_up(self) -> int:
        return sum(1 for p in self.peers.values() if p.down_since is None)

    # -- our own timers ----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._last_tick = now

    def stalled(self, now: float) -> bool:
        """Called on every check: whether our own timers ran so late (this process was
        stopped or starved) that the others have presumably given up on us, and we must
        say who we are again."""
        last, self._last_tick = self._last_tick, now
        if last is None or now - last <= self.down_after:
            return False
        self.stalls += 1
        late = round(now - last, 1)
        log.warning(
            f"this replica stalled for {late:g} s (over {self.down_after:g} s): "
            "announcing its members again",
            extra={"stalled_for": late},
        )
        return True

    def beat_due(self, now: float) -> bool:
        return now - self._last_beat >= self.heartbeat_interval

    def beat(self, now: float) -> None:
        """We sent a heartbeat."""
        self._last_beat = now

    def heard_self(self, now: float) -> None:
        """Our own heartbeat came back: the bus works."""
        self._heard_self = now

    def reconnected(self, now: float) -> None:
        """Back after an outage or a stall: we could not hear the others meanwhile."""
        for peer in self.peers.values():
            if peer.down_since is None:
                peer.last_seen = max(peer.last_seen, now)

    # -- the others --------------------------------------------------------------------

    def judge(self, now: float) -> Judgement:
        """Who went down, who is forgotten; called every ``check_interval``."""
        judged = Judgement()
        for origin, peer in list(self.peers.items()):
            silent = now - peer.last_seen
            if peer.down_since is None:
                # Silent for down_after while the bus demonstrably worked: our own
                # heartbeat came back after it had missed most of that time.
                heard = self._heard_self - peer.last_seen
                if silent > self.down_after and heard > self.down_after - self.heartbeat_interval:
                    self._down(origin, peer, now)
                    judged.down.append(origin)
            elif silent > self.permdown_after:
                del self.peers[origin]
                log.info("replica forgotten", extra={"replica": origin})
                judged.forgotten.append((origin, not peer.gone))
        return judged

    def _down(self, origin: str, peer: Peer, now: float) -> None:
        peer.down_since = now
        self.downs += 1
        silent = round(now - peer.last_seen, 1)
        log.info("replica down", extra={"replica": origin, "silent_for": silent})

    def heard(self, origin: str, message: dict[str, Any], now: float) -> Heard:
        """A message from ``origin`` (not from us)."""
        peer = self.peers.get(origin)
        if peer is None:
            peer = self.peers[origin] = Peer(now)
        elif peer.gone:
            return Heard(deliver=False)
        refused_now = False
        if message.get("k") == "h":
            refused_now = self._heard_protocol(origin, peer, message.get("v", 1), now)
        if peer.refused:
            # Down for us while it runs (its members are not shown); forgotten only once
            # silent, as any replica.
            peer.last_seen = now
            return Heard(deliver=False, down=refused_now)
        down_since, peer.down_since, peer.last_seen = peer.down_since, None, now
        if message.get("k") == "b":
            peer.gone, peer.down_since = True, now
            return Heard(deliver=False, down=True)
        if down_since is None:
            return Heard()
        log.info(
            "replica back: asking for its state",
            extra={"replica": origin, "down_for": round(now - down_since, 1)},
        )
        return Heard(back=True)

    def _heard_protocol(self, origin: str, peer: Peer, version: Any, now: float) -> bool:
        """A heartbeat said which format ``origin`` speaks: say so when it is not ours,
        and stop hearing it if it is too old (as if it had gone: its members leave).
        Returns whether it was refused now."""
        if version == peer.protocol or not isinstance(version, int):
            return False
        peer.protocol = version
        extra = {"replica": origin, "protocol": version, "ours": codec.PROTOCOL}
        if version < codec.OLDEST_PROTOCOL:
            peer.refused, peer.down_since = True, now
            log.warning(
                f"replica {origin} speaks replication protocol {version}, older than this "
                f"replica reads ({codec.OLDEST_PROTOCOL} to {codec.PROTOCOL}): not heard "
                "until it is upgraded; its members are not shown here",
                extra=extra,
            )
            return True
        if version != codec.PROTOCOL:
            log.info(
                f"replica {origin} speaks replication protocol {version} (this one "
                f"{codec.PROTOCOL}): relaying with it",
                extra=extra,
            )
        return False

    def knows(self, origin: str) -> bool:
        return origin in self.peers

    def heard_of(self, origin: str, left: float, now: float) -> None:
        """A replica never heard, whose liveness key has ``left`` seconds to go: it last
        beat ``down_after - left`` ago (no fresh grace period for one that just died)."""
        self.peers.setdefault(origin, Peer(now - self.down_after + left))

    def is_up(self, origin: str) -> bool:
        peer = self.peers.get(origin)
        return peer is not None and peer.down_since is None
