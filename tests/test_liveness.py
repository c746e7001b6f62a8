"""Liveness alone (presence.backplane.liveness): a plain object fed a fake clock and what
was heard; no bus, no sleeping."""

from __future__ import annotations

import pytest

from presence.backplane.liveness import Heard, Liveness
from presence.codecs import replica as codec

pytestmark = pytest.mark.unit

TIMEOUT = 5.0  # heartbeat 1 s, check 0.5 s, down after 3.5 s
PERMDOWN = 60.0
BEAT = {"k": "h", "v": codec.PROTOCOL}


class World:
    """Replica A's liveness, ticking every check_interval; B beats until killed. The bus
    works (A hears its own heartbeats) unless frozen."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.a = Liveness("A", TIMEOUT, PERMDOWN)
        self.a.start(self.now)
        self.b_alive = True
        self.frozen = False
        self.b_next_beat = self.now
        self.downs: list[tuple[str, float]] = []
        self.forgotten: list[tuple[str, bool, float]] = []

    def step(self) -> None:
        """One check interval of A's life (and B's heartbeats, as due meanwhile)."""
        start = self.now
        self.now += self.a.check_interval
        while self.b_alive and self.b_next_beat <= self.now:
            if not self.frozen:
                self.a.heard("B", BEAT, max(start, self.b_next_beat))
            self.b_next_beat += self.a.heartbeat_interval
        assert not self.a.stalled(self.now)
        if self.a.beat_due(self.now):
            self.a.beat(self.now)
            if not self.frozen:
                self.a.heard_self(self.now)  # it comes back at once
        judged = self.a.judge(self.now)
        self.downs += [(o, self.now) for o in judged.down]
        self.forgotten += [(o, clean, self.now) for o, clean in judged.forgotten]

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.a.check_interval)):
            self.step()


def test_timings_follow_the_replica_timeout() -> None:
    live = Liveness("A", TIMEOUT, PERMDOWN)
    assert (live.heartbeat_interval, live.check_interval, live.down_after) == (1.0, 0.5, 3.5)
    assert Liveness("A", 10.0, 5.0).permdown_after == 10.0  # never before the timeout


@pytest.mark.parametrize("phase", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_a_dead_replica_goes_down_within_the_bounds(phase: float) -> None:
    w = World()
    w.run(3.0)
    w.now += phase  # any phase of B's heartbeat and A's checks
    w.b_next_beat = max(w.b_next_beat, w.now)
    w.run(2.0)
    assert w.a.replicas_up == 1 and not w.downs
    killed = w.now
    w.b_alive = False
    w.run(2 * TIMEOUT)
    ((origin, when),) = w.downs
    assert origin == "B" and w.a.downs == 1 and w.a.replicas_up == 0
    # Heard last at most one heartbeat before the kill; down after down_after of
    # silence, noticed at the next check.
    assert 0.5 * TIMEOUT <= when - killed <= 0.8 * TIMEOUT + 1e-9
    assert not w.a.is_up("B") and w.a.knows("B")


def test_a_live_replica_is_not_taken_down() -> None:
    w = World()
    w.run(10 * TIMEOUT)
    assert not w.downs and w.a.is_up("B") and w.a.replicas_up == 1


def test_no_false_down_while_our_own_heartbeats_do_not_come_back() -> None:
    w = World()
    w.run(2.0)
    w.frozen = True  # Redis frozen: nothing is heard, not even ourselves
    w.run(3 * TIMEOUT)
    assert not w.downs and w.a.is_up("B")
    # Thawed (the transport tells: reconnected), B dead meanwhile: down once the bus
    # has demonstrably worked for down_after.
    w.frozen, w.b_alive = False, False
    back = w.now
    w.a.reconnected(w.now)
    w.run(2 * TIMEOUT)
    ((_, when),) = w.downs
    assert TIMEOUT * 0.5 <= when - back <= TIMEOUT * 0.8 + 1e-9


def test_a_down_replica_is_forgotten_after_permdown_and_its_fields_cleaned() -> None:
    w = World()
    w.run(2.0)
    w.b_alive = False
    w.run(TIMEOUT)
    assert w.downs and not w.forgotten
    w.run(PERMDOWN)
    ((origin, clean, when),) = w.forgotten
    assert origin == "B" and clean and not w.a.knows("B")
    # Silent for permdown_after (down after down_after of silence, noticed at a check).
    assert abs(when - w.downs[0][1] + w.a.down_after - PERMDOWN) <= w.a.check_interval + 1e-9


def test_anything_from_a_down_replica_brings_it_back() -> None:
    w = World()
    w.run(2.0)
    w.b_alive = False
    w.run(TIMEOUT)
    assert not w.a.is_up("B")
    assert w.a.heard("B", {"k": "e", "s": 9}, w.now) == Heard(back=True)
    assert w.a.is_up("B")
    assert w.a.heard("B", BEAT, w.now) == Heard()  # up already: nothing to ask


def test_our_own_timers_running_late_is_a_stall() -> None:
    live = Liveness("A", TIMEOUT, PERMDOWN)
    now = 1000.0
    live.start(now)
    for _ in range(20):
        now += live.check_interval
        assert not live.stalled(now)
    now += live.down_after  # late, but not past down_after
    assert not live.stalled(now)
    now += live.down_after + 0.1  # stopped (SIGSTOP) or starved past it
    assert live.stalled(now) and live.stalls == 1
    now += live.check_interval
    assert not live.stalled(now) and live.stalls == 1


def test_a_beat_is_due_every_heartbeat_interval() -> None:
    live = Liveness("A", TIMEOUT, PERMDOWN)
    assert live.beat_due(0.0)
    live.beat(0.0)
    assert not live.beat_due(0.5) and live.beat_due(1.0)


def test_a_goodbye_takes_a_replica_down_at_once_and_stragglers_are_ignored() -> None:
    w = World()
    w.run(2.0)
    assert w.a.heard("B", {"k": "b"}, w.now) == Heard(deliver=False, down=True)
    assert not w.a.is_up("B") and w.a.downs == 0  # gone, not lost
    assert w.a.heard("B", {"k": "e", "s": 99}, w.now) == Heard(deliver=False)
    assert not w.a.is_up("B")
    w.b_alive = False
    w.run(PERMDOWN + TIMEOUT)
    ((origin, clean, _),) = w.forgotten
    assert origin == "B" and not clean  # it deleted its own fields


def test_replicas_of_older_protocols_are_heard_and_one_too_old_is_refused() -> None:
    live = Liveness("A", TIMEOUT, PERMDOWN)
    live.start(0.0)
    # A replica of the previous release: its heartbeats carry no version (1).
    assert live.heard("C", {"k": "h"}, 0.0) == Heard()
    assert live.peers["C"].protocol == 1 and live.is_up("C")
    # One older than this replica reads: down for us at once, said once.
    old = {"k": "h", "v": codec.OLDEST_PROTOCOL - 1}
    assert live.heard("B", old, 0.0) == Heard(deliver=False, down=True)
    assert live.heard("B", {"k": "e", "s": 1}, 0.5) == Heard(deliver=False)
    assert not live.is_up("B")
    # It keeps beating: never forgotten while it runs.
    now = 0.0
    for _ in range(round((PERMDOWN + TIMEOUT) / live.check_interval)):
        now += live.check_interval
        if live.beat_due(now):
            live.beat(now)
            live.heard_self(now)
            assert live.heard("B", old, now) == Heard(deliver=False)
            live.heard("C", {"k": "h"}, now)
        judged = live.judge(now)
        assert not judged.down and not judged.forgotten
    assert live.knows("B") and not live.is_up("B") and live.is_up("C")


def test_a_replica_never_heard_is_judged_by_its_liveness_key() -> None:
    live = Liveness("A", TIMEOUT, PERMDOWN)
    live.start(0.0)
    live.heard_of("D", 1.0, 100.0)  # its key has 1 s left: it beat 2.5 s ago
    assert live.is_up("D") and live.peers["D"].last_seen == 100.0 - live.down_after + 1.0
    live.heard_self(101.5)
    assert live.judge(101.5).down == ["D"]  # silent for down_after: no fresh grace
