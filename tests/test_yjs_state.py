"""Yjs whole states in process: kept exactly by the room (``null`` fields included),
relayed exactly to Yjs peers on this and other replicas, translated for JSON peers."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import orjson
import pytest

import presence.yjs.codec
from presence.backplane.memory import MemoryBackplane
from presence.codecs import json as json_codec
from presence.codecs import replica
from presence.config import Settings
from presence.core.events import Batch, Joined, MemberInfo, Updated
from presence.core.identity import Identity, IdentityFactory
from presence.core.room import Room, StateTooLarge
from presence.hub.hub import Hub
from presence.yjs.codec import awareness_message, read_awareness, read_message, yjs_state
from presence.yjs.view import YjsView

pytestmark = pytest.mark.unit

ADA = Identity("u1", "Ada", "AD", "#0072B2")
BOB = Identity("u2", "Bob", "BO", "#E69F00")
OWNERS = {"user": {"name": "Ada", "color": "#123456"}, "cursor": None, "x": 1}


def joined_room(state: dict[str, Any] | None = None) -> Room:
    room = Room("doc", replica="r1")
    room.join("y1", ADA, 0.0, state)
    room.take()
    return room


def events(room: Room) -> list[Any]:
    return room.take()[0].events()


def test_a_whole_state_is_kept_with_its_null_fields() -> None:
    room = Room("doc", replica="r1")
    room.join("y1", ADA, 0.0, OWNERS)
    assert room.member("y1").state == OWNERS
    [event] = events(room)
    assert isinstance(event, Joined) and event.member.state == OWNERS


def test_changed_fields_go_as_a_patch_naming_the_fields_gone_null() -> None:
    room = joined_room({"cursor": {"anchor": 1}, "x": 1, "old": 2})
    room.replace("y1", {"cursor": {"anchor": 2}, "x": 1}, 1.0)
    assert events(room) == [Updated("y1", {"cursor": {"anchor": 2}, "old": None})]
    # A patch's null removes a field, unless the patch names it as a null value.
    room.replace("y1", {"cursor": None, "x": 1, "new": None}, 2.0)
    assert events(room) == [
        Updated("y1", {"cursor": None, "new": None}, frozenset({"cursor", "new"}))
    ]
    assert room.member("y1").state == {"cursor": None, "x": 1, "new": None}
    # null -> absent is a removal, null -> value an update: plain patches.
    room.replace("y1", {"x": 1, "new": 3}, 3.0)
    [event] = events(room)
    assert event == Updated("y1", {"cursor": None, "new": 3}) and not event.nulls
    assert room.member("y1").state == {"x": 1, "new": 3}


def test_a_batch_keeps_the_latest_word_on_each_null() -> None:
    batch = Batch()
    batch.add(Updated("y1", {"cursor": None, "x": 1}, frozenset({"cursor"})))
    batch.add(Updated("y1", {"x": None, "sel": None}, frozenset({"x"})))
    assert batch.events() == [
        Updated("y1", {"cursor": None, "x": None, "sel": None}, frozenset({"cursor", "x"}))
    ]
    batch.add(Updated("y1", {"cursor": 5, "x": None}))  # the cursor is back, x removed
    [event] = batch.events()
    assert event == Updated("y1", {"cursor": 5, "x": None, "sel": None}) and not event.nulls
    # Folded into a join of the same batch: the null stays a value in the state.
    batch = Batch()
    batch.add(Joined(MemberInfo("y2", BOB, {"cursor": 1, "x": 1}, False, "r1")))
    batch.add(Updated("y2", {"cursor": None, "x": None}, frozenset({"cursor"})))
    [joined] = batch.events()
    assert isinstance(joined, Joined) and joined.member.state == {"cursor": None}


def test_an_unchanged_state_is_a_heartbeat_and_json_types_count() -> None:
    room = joined_room({"x": 1, "flag": True, "deep": {"n": 1}})
    room.replace("y1", {"x": 1, "flag": True, "deep": {"n": 1}}, 1.0)
    assert events(room) == []
    # Python's 1 == True == 1.0; JSON's (and JavaScript's) true is no number.
    room.replace("y1", {"x": True, "flag": True, "deep": {"n": True}}, 2.0)
    assert events(room) == [Updated("y1", {"x": True, "deep": {"n": True}})]


def test_an_oversized_whole_state_changes_nothing() -> None:
    room = joined_room({"x": 1})
    with pytest.raises(StateTooLarge):
        room.replace("y1", {"x": "a" * 20_000}, 1.0)
    assert room.member("y1").state == {"x": 1} and events(room) == []
    with pytest.raises(StateTooLarge):
        room.join("y2", BOB, 1.0, {"x": "a" * 20_000})
    assert "y2" not in room


def over_the_backplane(events: list[Any]) -> list[Any]:
    return replica.events_from_json(orjson.loads(orjson.dumps(replica.events_to_json(events))))


def test_other_replicas_get_the_null_fields_too() -> None:
    here, there = joined_room({"cursor": {"anchor": 1}}), Room("doc", replica="r2")
    there.apply(over_the_backplane([Joined(here.member("y1"))]))
    there.take()
    here.replace("y1", {"cursor": None, "x": 1}, 1.0)
    there.apply(over_the_backplane(events(here)))
    assert there.member("y1").state == {"cursor": None, "x": 1}
    # ...and pass them on to their own peers as null values.
    [event] = there.take()[1].events()
    assert event == Updated("y1", {"cursor": None, "x": 1}, frozenset({"cursor"}))
    here.replace("y1", {"x": 1}, 2.0)
    there.apply(over_the_backplane(events(here)))
    assert there.member("y1").state == {"x": 1}


def test_the_replica_format_adds_the_nulls_only_when_there_are_some() -> None:
    plain, nulls = Updated("y1", {"x": None}), Updated("y1", {"x": None}, frozenset({"x"}))
    assert replica.events_to_json([plain, nulls]) == [
        ["u", "y1", {"x": None}],
        ["u", "y1", {"x": None}, ["x"]],
    ]
    # A replica of an older version sends no 4th item; one that does not know it ignores it.
    assert replica.events_from_json([["u", "y1", {"x": None}]]) == [plain]


def test_json_peers_see_a_null_field_as_absent() -> None:
    room = joined_room(OWNERS)
    member = room.member("y1")
    assert json_codec.member_json(member)["state"] == {"user": OWNERS["user"], "x": 1}
    assert member.state == OWNERS  # the translation is a copy
    # A field gone null reaches JSON peers as an update that removes it (what y-codemirror
    # does on blur: JSON apps listening for "update" drop the cursor).
    room.replace("y1", {**OWNERS, "x": 2, "cursor": {"anchor": 1}}, 1.0)
    room.take()
    room.replace("y1", {**OWNERS, "x": 2, "cursor": None}, 2.0)
    [frame] = json_codec.encode_batch(room.take()[0])
    assert orjson.loads(frame) == {
        "type": "update",
        "updates": [{"id": "y1", "state": {"cursor": None}}],
    }
    # A join carries the state without its null fields.
    batch = Batch()
    batch.add(Joined(room.member("y1")))
    [frame] = json_codec.encode_batch(batch)
    assert orjson.loads(frame)["members"][0]["state"] == {"user": OWNERS["user"], "x": 2}


def test_yjs_peers_see_the_owners_state_plus_the_idle_mark() -> None:
    room = joined_room(OWNERS)
    assert yjs_state(room.member("y1")) == {**OWNERS, "presence": {"idle": False}}
    # A user is added only to a state that has none; a null user is the owner's.
    room.replace("y1", {"user": None, "cursor": None}, 1.0)
    assert yjs_state(room.member("y1"))["user"] is None
    room.replace("y1", {"cursor": None}, 2.0)
    assert yjs_state(room.member("y1"))["user"]["name"] == "Ada"


def test_the_view_encodes_the_exact_state_with_server_clocks() -> None:
    room = joined_room(OWNERS)
    hub = Hub(
        Settings(seed=1),
        identities=IdentityFactory(b"k", seed=1),
        backplane=MemoryBackplane("a"),
    )
    view = YjsView(room, hub, wall=lambda: 1234.5)
    batch = Batch()
    batch.add(Joined(room.member("y1")))
    [(clock, line)] = view.shared(batch).values()
    [entry] = read_awareness(read_message(awareness_message([line]))[1])
    assert (entry.client_id, entry.clock, clock) == (1, 1_234_500, 1_234_500)
    assert orjson.loads(entry.state) == {**OWNERS, "presence": {"idle": False}}
    view.shared(batch)  # announced again within the same millisecond: still newer
    assert view.clocks[1] == 1_234_501
    # The snapshot a (re)connecting client gets is newer than anything it saw before: a
    # stock client keeps the clocks it saw across reconnects.
    assert view.snapshot()[1][0] == 1_234_502


def test_the_yjs_codec_is_pure() -> None:
    """No server imports, no clock: bytes and states in and out."""
    tree = ast.parse(Path(presence.yjs.codec.__file__).read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {m for m in imported if m.startswith("presence.server")}
    assert not imported & {"time", "datetime", "asyncio"}
