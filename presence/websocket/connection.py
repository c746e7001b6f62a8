"""The WebSocket endpoints' transport: an asyncio protocol that uvicorn hands upgraded
connections to (its ``ws`` protocol class), instead of running them through ASGI.

Why not ASGI: an ASGI WebSocket is a task per connection awaiting ``receive`` through
the middleware stack, and every frame sent is an ``await`` through the server's
implementation. Measured with the load generator (docs/benchmarks.md), that cost
25 KiB per idle connection before any presence state, and most of the CPU per
delivered update. Here a connection is a few small objects driven by callbacks:
frames are written synchronously in the flush that produced them, the bytes of a
room's frame are built once per tick for all its sockets, and keepalive is one timer
per connection. HTTP (views, metrics, static files) stays with Starlette. What the
protocol calls for (keepalive, the closing handshake, what a client's frames mean) is
decided without I/O by presence.websocket.protocol; this is its I/O.

No connection can flood the others. It reads its socket only while that is harmless:
not while its member joins, not while the client leaves what we write unread, and not
while frames it sent earlier wait for their turn: a connection handles at most
``FRAMES_PER_TURN`` frames per turn of the event loop (uvloop reads up to 8 MiB from one
socket in a turn: 1.4 million empty frames, seconds of work while every other socket
waits). Nor does it handle frames already read while the client leaves what we write
unread: each could be answered into our memory (a 7-byte y-websocket query gets the
room's whole snapshot back); they wait until it reads again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from presence.logs.access import DISABLED, AccessLog
from presence.websocket import frames as ws
from presence.websocket import protocol as wsp
from presence.websocket.protocol import CLOSE_TIMEOUT, ServerProtocol

if TYPE_CHECKING:
    from presence.hub.hub import Hub
    from presence.hub.outbox import Outbox
    from presence.websocket.limits import Slot

log = logging.getLogger("presence.ws")

# A connection's share of an event loop turn; the rest of what it sent waits for the next.
FRAMES_PER_TURN = 128


class Endpoint(Protocol):
    """What speaks a wire protocol over one connection (JSON or y-websocket)."""

    # Its messages are text frames (str), binary frames (bytes), or either (None: the
    # echo endpoint of scripts/autobahn_echo.py); what it sends goes out as its type.
    text: ClassVar[bool | None]
    # Its name in the access log ('json', 'yjs').
    protocol: ClassVar[str]

    async def open(self) -> None:
        """Join the room; may close the connection instead."""

    def receive(self, message: Any) -> None:
        """One message from the client."""

    def closed(self) -> None:
        """The connection is gone, however it ended (called once)."""

    def spoke_for(self) -> list[str]:
        """The member ids this connection has spoken for, those that left too (for the
        access log)."""


# Close codes with which an endpoint refuses a socket as it joins (an error while
# joining, 1011, or a shutdown meanwhile, 1012, end it as a session instead).
JOIN_REFUSALS = frozenset((1008, 1013, 4401, 4403))


class Connection(asyncio.Protocol):
    """One WebSocket connection's I/O: the way in, flow control, timers, the endpoint.
    What the protocol calls for (closing handshake, keepalive, what a client's frame
    means) is decided by its :class:`~presence.websocket.protocol.ServerProtocol`."""

    # The frames last written, and their bytes: a room's batch goes to all its sockets
    # in a row, so this one entry saves framing it again for each of them.
    _framed: ClassVar[tuple[object, bytes]] = (None, b"")
    # The session, for the access log and presence_closes_total; class defaults, so that
    # a connection only holds what it sets. ``since``: loop time of the handshake (None:
    # not upgraded); ``members``: those the socket spoke for at the first close frame
    # (the hub forgets them as it closes), which the protocol's ``ended`` records.
    since: float | None = None
    members: tuple[str, ...] | None = None
    room = ""
    protocol = ""
    ip: str | None = None
    _refusal_logged = False
    _loop: asyncio.AbstractEventLoop  # set once upgraded

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.hub: Hub = app_state["hub"]
        # What the app (presence.server.app) shares with its connections: which endpoint
        # serves which path, who may connect from where, the access log.
        self.routes: Mapping[str, Any] = app_state["websocket_routes"]  # Endpoint classes
        # presence.access.rules.Access: the origin check here, the endpoints' admissions.
        self.access: Any = app_state.get("access")
        self.access_log: AccessLog = app_state.get("access_log", DISABLED)
        self.connections: set[Any] = server_state.connections
        self.transport: asyncio.Transport | None = None
        settings = self.hub.settings
        self.machine = ServerProtocol(
            settings.max_message_bytes, settings.ping_interval, CLOSE_TIMEOUT
        )
        self.endpoint: Endpoint | None = None  # None again once told that it is closed
        self.outbox: Outbox[Any] | None = None  # set by the endpoint
        # The protocol's state, copied as it changes: send() reads it for every batch.
        self.state = "connecting"  # -> opening -> open -> closing -> closed
        self.writable = True
        self.query: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None  # at the protocol's deadline
        self._deadline: float | None = None  # ... which is this
        self._opening: asyncio.Task[None] | None = None
        self._turn: asyncio.Handle | None = None  # frames read wait for it
        self._reading: bool | None = None  # what the transport was last told; None: unknown
        self._ended = False  # the transport was closed: no more frames are handled
        self.slot: Slot | None = None  # its place in the connection limits (HttpProtocol)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.state == "connecting":
            # Fed the raw request (without HttpProtocol, which calls upgrade() itself); the
            # first frames may come in the same read.
            head, _, frames = data.partition(b"\r\n\r\n")
            try:
                request = ws.parse_request(head)
            except ws.HandshakeError as exc:
                self.refuse(exc)
                return
            self.upgrade(request, frames)
            return
        self.machine.receive_data(data)
        if self.state in ("open", "closing"):
            self._process()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.machine.lost()
        self.state = self.machine.state
        self.connections.discard(self)
        try:  # bookkeeping: nothing in it may keep the slot and the room from being freed
            self._finished()
        except Exception:
            log.exception("could not log a closed connection")
        if self.slot is not None:
            self.slot.release()
        for handle in (self._timer, self._turn):
            if handle is not None:
                handle.cancel()
        if self.outbox is not None:
            self.outbox.close()
        if self._opening is None:  # else _open() tells the endpoint, once it has joined
            self._detach()

    def pause_writing(self) -> None:
        self.writable = False
        self._read_or_not()

    def resume_writing(self) -> None:
        self.writable = True
        if self.outbox is not None:
            self.outbox.resume()
        if self.state == "open" and self._turn is None and self.writable:
            # The frames that waited for writes; in a turn of their own, as this may be
            # called from within a write of ours.
            self._turn = self._loop.call_soon(self._next_turn)
        self._read_or_not()

    def shutdown(self) -> None:
        """uvicorn stops: tell the client, which may reconnect to another replica."""
        self.close(1012, "server shutting down")
        # No waiting for the client's reply: the server is going away.
        self._end()

    # -- the way in -----------------------------------------------------------------------

    def upgrade(self, request: ws.Request, frames: bytes) -> None:
        """The opening handshake's ``request`` (parsed), and the ``frames`` that came
        with it, in the same read: route it, check its origin, accept it or refuse it."""
        assert self.transport is not None
        try:
            endpoint_class = self._route(request.path)
            origin, host = request.headers.get("origin"), request.headers.get("host")
            if self.access is not None and not self.access.origin_allowed(origin, host):
                self.hub.metrics.refused("origin")
                raise ws.HandshakeError(403, "this origin may not use this service")
            response = self.machine.accept(request, endpoint_class.text)
        except ws.HandshakeError as exc:
            self.refuse(exc)
            return
        self.transport.write(response)
        self.state = self.machine.state
        self._loop = asyncio.get_running_loop()
        self.since = self._loop.time()
        self.ip = self._client_ip()
        self.query, self.headers = request.query, request.headers
        # An endpoint may take larger messages than --max-message-bytes (Yjs echoes).
        limit = getattr(endpoint_class, "max_message_bytes", None)
        if limit is not None:
            self.machine.reader.max_size = limit(self.hub.settings)
        room = self._path(request.path).split("/", 2)[2]
        self.endpoint = endpoint_class(self, self.hub, room)
        # Messages wait until the member has joined, those read already too.
        self.machine.receive_data(frames)
        self._read_or_not()
        self._opening = self._loop.create_task(self._open())
        self._opening.add_done_callback(self._cancelled)

    def refuse(self, exc: ws.HandshakeError) -> None:
        """Answer a handshake that is refused with its HTTP error, and close."""
        assert self.transport is not None
        self.transport.write(ws.reject(exc.status, str(exc)))
        self._end()
        self.access_log.refused(
            self.protocol or "websocket",
            self._client_ip(),
            "origin" if exc.status == 403 else "handshake",
            str(exc),
            room=self.room or None,
            status=exc.status,
        )

    # -- the outbox's sink ----------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        if self.state not in ("opening", "open"):
            return
        assert self.transport is not None
        framed = Connection._framed
        if framed[0] is frames:
            data = framed[1]
        else:
            data = b"".join(
                ws.frame(ws.TEXT, f.encode()) if isinstance(f, str) else ws.frame(ws.BINARY, f)
                for f in frames
            )
            Connection._framed = (frames, data)
        self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket is dropped if it does not finish."""
        if self.state not in ("opening", "open"):
            return
        frame = self.machine.close(code, reason, self._loop.time())
        assert frame is not None
        self._close_sent(frame)
        self._schedule()

    # -- inside ---------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        """``path`` below ``--base-path`` (unchanged without one; "" outside it)."""
        base: str = getattr(self.hub.settings, "base_path", "")
        if not base:
            return path
        return path[len(base) :] if path.startswith(base + "/") else ""

    def _route(self, path: str) -> Any:
        parts = self._path(path).split("/", 2)  # a room's name may hold "/"
        if len(parts) == 3 and parts[0] == "" and parts[1] in self.routes and parts[2]:
            endpoint = self.routes[parts[1]]
            self.room, self.protocol = parts[2], getattr(endpoint, "protocol", parts[1])
            return endpoint
        raise ws.HandshakeError(404, f"no WebSocket endpoint at {path[:100]}")

    def _client_ip(self) -> str | None:
        """The client as the connection limits count it (HttpProtocol claimed it: the
        peer, or a proxy's X-Forwarded-For client), else the peer."""
        if self.slot is not None and self.slot.ip is not None:
            return self.slot.ip
        extra = getattr(self.transport, "get_extra_info", None)
        peer = extra("peername") if extra is not None else None
        return str(peer[0]) if peer else None

    async def _open(self) -> None:
        assert self.endpoint is not None
        try:
            await self.endpoint.open()
        except Exception:
            log.exception("could not open a connection")
            self.close(1011, "internal error")
        finally:  # cancelled too (then _cancelled follows)
            self._opening = None
            # Only the way in needed them: a kilobyte and more per idle connection.
            self.headers, self.query = {}, {}
            if self.state == "closed":
                self._detach()  # it went away while joining
        if self.state != "opening":
            ended = self.machine.ended
            if (
                self.state == "closing"
                and ended is not None
                and ended[2] == "server"
                and ended[0] in JOIN_REFUSALS
            ):
                # The endpoint refused it (access 4401/4403, room full 1013, a bad room
                # name or identity token 1008): one line for it, none at the close.
                code, reason, _by = ended
                self._refusal_logged = True
                self.access_log.refused(
                    self.protocol, self.ip, "join", reason, room=self.room, code=code
                )
            return
        self.machine.opened(self._loop.time())
        self.state = self.machine.state
        self.access_log.opened(self.protocol, self.room, self.ip, self._members())
        self._schedule()
        self._process()

    def _cancelled(self, opening: asyncio.Task[None]) -> None:
        if opening.cancelled():
            # The event loop stops with the server, maybe before _open() even started: no
            # connection_lost may follow, so the endpoint is told now.
            self._opening = None
            self.close(1012, "server shutting down")
            self._end()
            self._detach()

    def _read_or_not(self) -> None:
        """Read the socket while the member is in (or leaving), the client reads what we
        write, and no frames read before still wait for their turn."""
        reading = self._turn is None and (
            self.state == "closing" or (self.state == "open" and self.writable)
        )
        if reading is not self._reading:  # the transport is told of changes only
            assert self.transport is not None
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _process(self) -> None:
        """Handle a turn's worth of the frames read; the next turn takes the rest. Called
        with the connection open or closing."""
        if self._ended:
            return  # a close frame or a violation ended the stream: the rest is not read
        if not self.writable and self.state == "open":
            # The client does not read what we write: what it sent waits (resume_writing).
            self._read_or_not()
            return
        endpoint, transport = self.endpoint, self.transport
        assert endpoint is not None and transport is not None
        metrics = self.hub.metrics
        machine = self.machine
        try:
            for kind, value in machine.events(FRAMES_PER_TURN, self._loop.time()):
                if kind > 0:  # a message
                    metrics.messages_in += 1
                    endpoint.receive(value)
                    # The endpoint may have closed the connection: the events go on, to
                    # the client's close frame if it sent one already.
                elif kind == wsp.WRITE:  # a pong
                    transport.write(value)
                else:
                    self._event(kind, value)
                if not self.writable and self.state == "open":
                    break  # the client does not read what we write: the rest waits
        except Exception:
            log.exception("message handling failed")
            self.close(1011, "internal error")
        if machine.deadline != self._deadline:
            self._schedule()
        if machine.reader.more and self._turn is None and not self._ended:
            self._turn = self._loop.call_soon(self._next_turn)
        if not (self._reading and self._turn is None and self.writable and self.state == "open"):
            self._read_or_not()  # (the common case, reading on, costs no call)

    def _event(self, kind: int, value: Any) -> None:
        """Do what the protocol calls for, besides messages and pongs (see its module)."""
        self.state = self.machine.state
        if kind == wsp.CLOSE_SENT:
            self._close_sent(value)
        elif kind == wsp.CLOSE_RECEIVED:
            self._closing()
            if value is not None:
                assert self.transport is not None
                self.transport.write(value)
            if self.outbox is not None:
                self.outbox.close()
        elif kind == wsp.END:
            self._end()
        elif kind == wsp.REFUSED:
            self.hub.metrics.messages_in += 1
            self.hub.metrics.error(value)
        elif kind == wsp.ERROR:
            self.hub.metrics.error(value)
        elif kind == wsp.WRITE:  # a ping
            assert self.transport is not None
            self.transport.write(value)
        elif kind == wsp.GONE:
            self._detach()
        elif kind == wsp.ABORT:
            self._ended = True
            if self.transport is not None:
                self.transport.abort()

    def _close_sent(self, frame: bytes) -> None:
        """Our close frame, the protocol's state closing: send it, hear the reply."""
        assert self.transport is not None
        self._closing()
        if self.outbox is not None:
            self.outbox.close()
        self.transport.write(frame)
        if self._turn is None:
            # Its close frame may be read already, behind frames that waited for writes.
            self._turn = self._loop.call_soon(self._next_turn)
        self._read_or_not()  # to hear the client's close frame

    def _closing(self) -> None:
        """A close frame was sent or received: the members the socket speaks for are
        kept for the log (the first time), as the hub forgets them."""
        self.state = self.machine.state
        if self.members is None and self.since is not None:
            self.members = self._members()

    def _next_turn(self) -> None:
        self._turn = None
        if self.state in ("open", "closing"):
            assert self.transport is not None
            if self.transport.is_closing():  # it failed (connection_lost is on its way)
                self._ended = True
            self._process()

    def _timeout(self) -> None:
        """The protocol's deadline came: the next ping, or the end of a closing handshake."""
        if self._timer is not None:
            self._timer.cancel()  # (it fired, unless a test calls this)
        self._timer = self._deadline = None
        for kind, value in self.machine.timeout(self._loop.time()):
            self._event(kind, value)
        self._schedule()

    def _schedule(self) -> None:
        """Set the timer to the protocol's deadline if that changed."""
        deadline = self.machine.deadline
        if deadline != self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._deadline = deadline
            self._timer = None if deadline is None else self._loop.call_at(deadline, self._timeout)

    def _members(self) -> tuple[str, ...]:
        spoke_for = getattr(self.endpoint, "spoke_for", None)  # (the test endpoints': none)
        if spoke_for is not None:
            return tuple(spoke_for())
        return tuple(self.outbox.members) if self.outbox is not None else ()

    def _finished(self) -> None:
        """The TCP connection is gone: count how the session ended and log it."""
        if self.since is None:
            return  # never upgraded: a refused handshake is logged as such
        ended = self.machine.ended  # (1006: no close frame either way, it dropped)
        assert ended is not None
        code, reason, by = ended
        members = self.members if self.members is not None else self._members()
        self.hub.metrics.closed(code, by)
        if self._refusal_logged:
            return
        self.access_log.closed(
            self.protocol,
            self.room,
            self.ip,
            members,
            code=code,
            reason=reason,
            by=by,
            duration=self._loop.time() - self.since,
        )

    def _detach(self) -> None:
        """Tell the endpoint that the connection is gone, once however it ended."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.closed()

    def _end(self) -> None:
        """Close the transport once what was written is sent; nothing more is read."""
        self._ended = True
        if self.transport is not None:
            self.transport.close()
