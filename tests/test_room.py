"""The room's rules, driven by explicit times: no sleeps anywhere."""

import orjson
import pytest

from presence.core.colors import PALETTE
from presence.core.events import (
    Active,
    Batch,
    Event,
    Idle,
    Joined,
    Left,
    MemberInfo,
    Updated,
    apply_patch,
)
from presence.core.identity import DECLARED_PREFIX, Identity
from presence.core.room import (
    Room,
    RoomStateTooLarge,
    StateTooLarge,
    Timing,
    UnknownMember,
    is_valid_room_name,
)

pytestmark = pytest.mark.unit


def ident(name: str, color: str | None = None) -> Identity:
    # Different names, different colours: a shared one would be changed by the room.
    return Identity(name.lower(), name, name[:1], color or PALETTE[sum(map(ord, name)) % 16])


def events(room: Room) -> list[Event]:
    local, remote = room.take()
    local.extend(remote)
    return local.events()


def new_room(**kw: object) -> Room:
    return Room("r", timing=Timing(idle_after=3, expire_after=30), replica="A", **kw)  # type: ignore[arg-type]


def test_join_update_leave_events() -> None:
    room = new_room()
    room.join("a", ident("Ann"), now=0)
    [joined] = events(room)
    assert isinstance(joined, Joined) and joined.member.identity.name == "Ann"
    room.update("a", {"cursor": {"x": 1, "y": 2}}, now=1)
    assert events(room) == [Updated("a", {"cursor": {"x": 1, "y": 2}})]
    room.leave("a")
    assert events(room) == [Left("a")]
    assert room.is_empty


def test_update_merges_fields_and_null_removes() -> None:
    room = new_room()
    room.join("a", ident("Ann"), 0)
    room.update("a", {"cursor": {"x": 1}, "tool": "pen"}, 1)
    room.update("a", {"cursor": None, "color": "x"}, 2)
    assert room.member("a").state == {"tool": "pen", "color": "x"}


def test_names_stay_unique_in_a_room() -> None:
    room = new_room()
    assert room.join("a", ident("Ann"), 0).name == "Ann"
    assert room.join("b", ident("Ann"), 0).name == "Ann 2"
    assert room.names() == {"Ann", "Ann 2"}
    events(room)
    # When the holder leaves, b gets its own name back, announced as a join of b.
    room.leave("a")
    rejoined, left = events(room)
    assert left == Left("a")
    assert isinstance(rejoined, Joined) and rejoined.member.identity.name == "Ann"
    assert rejoined.member.identity.initials == "A"
    assert room.join("c", ident("Ann"), 0).name == "Ann 2"


def test_concurrent_joins_on_two_replicas_settle_on_unique_names() -> None:
    # Replica A and replica B both gave "Ann" away before hearing of each other.
    a = Room("r", replica="A")
    b = Room("r", replica="B")
    a.join("m1", ident("Ann"), 0)
    b.join("m2", ident("Ann"), 0)
    a_events, _ = a.take()
    b_events, _ = b.take()
    a.apply(b_events.events())
    b.apply(a_events.events())
    # The smaller id keeps the name; B renames its own member and says so.
    assert a.member("m1").identity.name == "Ann"
    renamed, _ = b.take()
    [join] = renamed.events()
    assert isinstance(join, Joined) and join.member.identity.name == "Ann 2"
    a.apply(renamed.events())
    assert a.names() == b.names() == {"Ann", "Ann 2"}
    # m1 leaves: m2 takes its name back, on both replicas.
    a.leave("m1")
    gone, _ = a.take()
    b.apply(gone.events())
    back, _ = b.take()
    a.apply(back.events())
    assert a.names() == b.names() == {"Ann"}


def test_idle_after_quiet_period_then_active_on_update() -> None:
    room = new_room()
    room.join("a", ident("Ann"), 0)
    room.update("a", {"cursor": {"x": 1}}, 1)
    events(room)
    room.tick(3.9)
    assert events(room) == []
    room.tick(4.0)
    assert events(room) == [Idle("a")]
    room.tick(5)
    assert events(room) == []  # idle is announced once
    room.update("a", {"cursor": {"x": 2}}, 6)
    assert events(room) == [Updated("a", {"cursor": {"x": 2}}), Active("a")]


def test_heartbeat_keeps_member_but_not_label() -> None:
    room = new_room()
    room.join("a", ident("Ann"), 0)
    events(room)
    for t in range(10, 100, 10):
        room.heartbeat("a", t)
        assert room.tick(t) == []
    assert "a" in room
    assert room.member("a").idle


