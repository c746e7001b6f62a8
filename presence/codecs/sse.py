"""Server-Sent Events for read-only dashboards: the JSON protocol's messages as events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from presence.codecs.json import batch_messages, dumps, member_json
from presence.core.events import Batch, MemberInfo


def event(kind: str, message: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {dumps(message)}\n\n"


def snapshot(room: str, members: Sequence[MemberInfo]) -> str:
    return event(
        "snapshot", {"type": "snapshot", "room": room, "members": [member_json(m) for m in members]}
    )


KEEPALIVE = ": keep-alive\n\n"  # a comment line: keeps proxies from closing an idle stream


class SseEncoder:
    protocol = "sse"

    def shared(self, batch: Batch) -> list[str]:
        return [event(m["type"], m) for m in batch_messages(batch)]

    def frames(self, shared: list[str], outbox: object) -> list[str]:
        return shared


ENCODER = SseEncoder()
