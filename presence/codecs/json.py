"""The JSON WebSocket protocol (``/rooms/{room}``): client messages in, server frames out.

See docs/protocol.md. Decoding validates everything a client controls and raises
:class:`ProtocolError` with a code and a message meant for the client; encoding turns a
batch into a few frames, encoded once and shared by every recipient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from presence.core.events import Active, Batch, Idle, Joined, Left, MemberInfo, State, Updated


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Update:
    patch: State


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


Command = Update | Heartbeat


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node  # type: ignore[assignment]
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_conventional(state: State) -> None:
    """The fields overlays rely on must have the documented shapes."""
    if "user" in state:
        # Peers read the identity from ``user`` (Yjs clients in the state itself).
        raise ProtocolError("invalid_field", "'user' is reserved: the server assigns identities")
    cursor = state.get("cursor")
    if cursor is not None:
        if not isinstance(cursor, dict):
            raise ProtocolError("invalid_field", "'cursor' must be an object or null")
        for axis in ("x", "y"):
            if axis in cursor and not _is_number(cursor[axis]):
                raise ProtocolError("invalid_field", f"'cursor.{axis}' must be a finite number")
    selection = state.get("selection")
    if selection is not None:
        if not isinstance(selection, dict):
            raise ProtocolError("invalid_field", "'selection' must be an object or null")
        for end in ("anchor", "head"):
            if end in selection and not (
                (isinstance(selection[end], int) and not isinstance(selection[end], bool))
                or isinstance(selection[end], dict)
            ):
                raise ProtocolError(
                    "invalid_field",
                    f"'selection.{end}' must be an integer offset or a relative position object",
                )


def decode(text: str, *, max_depth: int = 16) -> Command:
    """Parse one client message (size is limited by the transport before this)."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses nesting past 1024 levels here.
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object with a 'type'")
    # Nesting deeper than max_depth needs more brackets than that: count them (in C) first.
    brackets = text.count("{") + text.count("[")
    if brackets > max_depth and _depth_exceeds(message, max_depth):
        raise ProtocolError("too_deep", f"message is nested deeper than {max_depth} levels")
    kind = message.get("type")
    if kind == "update":
        state = message.get("state")
        if not isinstance(state, dict):
            raise ProtocolError("invalid_message", "'update' needs a 'state' object")
        _check_conventional(state)
        return Update(state)
    if kind == "heartbeat":
        return Heartbeat()
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "a message must have a string 'type'")
    raise ProtocolError(
        "unknown_type", f"unknown message type {kind[:40]!r}; expected 'update' or 'heartbeat'"
    )


# -- server frames -----------------------------------------------------------------------


def member_json(member: MemberInfo) -> dict[str, Any]:
    state = member.state
    if None in state.values():
        # A Yjs client's null field (Room.replace): in JSON, null means "no such field".
        state = {k: v for k, v in state.items() if v is not None}
    return {"id": member.id, "user": member.identity.to_json(), "state": state, "idle": member.idle}


def dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def welcome(
    you: MemberInfo,
    token: str,
    room: str,
    members: Sequence[MemberInfo],
    timing: dict[str, float],
) -> str:
    return dumps(
        {
            "type": "welcome",
            "room": room,
            "you": member_json(you),
            "token": token,
            "members": [member_json(m) for m in members if m.id != you.id],
            "timing": timing,
        }
    )


def error(code: str, message: str) -> str:
    return dumps({"type": "error", "code": code, "message": message})


class JsonEncoder:
    """Frames are the same for every JSON connection: encode once, send as is."""

    protocol = "json"

    def shared(self, batch: Batch) -> list[str]:
        return encode_batch(batch)

    def frames(self, shared: list[str], outbox: object) -> list[str]:
        return shared


ENCODER = JsonEncoder()


def encode_batch(batch: Batch) -> list[str]:
    """A batch as frames: one per kind of event present, in a safe order."""
    return [dumps(message) for message in batch_messages(batch)]


def batch_messages(batch: Batch) -> list[dict[str, Any]]:
    """A batch as protocol messages (join, update, idle, active, leave)."""
    joins: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    idle: list[str] = []
    active: list[str] = []
    leave: list[str] = []
    for event in batch.events():
        if isinstance(event, Joined):
            joins.append(member_json(event.member))
        elif isinstance(event, Updated):
            updates.append({"id": event.id, "state": event.patch})
        elif isinstance(event, Idle):
            idle.append(event.id)
        elif isinstance(event, Active):
            active.append(event.id)
        elif isinstance(event, Left):
            leave.append(event.id)
    messages: list[dict[str, Any]] = []
    if joins:
        messages.append({"type": "join", "members": joins})
    if updates:
        messages.append({"type": "update", "updates": updates})
    for kind, ids in (("idle", idle), ("active", active), ("leave", leave)):
        if ids:
            messages.append({"type": kind, "ids": ids})
    return messages