def test_expire_after_silence() -> None:
    room = new_room()
    room.join("a", ident("Ann"), 0)
    room.join("b", ident("Bob"), 0)
    room.heartbeat("b", 20)
    events(room)
    assert room.tick(29.9) == []
    assert events(room) == [Idle("a"), Idle("b")]
    assert room.tick(30) == ["a"]
    assert events(room) == [Left("a")]
    assert room.tick(50) == ["b"]
    assert room.is_empty


def test_state_size_is_limited_and_a_refused_update_changes_nothing() -> None:
    room = new_room(max_state_bytes=100)
    room.join("a", ident("Ann"), 0)
    room.update("a", {"k": "x" * 50}, 1)
    events(room)
    with pytest.raises(StateTooLarge):
        room.update("a", {"j": "y" * 60}, 2)
    assert room.member("a").state == {"k": "x" * 50}
    assert events(room) == []


def test_only_local_members_can_be_commanded() -> None:
    room = new_room()
    remote = MemberInfo("z", ident("Zed"), {}, False, "B")
    room.apply([Joined(remote)])
    with pytest.raises(UnknownMember):
        room.update("z", {"x": 1}, 0)
    with pytest.raises(UnknownMember):
        room.update("nobody", {"x": 1}, 0)


def test_remote_events_apply_and_fan_out_but_are_not_republished() -> None:
    room = new_room()
    room.join("a", ident("Ann"), 0)
    room.take()
    room.apply(
        [Joined(MemberInfo("z", ident("Zed"), {}, False, "B")), Updated("z", {"cursor": {"x": 5}})]
    )
    local, remote = room.take()
    assert not local
    [joined] = remote.events()
    assert isinstance(joined, Joined) and joined.member.state == {"cursor": {"x": 5}}
    # Another replica cannot speak for our members.
    room.apply(
        [
            Updated("a", {"hijack": True}),
            Left("a"),
            Joined(MemberInfo("a", ident("Evil"), {}, False, "A")),
        ]
    )
    assert room.member("a").identity.name == "Ann"
    assert room.member("a").state == {}
    # Remote members neither idle nor expire here: their replica decides.
    assert room.tick(1000) == ["a"]
    assert "z" in room
    room.drop_origin("B")
    assert room.is_empty
    assert events(room) == [Left("a"), Left("z")]


def test_late_joiner_snapshot_plus_events_equals_what_earlier_members_see() -> None:
    room = new_room()
    early: dict[str, dict[str, object]] = {}  # what an early member's client holds

    def deliver(view: dict[str, dict[str, object]], batch: list[Event]) -> None:
        for e in batch:
            if isinstance(e, Joined):
                view[e.member.id] = dict(e.member.state)
            elif isinstance(e, Updated) and e.id in view:
                apply_patch(view[e.id], e.patch)
            elif isinstance(e, Left):
                view.pop(e.id, None)

    room.join("a", ident("Ann"), 0)
    room.join("b", ident("Bob"), 0)
    room.update("a", {"cursor": {"x": 1}}, 1)
    deliver(early, events(room))
    room.update("b", {"sel": 1}, 2)  # pending when the late joiner arrives
    room.join("c", ident("Cy"), 2)
    late = {m.id: dict(m.state) for m in room.snapshot()}
    room.update("a", {"cursor": {"x": 2}}, 3)
    room.leave("b")
    batch = events(room)
    deliver(early, batch)
    deliver(late, batch)
    assert late == early == {"a": {"cursor": {"x": 2}}, "c": {}}


def test_batch_coalesces_latest_state_per_member() -> None:
    batch = Batch()
    for x in range(5):
        batch.add(Updated("a", {"cursor": {"x": x}, f"f{x}": x}))
    batch.add(Updated("b", {"cursor": {"x": 9}}))
    assert batch.coalesced == 4
    assert batch.events() == [
        Updated("a", {"cursor": {"x": 4}, "f0": 0, "f1": 1, "f2": 2, "f3": 3, "f4": 4}),
        Updated("b", {"cursor": {"x": 9}}),
    ]


def test_batch_join_then_leave_cancels_and_updates_fold_into_join() -> None:
    batch = Batch()
    batch.add(Joined(MemberInfo("a", ident("Ann"), {}, False, "A")))
    batch.add(Updated("a", {"cursor": {"x": 1}}))
    batch.add(Idle("a"))
    [joined] = batch.events()
    assert isinstance(joined, Joined)
    assert joined.member.state == {"cursor": {"x": 1}} and joined.member.idle
    batch.add(Left("a"))
    assert batch.events() == []


