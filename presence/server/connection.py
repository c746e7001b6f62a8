"""The WebSocket endpoints' transport: an asyncio protocol that uvicorn hands upgraded
connections to (its ``ws`` protocol class), instead of running them through ASGI.

Why not ASGI: an ASGI WebSocket is a task per connection awaiting ``receive`` through
the middleware stack, and every frame sent is an ``await`` through the server's
implementation. Measured with the load generator (docs/benchmarks.md), that cost
25 KiB per idle connection before any presence state, and most of the CPU per
delivered update. Here a connection is a few small objects driven by callbacks:
frames are written synchronously in the flush that produced them, the bytes of a
room's frame are built once per tick for all its sockets, and keepalive is one timer
per connection. HTTP (views, metrics, static files) stays with Starlette.

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
import http
import ipaddress
import logging
import resource
import sys
import time
from typing import Any, ClassVar, Protocol

import httptools
import uvicorn
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from presence.codecs import websocket as ws
from presence.config import Settings
from presence.core.ratelimit import Buckets
from presence.server.access import Access
from presence.server.access_log import access_log_of
from presence.server.hub import Hub
from presence.server.json_ws import JsonEndpoint
from presence.server.outbox import Outbox
from presence.server.yjs_ws import YjsEndpoint

log = logging.getLogger("presence.ws")

# How long a closing handshake may take before the socket is dropped.
CLOSE_TIMEOUT = 10.0
# A connection's share of an event loop turn; the rest of what it sent waits for the next.
FRAMES_PER_TURN = 128
# How long a refused connection may stay open for its request to arrive (the refusal is
# written at once; closing with the request unread would reset the connection, and the
# client might never read why).
REFUSED_LINGER = 0.5
# --connection-rate-per-ip comes in bursts of this many seconds' worth: a lecture hall
# joining at once, a replica's clients reconnecting after it restarted.
RATE_BURST_SECONDS = 10.0
MAX_RATED_IPS = 65_536  # addresses whose rate is followed; the least recent is forgotten


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
    """One WebSocket connection: handshake, framing, keepalive, closing, flow control."""

    routes: ClassVar[dict[str, Any]] = {"rooms": JsonEndpoint, "yjs": YjsEndpoint}
    # The frames last written, and their bytes: a room's batch goes to all its sockets
    # in a row, so this one entry saves framing it again for each of them.
    _framed: ClassVar[tuple[object, bytes]] = (None, b"")
    # The session, for the access log and presence_closes_total; class defaults, so that
    # a connection only holds what it sets. ``since``: loop time of the handshake (None:
    # not upgraded); ``ended``: the first close frame's code and reason, who sent it, and
    # the members the socket spoke for then (the hub forgets them as it closes).
    since: float | None = None
    ended: tuple[int, str, str, tuple[str, ...]] | None = None
    room = ""
    protocol = ""
    ip: str | None = None
    _refusal_logged = False

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.hub: Hub = app_state["hub"]
        self.connections: set[Any] = server_state.connections
        self.transport: asyncio.Transport | None = None
        self.reader = ws.FrameReader(self.hub.settings.max_message_bytes)
        self.endpoint: Endpoint | None = None  # None again once told that it is closed
        self.outbox: Outbox[Any] | None = None  # set by the endpoint
        self.state = "connecting"  # -> opening -> open -> closing -> closed
        self.writable = True
        self.query: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None  # keepalive, or the close timeout
        self._heard = True  # a pong arrived since the last ping
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
            self._handshake(data)
            return
        self.reader.feed(data)
        if self.state in ("open", "closing"):
            self._process()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
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
            self._turn = asyncio.get_running_loop().call_soon(self._next_turn)
        self._read_or_not()

    def shutdown(self) -> None:
        """uvicorn stops: tell the client, which may reconnect to another replica."""
        self.close(1012, "server shutting down")
        # No waiting for the client's reply: the server is going away.
        self._end()

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
        assert self.transport is not None
        self.state = "closing"
        self._ending(code, reason, "server")
        if self.outbox is not None:
            self.outbox.close()
        self.transport.write(ws.close_frame(code, reason))
        if self._turn is None:
            # Its close frame may be read already, behind frames that waited for writes.
            self._turn = asyncio.get_running_loop().call_soon(self._next_turn)
        self._read_or_not()  # to hear the client's close frame
        self._set_timer(CLOSE_TIMEOUT, self._drop)

    # -- inside ---------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        assert self.transport is not None
        # The first frames may come in the same read as the request (HttpProtocol).
        head, _, frames = data.partition(b"\r\n\r\n")
        try:
            request = ws.parse_request(head)
            endpoint_class = self._route(request.path)
            origin, host = request.headers.get("origin"), request.headers.get("host")
            if not Access.of(self.hub).origin_allowed(origin, host):
                self.hub.metrics.refused("origin")
                raise ws.HandshakeError(403, "this origin may not use this service")
            response = ws.accept(request)
        except ws.HandshakeError as exc:
            self.transport.write(ws.reject(exc.status, str(exc)))
            self._drop()
            access_log_of(self.hub).refused(
                self.protocol or "websocket",
                self._client_ip(),
                "origin" if exc.status == 403 else "handshake",
                str(exc),
                room=self.room or None,
                status=exc.status,
            )
            return
        self.transport.write(response)
        self.state = "opening"
        self.since = asyncio.get_running_loop().time()
        self.ip = self._client_ip()
        self.query, self.headers = request.query, request.headers
        # An endpoint may take larger messages than --max-message-bytes (Yjs echoes).
        limit = getattr(endpoint_class, "max_message_bytes", None)
        if limit is not None:
            self.reader.max_size = limit(self.hub.settings)
        room = self._path(request.path).split("/", 2)[2]
        self.endpoint = endpoint_class(self, self.hub, room)
        # Messages wait until the member has joined, those read already too.
        self.reader.feed(frames)
        self._read_or_not()
        self._opening = asyncio.get_running_loop().create_task(self._open())
        self._opening.add_done_callback(self._cancelled)

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
            if (
                self.state == "closing"
                and self.ended is not None
                and self.ended[2] == "server"
                and self.ended[0] in JOIN_REFUSALS
            ):
                # The endpoint refused it (access 4401/4403, room full 1013, a bad room
                # name or identity token 1008): one line for it, none at the close.
                code, reason, _by, _members = self.ended
                self._refusal_logged = True
                access_log_of(self.hub).refused(
                    self.protocol, self.ip, "join", reason, room=self.room, code=code
                )
            return
        self.state = "open"
        access_log_of(self.hub).opened(self.protocol, self.room, self.ip, self._members())
        self._set_timer(self.hub.settings.ping_interval, self._keepalive)
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
        assert self.endpoint is not None and self.transport is not None
        metrics = self.hub.metrics
        try:
            for opcode, payload in self.reader.messages(FRAMES_PER_TURN):
                if opcode == ws.CLOSE:
                    self._closed_by_client(payload)  # type: ignore[arg-type]
                    break
                if opcode == ws.PING:
                    if self.state == "open":
                        self.transport.write(ws.frame(ws.PONG, payload))  # type: ignore[arg-type]
                elif opcode == ws.PONG:
                    self._heard = True  # it reads what we send: not half-open
                elif self.state == "open":  # closing: data frames are skipped
                    metrics.messages_in += 1
                    text = self.endpoint.text
                    if text is not None and (opcode == ws.TEXT) != text:
                        self._wrong_kind()
                    else:
                        self.endpoint.receive(payload)
                # The endpoint may have closed the connection: the loop goes on, to the
                # client's close frame if it sent one already.
                if not self.writable and self.state == "open":
                    break  # the client does not read what we write: the rest waits
        except ws.ProtocolError as exc:
            metrics.error("websocket")
            self.close(exc.code, exc.reason)
            self._drop_now_if_closing()
        except Exception:
            log.exception("message handling failed")
            self.close(1011, "internal error")
        if self.reader.more and self._turn is None and not self._ended:
            self._turn = asyncio.get_running_loop().call_soon(self._next_turn)
        if not (self._reading and self._turn is None and self.writable and self.state == "open"):
            self._read_or_not()  # (the common case, reading on, costs no call)

    def _next_turn(self) -> None:
        self._turn = None
        if self.state in ("open", "closing"):
            assert self.transport is not None
            if self.transport.is_closing():  # it failed (connection_lost is on its way)
                self._ended = True
            self._process()

    def _wrong_kind(self) -> None:
        assert self.endpoint is not None
        if self.endpoint.text:
            self.hub.metrics.error("binary_frame")
            self.close(1003, "binary frames are not supported here; send JSON text")
        else:
            self.hub.metrics.error("text_frame")
            self.close(1003, "y-websocket messages are binary frames")

    def _closed_by_client(self, payload: bytes) -> None:
        assert self.transport is not None
        try:
            code, reason = ws.parse_close(payload)
        except ws.ProtocolError as exc:
            code, reason = exc.code, exc.reason
        self._ending(code, reason, "client")
        if self.state == "open":
            # Echo the code, as RFC 6455 asks; the client then closes the TCP connection.
            reply = ws.close_frame(code, "") if code != 1005 else ws.frame(ws.CLOSE, b"")
            self.transport.write(reply)
        self.state = "closing"
        if self.outbox is not None:
            self.outbox.close()
        self._end()
        self._set_timer(CLOSE_TIMEOUT, self._drop)  # close() waits for the buffer to drain

    def _drop_now_if_closing(self) -> None:
        # After a protocol violation the rest of the stream is garbage: do not wait.
        if self.state == "closing":
            self._end()

    def _keepalive(self) -> None:
        if self.state != "open":
            return
        assert self.transport is not None
        if not self._heard:
            # No pong for a whole interval: the peer is gone (a closed laptop lid) and
            # will not answer a closing handshake either. Its members leave now; the
            # close frame goes out if the socket takes it (abort() would discard it).
            self.close(1011, "keepalive ping timeout")
            self._end()
            self._detach()
            return
        self._heard = False
        self.transport.write(ws.frame(ws.PING, b""))
        self._set_timer(self.hub.settings.ping_interval, self._keepalive)

    def _ending(self, code: int, reason: str, by: str) -> None:
        """A close frame was sent or received (``by``: who sent it; "" for neither)."""
        if self.ended is None and self.since is not None:
            self.ended = (code, reason, by, self._members())

    def _members(self) -> tuple[str, ...]:
        spoke_for = getattr(self.endpoint, "spoke_for", None)  # (the test endpoints': none)
        if spoke_for is not None:
            return tuple(spoke_for())
        return tuple(self.outbox.members) if self.outbox is not None else ()

    def _finished(self) -> None:
        """The TCP connection is gone: count how the session ended and log it."""
        if self.since is None:
            return  # never upgraded: a refused handshake is logged as such
        if self.ended is None:
            self._ending(1006, "", "")  # no close frame either way: the connection dropped
        assert self.ended is not None
        code, reason, by, members = self.ended
        self.hub.metrics.closed(code, by)
        if self._refusal_logged:
            return
        access_log_of(self.hub).closed(
            self.protocol,
            self.room,
            self.ip,
            members,
            code=code,
            reason=reason,
            by=by,
            duration=asyncio.get_running_loop().time() - self.since,
        )

    def _detach(self) -> None:
        """Tell the endpoint that the connection is gone, once however it ended."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.closed()

    def _set_timer(self, delay: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _end(self) -> None:
        """Close the transport once what was written is sent; nothing more is read."""
        self._ended = True
        if self.transport is not None:
            self.transport.close()

    def _drop(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.abort() if self.state == "closing" else self.transport.close()


def default_max_connections() -> int:
    """The process's soft limit of open files, less a tenth of it (at least 64): what is
    kept is for Redis, logs, and connections being refused."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - max(64, soft // 10))


class Limits:
    """The open TCP connections of this process (HTTP and WebSocket), in all and per
    client IP, against ``--max-connections`` and ``--max-connections-per-ip``."""

    def __init__(self, settings: Settings, metrics: Any) -> None:
        self.max_total = settings.max_connections or default_max_connections()
        # Refused connections wait for their request (REFUSED_LINGER) while this many
        # descriptors are spare: half of what the fd limit leaves over max_total.
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.lingering = max(0, min(soft, 1 << 20) - self.max_total) // 2
        self.max_per_ip = settings.max_connections_per_ip
        self._rates = Buckets(settings.connection_rate_per_ip, RATE_BURST_SECONDS, MAX_RATED_IPS)
        self.handshake_timeout = settings.handshake_timeout
        # uvicorn's own parser of --forwarded-allow-ips: the same clients as in the views.
        self.proxies = _TrustedHosts(settings.forwarded_allow_ips)
        self.metrics = metrics
        self.open = 0
        self.per_ip: dict[str, int] = {}
        metrics.gauges["tcp_connections"] = (
            "Open TCP connections, HTTP and WebSocket, counted against --max-connections "
            "(clients joined to rooms: presence_sessions).",
            lambda: self.open,
        )
        metrics.gauges["tcp_connections_limit"] = (
            "--max-connections: TCP connections beyond it are refused with 503.",
            lambda: self.max_total,
        )

    def admit(self, ip: str) -> bool:
        """Whether ``ip`` may open one more connection now (--connection-rate-per-ip)."""
        return self._rates.take(ip, time.monotonic()) == 0

    @classmethod
    def of(cls, app_state: dict[str, Any]) -> Limits:
        """The limits of the process that ``app_state`` (uvicorn's, one for all
        connections) belongs to."""
        limits: Limits | None = app_state.get("connection_limits")
        if limits is None:
            hub = app_state["hub"]
            settings = hub.settings if isinstance(hub.settings, Settings) else Settings()
            limits = app_state["connection_limits"] = cls(settings, hub.metrics)
        return limits


class Slot:
    """One open connection's place in the :class:`Limits`, from ``connection_made`` to
    ``connection_lost`` (an upgraded connection's :class:`Connection` releases it)."""

    __slots__ = ("ip", "key", "limits")

    def __init__(self, limits: Limits) -> None:
        self.limits: Limits | None = limits
        self.ip: str | None = None  # the client's address
        self.key: str | None = None  # what the per-IP limits count it as
        limits.open += 1

    @property
    def over_total(self) -> bool:
        return self.limits is not None and self.limits.open > self.limits.max_total

    def claim(self, ip: str) -> str | None:
        """Count the connection as ``ip``'s: None, or why ``ip`` may not have it
        (``per_ip``: over its count; ``per_ip_rate``: opening them too fast). IPv6
        clients count per /64: one host usually has all of one."""
        limits = self.limits
        if limits is None:
            return None
        key = client_key(ip)
        if key != self.key:
            # Each new client of a connection counts as a new connection of it: a proxy
            # may send several clients' requests over one.
            self._forget_ip()
            self.ip, self.key = ip, key
            limits.per_ip[key] = limits.per_ip.get(key, 0) + 1
            if not limits.admit(key):
                return "per_ip_rate"
        self.ip = ip
        return None if limits.per_ip[key] <= limits.max_per_ip else "per_ip"

    def release(self) -> None:
        if self.limits is not None:
            self._forget_ip()
            self.limits.open -= 1
            self.limits = None

    def _forget_ip(self) -> None:
        if self.limits is not None and self.key is not None:
            left = self.limits.per_ip[self.key] - 1
            if left:
                self.limits.per_ip[self.key] = left
            else:
                del self.limits.per_ip[self.key]
            self.ip = self.key = None


def client_key(ip: str) -> str:
    """What the per-IP limits count ``ip`` as: itself, or for IPv6 its /64 network."""
    if ":" not in ip:
        return ip
    try:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    except ValueError:
        return ip  # not an address (a proxy's odd header): counted as given


def _response(status: int, message: str, extra: bytes = b"") -> bytes:
    body = (message + "\n").encode()
    return (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        + extra
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (``http=`` beside ``ws=Connection``), which hands a
    WebSocket upgrade over as it came: uvicorn's own hand-over writes the request's
    version as HTTP/1.1 whatever it was, and drops what followed the request in the
    same read (a client's first frames).

    It also guards the way in, which uvicorn leaves open (its keep-alive timeout runs
    only between requests, and its parser takes headers of any size):

    - a request's headers are counted as they arrive: past ``ws.MAX_REQUEST_BYTES``
      the answer is 431, without reading on;
    - a connection that has not sent a whole request within ``--handshake-timeout``
      of opening (or of its next request's first byte) is closed: an upgrade is
      complete once its request is;
    - ``--max-connections`` and ``--max-connections-per-ip`` (:class:`Limits`): one
      more is answered 503 with Retry-After, WebSocket upgrades too (browsers report a
      failed connection, close code 1006, and reconnect with their backoff). The
      client's IP is known when it connects, unless the peer is a proxy of
      ``--forwarded-allow-ips``: then it is counted when its request's headers name it.

    It relies on uvicorn's internals: ``handle_websocket_upgrade`` is called while
    ``HttpToolsProtocol.data_received`` handles the parser's ``HttpParserUpgrade``
    (tests/test_websocket_uvicorn.py checks it; pyproject.toml pins uvicorn to the tested
    range). Only this httptools-based protocol is supported, not uvicorn's h11 one:
    ``presence serve`` always runs with ``http=HttpProtocol``."""

    _received = b""
    _refused = False
    _upgraded = False
    _reading_head = True  # the headers of a request are due
    _head_bytes = 0  # ... and this many bytes of them have arrived
    _deadline: asyncio.TimerHandle | None = None
    _slot: Slot | None = None
    _behind_proxy = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = Limits.of(self.app_state)
        self._limits = limits
        self._slot = Slot(limits)
        peer = self.client[0] if self.client else None
        self._behind_proxy = peer in limits.proxies
        refused = None if peer is None or self._behind_proxy else self._slot.claim(peer)
        if self._slot.over_total:
            self._refuse(503, "total", "too many connections to this server; retry later")
        elif refused is not None:
            self._refuse_ip(refused)
        else:
            self._deadline = self.loop.call_later(limits.handshake_timeout, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._slot is not None:
            self._slot.release()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self.transport.close()  # its request is read: the reply is all it gets
            return
        if self._reading_head:
            self._head_bytes += len(data)
        self._received = data
        try:
            super().data_received(data)
        finally:
            self._received = b""
        if (
            self._reading_head
            and self._head_bytes > ws.MAX_REQUEST_BYTES
            and not (self._refused or self._upgraded or self.transport.is_closing())
        ):
            # Before any more is read: httptools keeps a header line of any length.
            self._refuse(431, "header_too_large", "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None and not self._refused:
            # The next request on a kept-alive connection; the first one's deadline runs
            # from connection_made, not from its first byte.
            self._deadline = self.loop.call_later(self._limits.handshake_timeout, self._too_slow)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        slot = self._slot
        refused = slot.claim(self._client_ip()) if self._behind_proxy and slot else None
        if refused is not None:
            self._refuse_ip(refused)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        self._reading_head = True
        self._head_bytes = 0
        if not self._refused:
            super().on_message_complete()

    def _client_ip(self) -> str:
        """The client behind the proxy that connected, as uvicorn's ProxyHeadersMiddleware
        finds it for the views."""
        assert self.client is not None
        forwarded = b", ".join(v for name, v in self.headers if name == b"x-forwarded-for")
        if forwarded:
            proxies = self._limits.proxies
            if proxies.always_trust:
                # uvicorn takes the leftmost entry then, which the client itself may have
                # written (a proxy appends to what it got): the one our proxy added is last.
                return forwarded.decode("latin-1").rsplit(",", 1)[-1].strip()
            host, _port = proxies.get_trusted_client_address(forwarded.decode("latin-1"))
            if host:
                return str(host)
        return str(self.client[0])

    def _refuse_ip(self, reason: str) -> None:
        if reason == "per_ip_rate":
            self._refuse(429, reason, "too many new connections from your address; retry later")
        else:
            self._refuse(503, reason, "too many connections from your address; retry later")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` and close; cheap, and the socket is not kept."""
        self._refused = True
        self._cancel_deadline()
        self._limits.metrics.refused(reason)
        self._log_refusal(reason, message, status)
        extra = {503: b"Retry-After: 5\r\n", 429: b"Retry-After: 1\r\n"}.get(status, b"")
        self.transport.write(_response(status, message, extra))
        if (
            self._reading_head
            and self._head_bytes == 0
            and self._limits.open <= self._limits.max_total + self._limits.lingering
        ):
            # Nothing read yet: wait a moment for the request (data_received closes),
            # unless refusals hold too many descriptors already (a burst: closed at once).
            self._deadline = self.loop.call_later(REFUSED_LINGER, self.transport.close)
        else:
            self.transport.close()

    def _too_slow(self) -> None:
        self._deadline = None
        if not (self._upgraded or self.transport.is_closing()):
            self._limits.metrics.refused("handshake_timeout")
            self._log_refusal("handshake_timeout", "request not complete in time")
            self.transport.close()

    def _log_refusal(self, reason: str, message: str, status: int | None = None) -> None:
        slot = self._slot
        ip = slot.ip if slot is not None and slot.ip else (self.client[0] if self.client else None)
        fields = {} if status is None else {"status": status}
        access_log_of(self.app_state.get("hub")).refused("tcp", ip, reason, message, **fields)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_websocket_upgrade(self) -> None:
        # Called while uvicorn handles the parser's HttpParserUpgrade, whose argument is
        # where the request ends in the data being parsed.
        upgrade = sys.exc_info()[1]
        if not isinstance(upgrade, httptools.HttpParserUpgrade):
            # Going on would silently drop the frames that came with the request.
            raise RuntimeError(
                f"uvicorn {uvicorn.__version__} calls handle_websocket_upgrade() outside "
                "the `except httptools.HttpParserUpgrade` of HttpToolsProtocol.data_received"
                "(), where presence's HttpProtocol (presence/server/connection.py) learns "
                "where the upgrade request ends: it needs updating for this uvicorn"
            )
        if self._refused:
            return  # answered 503 already
        rest = self._received[upgrade.args[0] :]
        self._upgraded = True
        self._cancel_deadline()
        self.connections.discard(self)
        version = self.parser.get_http_version()
        request = [self.scope["method"].encode(), b" ", self.url, f" HTTP/{version}\r\n".encode()]
        for name, value in self.scope["headers"]:
            request += [name, b": ", value, b"\r\n"]
        request.append(b"\r\n")
        protocol = self.ws_protocol_class(  # type: ignore[call-arg, misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        # The connection's place in the limits: the WebSocket releases it when it closes.
        protocol.slot, self._slot = self._slot, None  # type: ignore[union-attr]
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(request) + rest)
        self.transport.set_protocol(protocol)
