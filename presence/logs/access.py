"""The access log (logger ``presence.access``, info level): a line when a WebSocket
session opens, one when it closes, and one for every connection refused, so that a
refused user leaves a trace (``--access-log false`` turns it off).

Fields: ``protocol`` (json, yjs; sse or http for the views; tcp for a refusal before
the request was read), ``room``, ``ip`` (the client as the connection limits count it:
the peer, or the X-Forwarded-For client of a proxy of ``--forwarded-allow-ips``),
``members`` (the member ids the socket spoke for; a Yjs socket's appear once its
client has sent a state), on close ``code``, ``reason``, ``by`` (who sent the close
frame first: server or client; empty when neither did, code 1006) and ``duration``
(seconds since the handshake), on a refusal ``status`` (HTTP) or ``code`` (WebSocket
close), ``reason`` and ``refusal`` (the reason label of
``presence_connections_refused_total``; ``join`` for a WebSocket closed before it
joined, ``handshake`` for a bad upgrade request). Never a token or a query string:
rooms arrive in the path, tokens in the query, headers or subprotocols, which are not
logged.

Refusals come in floods (a client past its limit retrying, a scan): past
``REFUSALS_PER_SECOND`` their lines are dropped, and the next line logged says how
many were (``suppressed``); /metrics counts them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from presence.core.ratelimit import TokenBucket

log = logging.getLogger("presence.access")

REFUSALS_PER_SECOND = 10.0
REFUSAL_BURST = 100
# Bounds on what a client chooses: a room name as long as the request allows, a Yjs
# socket announcing thousands of client IDs. Valid room names are at most 128.
MAX_ROOM = 128
MAX_MEMBERS = 16


def _bounded(fields: dict[str, Any], members: Iterable[str] | None = None) -> dict[str, Any]:
    room = fields.get("room")
    if isinstance(room, str) and len(room) > MAX_ROOM:
        fields["room"] = room[:MAX_ROOM] + "…"
    if members is not None:
        listed = sorted(members)
        fields["members"] = listed[:MAX_MEMBERS]
        if len(listed) > MAX_MEMBERS:
            fields["members_more"] = len(listed) - MAX_MEMBERS
    return fields


class AccessLog:
    def __init__(self, enabled: bool = True, *, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self._clock = clock
        self._refusals = TokenBucket(REFUSALS_PER_SECOND, REFUSAL_BURST, clock())
        self.suppressed = 0  # refusal lines dropped since the last one logged

    def opened(self, protocol: str, room: str, ip: str | None, members: Iterable[str]) -> None:
        if self.enabled:
            log.info(
                "open", extra=_bounded({"protocol": protocol, "room": room, "ip": ip}, members)
            )

    def closed(
        self,
        protocol: str,
        room: str,
        ip: str | None,
        members: Iterable[str],
        *,
        code: int,
        reason: str,
        by: str,
        duration: float,
    ) -> None:
        if self.enabled:
            fields: dict[str, Any] = {"protocol": protocol, "room": room, "ip": ip, "code": code}
            fields |= {"reason": reason[:MAX_ROOM], "by": by, "duration": round(duration, 3)}
            log.info("close", extra=_bounded(fields, members))

    def refused(
        self, protocol: str, ip: str | None, refusal: str, reason: str, **fields: Any
    ) -> None:
        """``fields``: ``room``, and ``status`` or ``code``, where known."""
        if not self.enabled:
            return
        if not self._refusals.allow(self._clock()):
            self.suppressed += 1
            return
        extra = {"protocol": protocol, "ip": ip, "refusal": refusal, "reason": reason, **fields}
        if self.suppressed:
            extra["suppressed"], self.suppressed = self.suppressed, 0
        log.info("refused", extra=_bounded(extra))


# For a hub without one (a test's stand-in): logs nothing.
DISABLED = AccessLog(False)


def access_log_of(hub: Any) -> AccessLog:
    found = getattr(hub, "access_log", None)
    return found if isinstance(found, AccessLog) else DISABLED