def test_batch_idle_then_update_is_active() -> None:
    batch = Batch()
    batch.add(Idle("a"))
    batch.add(Updated("a", {"x": 1}))
    batch.add(Active("a"))
    batch.add(Updated("b", {"x": 1}))
    batch.add(Left("b"))
    assert batch.events() == [Updated("a", {"x": 1}), Active("a"), Left("b")]


def test_merged_batches_equal_sequential_delivery() -> None:
    first, second = Batch(), Batch()
    first.add(Joined(MemberInfo("a", ident("Ann"), {}, False, "A")))
    first.add(Updated("b", {"x": 1, "y": 1}))
    second.add(Updated("a", {"x": 2}))
    second.add(Updated("b", {"y": None}))
    second.add(Left("c"))
    merged = Batch()
    merged.extend(first)
    merged.extend(second)
    [j, u, left] = merged.events()
    assert isinstance(j, Joined) and j.member.state == {"x": 2}
    assert u == Updated("b", {"x": 1, "y": None})
    assert left == Left("c")
    # The shared batches are left untouched (other connections still send them).
    assert first.events()[0].member.state == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name,ok",
    [
        ("notebook", True),
        ("json:notebook:3f2a-11", True),
        ("a.b_c~d-e", True),
        ("x" * 128, True),
        ("", False),
        ("x" * 129, False),
        ("a b", False),
        ("a/b", True),  # a hub server's room: alice/:doc
        ("alice@example.org/gpu:doc", True),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("a/events", False),  # GET /rooms/a/events is the stream of room a
        ("events", True),
        ("é", False),
        ("{room}", False),
    ],
)
def test_room_names(name: str, ok: bool) -> None:
    assert is_valid_room_name(name) is ok


def test_a_second_connection_of_one_identity_gets_its_own_colour_and_initials() -> None:
    # Two tabs of one browser: one token, so one name and colour asked for twice.
    room = new_room()
    io = Identity("u1", "Anonymous Io", "AI", "#0072B2")
    first = room.join("a", io, 0)
    second = room.join("b", io, 0)
    assert (first.name, first.initials, first.color) == ("Anonymous Io", "AI", "#0072B2")
    assert second.name == "Anonymous Io 2" and second.username == "u1"
    assert second.initials not in ("AI", "") and second.color != "#0072B2"
    events(room)
    # The first tab closes: the second gets the person's own name, initials and colour.
    room.leave("a")
    rejoined, _left = events(room)
    assert isinstance(rejoined, Joined)
    assert (rejoined.member.identity.name, rejoined.member.identity.initials) == (
        "Anonymous Io",
        "AI",
    )
    assert rejoined.member.identity.color == "#0072B2"


def test_initials_are_unique_among_live_members() -> None:
    room = new_room()
    names = ["Anonymous Europa", "Anonymous Elara", "Anonymous Ersa", "Anonymous Io 2"]
    shown = [
        room.join(f"m{i}", Identity(f"u{i}", n, "", "#0072B2"), 0) for i, n in enumerate(names)
    ]
    assert [s.initials for s in shown] == ["AE", "EL", "ER", "AI"]
    # More members than two letters of the name allow: still all different.
    for i in range(200):
        room.join(f"x{i:03}", Identity(f"v{i}", "Anonymous Europa", "", "#0072B2"), 0)
    marks = [m.identity.initials for m in room.snapshot()]
    assert len(set(marks)) == len(marks) == 204
    assert all(2 <= len(m) <= 3 and m.isupper() for m in marks)  # "E12" for Europa 12


def test_colours_stay_distinct_while_the_palette_lasts_then_repeat() -> None:
    room = new_room()
    same = Identity("u", "Ann", "A", "#0072B2")
    for i in range(len(PALETTE)):
        room.join(f"m{i:02}", same, 0)
    assert sorted(room.colors()) == sorted(PALETTE)
    room.join("m99", same, 0)  # no colour left: one repeats, nothing fails
    assert len(set(room.colors())) == len(PALETTE)


def test_a_clients_own_colour_is_kept() -> None:
    room = new_room()
    room.join("a", Identity("u1", "Ann", "A", "#0072B2"), 0)
    declared = Identity(DECLARED_PREFIX + "7", "Bob", "B", "#0072B2")
    assert room.join("y7", declared, 0).color == "#0072B2"


