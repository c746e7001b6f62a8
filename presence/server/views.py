"""Read-only HTTP views for dashboards: rooms, members, and a live event stream (SSE).

A room's name is what lets someone in (like a share link): knowing it is enough to watch
it. Listing every room is for hub admins only, behind ``--admin-token``.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from presence.codecs import sse
from presence.codecs.json import member_json
from presence.core.access import bearer
from presence.core.room import ROOM_NAME_RULE, is_valid_room_name
from presence.hub.hub import Hub
from presence.hub.outbox import Outbox


class _StreamSink:
    """An outbox's sink for an event stream: holds one round of chunks at a time.

    While the response is stuck writing a round to a client that stopped reading, the
    next round waits here and the rest in the outbox; once the hub judges the stream
    slow (--slow-client-timeout), :meth:`close` ends it. If the response is stuck in a
    write, that write cannot finish: the connection is reset (``transport.abort()``, the
    server's buffers for it freed), as closing it would wait for the client forever."""

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.chunks: list[str] = []
        self.ready = asyncio.Event()
        self.closed = False
        self.writing = False  # the response is writing a round (the client may not read)
        self.transport = transport

    @property
    def writable(self) -> bool:
        return not self.chunks

    def send(self, frames: list[str]) -> None:
        self.chunks.extend(frames)
        self.ready.set()

    def close(self, code: int, reason: str) -> None:
        self.closed = True
        self.ready.set()
        if self.writing and self.transport is not None:
            self.transport.abort()


def _transport(request: Request) -> asyncio.Transport | None:
    """The connection of ``request``, if the server is uvicorn: ASGI has no way to reach
    it, but uvicorn's ``receive`` is a method of its request cycle, which holds it (its
    middleware leave ``receive`` as it is). None elsewhere: then a stream that stops
    reading leaves the room, and its connection stays open until the client closes it."""
    cycle = getattr(request.receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


def _room_name(request: Request) -> str | None:
    name: str = request.path_params["room"]
    return name if is_valid_room_name(name) else None


def _error(status: int, code: str, message: str, **headers: str) -> Response:
    return JSONResponse(
        {"error": code, "message": message}, status_code=status, headers=headers or None
    )


def _bad_room() -> Response:
    return _error(400, "invalid_room", f"room names are {ROOM_NAME_RULE}")


async def list_rooms(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    expected = hub.settings.admin_token
    if not expected:
        return _error(403, "disabled", "set --admin-token (PRESENCE_ADMIN_TOKEN) to list rooms")
    given = bearer(request.headers.get("authorization", ""))
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        return _error(
            401,
            "unauthorized",
            "send Authorization: Bearer <admin token>",
            **{"WWW-Authenticate": "Bearer"},
        )
    counts = await hub.room_counts()
    return JSONResponse(
        {"rooms": [{"room": name, "members": n} for name, n in sorted(counts.items())]},
        headers={"Cache-Control": "no-store"},
    )


async def room_members(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    name = _room_name(request)
    if name is None:
        return _bad_room()
    members = await hub.members_of(name)
    return JSONResponse(
        {"room": name, "members": [member_json(m) for m in members]},
        headers={"Cache-Control": "no-store"},
    )


async def room_events(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    name = _room_name(request)
    if name is None:
        return _bad_room()
    # The stream is a connection with no member of its own: it gets the room's batches
    # like any other; while the dashboard is slow to read they wait in the outbox, which
    # coalesces them (and the hub cuts a stream that stops reading: _StreamSink).
    sink = _StreamSink(_transport(request))
    outbox: Outbox[str] = Outbox(
        sink,
        sse.ENCODER,
        max_backlog=hub.settings.send_backlog,
        clock=hub.clock,
        metrics=hub.metrics,
    )
    room = await hub.open(name)
    hub.attach(room, outbox)
    outbox.push([sse.snapshot(name, room.snapshot())])

    async def stream() -> AsyncIterator[str]:
        try:
            while not sink.closed:
                try:
                    await asyncio.wait_for(sink.ready.wait(), 15)
                except TimeoutError:
                    sink.writing = True
                    yield sse.KEEPALIVE
                    sink.writing = False
                    continue
                chunk = "".join(sink.chunks)
                sink.chunks.clear()
                sink.ready.clear()
                if chunk:
                    sink.writing = True
                    yield chunk  # returns once the response took it
                    sink.writing = False
                outbox.resume()
        finally:
            hub.disconnect(name, outbox)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
