"""The format replicas exchange through the backplane: compact JSON for events and members.

A channel message is the sender's id, a space, and a JSON object whose ``k`` says what
it is: ``e`` events (``e``) and ``f`` a complete member set (``m``), both numbered per
sender and room (``s``, consecutive: a gap means a lost message; ``r: 1`` marks that
numbering, as older replicas numbered across rooms); ``q`` a request for
full states, from everyone or from the replica ``t``; ``o`` Yjs client IDs held for the
sockets that had them (``h``: ``[client ID, key digest or null, seconds]``, also kept in
the room's holds hash as ``<client ID>/<replica>``); ``h`` a heartbeat and ``b`` a
goodbye (on the replicas channel). A replica ignores kinds it does not know, so that
replicas of different versions can run side by side during a rolling deploy.

A heartbeat says which version of this format its sender speaks (``v``; none: 1). Each
replica relays with every version from OLDEST_PROTOCOL on, and refuses older ones, with
a logged reason: raise OLDEST_PROTOCOL only for a change older replicas would misread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from presence.core.events import Active, Event, Idle, Joined, Left, MemberInfo, Updated
from presence.core.identity import Identity, initials_of

# 1: builds before heartbeats carried a version (main up to c3b1bbc, before 0.1.0).
# 2: heartbeats say ``v``; nothing else changed, so 1 and 2 relay alike.
PROTOCOL = 2
OLDEST_PROTOCOL = 1


def member_to_json(m: MemberInfo) -> list[Any]:
    i = m.identity
    return [m.id, i.username, i.name, i.color, m.state, m.idle, m.origin, i.initials]


def member_from_json(data: list[Any]) -> MemberInfo:
    member_id, username, name, color, state, idle, origin, *rest = data
    # The initials a room gave the member (they differ from the name's when taken).
    initials = rest[0] if rest else initials_of(name)
    return MemberInfo(
        member_id, Identity(username, name, initials, color), state, bool(idle), origin
    )


def events_to_json(events: Sequence[Event]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        if isinstance(e, Joined):
            out.append(["j", member_to_json(e.member)])
        elif isinstance(e, Updated):
            if e.nulls:
                # Fields a Yjs client set to null: kept as null, not removed. A 4th item,
                # that older replicas ignore (they remove those fields).
                out.append(["u", e.id, e.patch, sorted(e.nulls)])
            else:
                out.append(["u", e.id, e.patch])
        elif isinstance(e, Idle):
            out.append(["i", e.id])
        elif isinstance(e, Active):
            out.append(["a", e.id])
        else:
            out.append(["l", e.id])
    return out


def events_from_json(data: list[Any]) -> list[Event]:
    events: list[Event] = []
    for item in data:
        kind = item[0]
        if kind == "j":
            events.append(Joined(member_from_json(item[1])))
        elif kind == "u":
            if len(item) > 3:
                events.append(Updated(item[1], item[2], frozenset(item[3])))
            else:
                events.append(Updated(item[1], item[2]))
        elif kind == "i":
            events.append(Idle(item[1]))
        elif kind == "a":
            events.append(Active(item[1]))
        elif kind == "l":
            events.append(Left(item[1]))
    return events


def dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def envelope(origin: str, message: dict[str, Any]) -> bytes:
    """A message on a channel: its sender first, so that a replica skips its own messages
    (pub/sub sends them back) without parsing them."""
    return origin.encode() + b" " + orjson.dumps(message)


def open_envelope(raw: bytes) -> tuple[bytes, bytes]:
    """The sender and the JSON body of a channel message."""
    origin, sep, body = raw.partition(b" ")
    if not sep:
        raise ValueError("backplane message without a sender")
    return origin, body


def loads(data: bytes | str) -> dict[str, Any]:
    message = orjson.loads(data)
    if not isinstance(message, dict):
        raise ValueError("backplane message is not an object")
    return message