def test_concurrent_joins_on_two_replicas_settle_on_distinct_colours_and_initials() -> None:
    a = Room("r", replica="A")
    b = Room("r", replica="B")
    a.join("m1", Identity("u1", "Anonymous Europa", "AE", "#0072B2"), 0)
    b.join("m2", Identity("u2", "Anonymous Elara", "AE", "#0072B2"), 0)
    a_events, _ = a.take()
    b_events, _ = b.take()
    a.apply(b_events.events())
    b.apply(a_events.events())
    changed, _ = b.take()
    a.apply(changed.events())
    for room in (a, b):
        m1, m2 = room.member("m1").identity, room.member("m2").identity
        assert (m1.initials, m1.color) == ("AE", "#0072B2")  # the smaller id keeps them
        assert m2.initials == "EL" and m2.color != "#0072B2"
    assert a.take()[0].events() == []  # settled: nothing more to say


def test_a_member_announced_again_then_gone_in_one_batch_still_leaves() -> None:
    # Two tabs of one token: when the first closes, the second is renamed (a join of a
    # member everyone knows); when it closes in the same tick, peers must hear its leave.
    room = new_room()
    io = Identity("u1", "Anonymous Io", "AI", "#0072B2")
    room.join("a", io, 0)
    room.join("b", io, 0)
    events(room)
    room.leave("a")
    room.leave("b")
    assert events(room) == [Left("a"), Left("b")]
    # The same for a replica that relays another's members to its own clients.
    other = Room("r", replica="B")
    other.apply([Joined(MemberInfo("m", io, {}, False, "A"))])
    other.take()
    renamed = Identity("u1", "Anonymous Io 2", "I2", "#E69F00")
    other.apply([Joined(MemberInfo("m", renamed, {}, False, "A"))])
    other.apply([Left("m")])
    assert [type(e) for e in events(other)] == [Left]


def test_a_member_that_joins_is_announced_again_and_leaves_in_one_batch_is_news_to_none() -> None:
    # Two tabs of one token: b joins as "Io 2", a leaves, b gets "Io" back (a join again),
    # then b leaves, all in one tick: peers never saw b, so they hear nothing of it.
    room = new_room()
    io = Identity("u1", "Anonymous Io", "AI", "#0072B2")
    room.join("a", io, 0)
    events(room)
    room.join("b", io, 0)
    room.leave("a")
    room.leave("b")
    assert events(room) == [Left("a")]
    batch = Batch()
    batch.add(Joined(MemberInfo("c", io, {}, False, "A")))
    batch.add(Joined(MemberInfo("c", io, {"x": 1}, False, "A"), again=True))
    batch.add(Left("c"))
    assert batch.events() == []


def test_a_resync_tells_json_values_apart() -> None:
    # During a backplane outage, a member's field went from 1 to true: Python's 1 == True
    # must not hide the change when its replica re-announces its members.
    room = new_room()
    room.apply([Joined(MemberInfo("m", ident("Max"), {"x": 1, "d": {"n": 1}}, False, "B"))])
    room.take()
    room.sync_origin("B", [MemberInfo("m", ident("Max"), {"x": 1, "d": {"n": 1}}, False, "B")])
    assert events(room) == []
    room.sync_origin("B", [MemberInfo("m", ident("Max"), {"x": True, "d": {"n": 1}}, False, "B")])
    [event] = events(room)
    assert isinstance(event, Joined) and event.member.state["x"] is True
    room.sync_origin("B", [MemberInfo("m", ident("Max"), {"x": True, "d": {"n": 1.0}}, False, "B")])
    [event] = events(room)
    assert isinstance(event, Joined) and event.member.state["d"] == {"n": 1.0}
    assert room.member("m").state["d"]["n"] == 1.0 and isinstance(
        room.member("m").state["d"]["n"], float
    )


# -- the room's state budget (max_room_state_bytes) --------------------------------------


def blob(n: int) -> dict[str, str]:
    """A state of exactly ``n`` bytes of JSON."""
    state = {"b": ""}
    state["b"] = "x" * (n - len(orjson.dumps(state)))
    assert len(orjson.dumps(state)) == n
    return state


def counted(room: Room) -> int:
    """What the room's states weigh, encoded afresh: what ``state_bytes`` must equal."""
    return sum(len(orjson.dumps(m.state)) for m in room.snapshot() if m.state)


def test_updates_that_would_grow_the_room_past_its_budget_are_refused() -> None:
    room = new_room(max_state_bytes=1000, max_room_state_bytes=2500)
    room.join("a", ident("Ann"), now=0)
    room.join("b", ident("Bo"), now=0)
    room.join("c", ident("Cy"), now=0)
    assert room.state_bytes == 0  # empty states cost nothing: joining is never refused
    room.update("a", blob(1000), now=1)
    room.update("b", blob(1000), now=1)
    events(room)
    with pytest.raises(RoomStateTooLarge) as refused:
        room.update("c", blob(600), now=2)
    assert refused.value.code == "room_state_too_large"
    assert room.member("c").state == {} and events(room) == []  # dropped, nothing sent
    room.update("c", blob(500), now=2)  # exactly the budget
    assert room.state_bytes == counted(room) == 2500
    with pytest.raises(RoomStateTooLarge):
        room.update("c", {"more": 1}, now=3)
    room.update("a", blob(400), now=3)  # shrinking is always allowed
    room.update("c", blob(1000), now=3)  # ... and frees room for others
    assert room.state_bytes == counted(room) == 2400
    room.leave("b")
    assert room.state_bytes == counted(room) == 1400
    room.tick(now=100)  # everybody expires
    assert room.state_bytes == 0


def test_a_member_state_over_its_own_limit_is_state_too_large_first() -> None:
    room = new_room(max_state_bytes=100, max_room_state_bytes=150)
    room.join("a", ident("Ann"), now=0)
    with pytest.raises(StateTooLarge):
        room.update("a", blob(101), now=1)
    room.update("a", blob(100), now=1)
    room.join("b", ident("Bo"), now=1)
    with pytest.raises(RoomStateTooLarge):
        room.update("b", blob(51), now=1)


def test_whole_states_count_their_stored_size_and_joins_with_a_state_are_refused() -> None:
    room = new_room(max_state_bytes=1000, max_room_state_bytes=1500)
    room.join("y1", ident("Ann"), now=0, state={"pad": "x" * 890})
    assert room.state_bytes == len(orjson.dumps({"pad": "x" * 890}))
    with pytest.raises(RoomStateTooLarge):
        room.join("y2", ident("Bo"), now=0, state={"pad": "x" * 690})
    assert "y2" not in room and room.state_bytes == 900
    room.join("y2", ident("Bo"), now=0, state={"pad": "x" * 590})
    with pytest.raises(RoomStateTooLarge):
        room.replace("y1", {"pad": "x" * 891}, now=1)
    assert room.member("y1").state == {"pad": "x" * 890}
    room.replace("y1", {"cursor": 3}, now=1)
    assert room.state_bytes == len(orjson.dumps({"cursor": 3})) + 600
    room.replace("y2", {}, now=2)
    assert room.state_bytes == len(orjson.dumps({"cursor": 3}))
    # Counted as stored, not as sent: 4 bytes of "1e15" are 18 once parsed.
    room.replace("y2", {"n": [1e15] * 10}, now=3)
    assert room.member("y2").state == {"n": [1e15] * 10}
    assert room.state_bytes == len(orjson.dumps({"cursor": 3})) + len(
        b'{"n":[' + b",".join([b"1000000000000000.0"] * 10) + b"]}"
    )


def test_other_replicas_states_count_but_are_never_refused() -> None:
    """A remote state is applied whatever the total (refusing it would leave this replica
    out of step with the others); it counts against local growth."""
    room = new_room(max_state_bytes=1000, max_room_state_bytes=1500)
    room.join("a", ident("Ann"), now=0)
    room.apply([Joined(MemberInfo("z", ident("Zed"), blob(1000), False, "B"))])
    assert room.state_bytes == 1000
    with pytest.raises(RoomStateTooLarge):
        room.update("a", blob(600), now=1)
    room.apply([Joined(MemberInfo("w", ident("Wu"), blob(900), False, "B"))])
    room.apply([Updated("w", blob(1000))])  # over budget: applied all the same
    assert room.state_bytes == counted(room) == 2000
    with pytest.raises(RoomStateTooLarge):
        room.update("a", {"x": 1}, now=1)
    room.apply([Left("w")])
    assert room.state_bytes == counted(room) == 1000
    room.sync_origin("B", [MemberInfo("v", ident("Vi"), blob(300), False, "B")])
    assert room.state_bytes == counted(room) == 300
    room.update("a", blob(1000), now=2)
    room.drop_origin("B")
    assert room.state_bytes == counted(room) == 1000


def test_a_snapshot_stays_within_the_budget_whatever_members_send() -> None:
    """100 members with 16 KiB states: 1.6 MB of states without a budget; with one of
    64 KiB, the snapshot's states stay within it."""
    room = new_room(max_room_state_bytes=64 * 1024)
    refused = 0
    for i in range(100):
        room.join(f"m{i}", ident(f"M{i}"), now=0)
        try:
            room.update(f"m{i}", blob(16 * 1024), now=0)
        except RoomStateTooLarge:
            refused += 1
    assert refused == 96
    assert room.state_bytes == counted(room) == 64 * 1024
