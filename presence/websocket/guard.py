"""The HTTP guard: uvicorn's HTTP protocol, which guards the way in and hands WebSocket
upgrades over to :class:`presence.websocket.connection.Connection` as its parser read
them."""

from __future__ import annotations

import asyncio
import http
import sys
from typing import TYPE_CHECKING

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from presence.logs.access import DISABLED
from presence.websocket import frames as ws
from presence.websocket.limits import Limits, Slot

if TYPE_CHECKING:
    from presence.websocket.connection import Connection

# How long a refused connection may stay open for its request to arrive (the refusal is
# written at once; closing with the request unread would reset the connection, and the
# client might never read why).
REFUSED_LINGER = 0.5


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
    WebSocket upgrade over as its parser read it: the request, as a
    :class:`~presence.websocket.frames.Request` (uvicorn's own hand-over writes it out
    again for the WebSocket protocol to parse, with HTTP/1.1 whatever its version was),
    and what followed it in the same read (a client's first frames, which uvicorn's
    hand-over drops).

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
        limits: Limits = self.app_state["connection_limits"]
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
        self.app_state.get("access_log", DISABLED).refused("tcp", ip, reason, message, **fields)

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
                "(), where presence's HttpProtocol (presence/websocket/guard.py) learns "
                "where the upgrade request ends: it needs updating for this uvicorn"
            )
        if self._refused:
            return  # answered 503 already
        rest = self._received[upgrade.args[0] :]
        self._upgraded = True
        self._cancel_deadline()
        self.connections.discard(self)
        protocol: Connection = self.ws_protocol_class(  # type: ignore[call-arg, assignment, misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        # The connection's place in the limits: the WebSocket releases it when it closes.
        protocol.slot, self._slot = self._slot, None
        protocol.connection_made(self.transport)
        try:
            # The request as the parser read it: not written out again to be parsed again.
            request = ws.request_from(
                self.scope["method"],
                self.url,
                self.parser.get_http_version(),
                self.headers,
            )
        except ws.HandshakeError as exc:
            protocol.refuse(exc)
        else:
            protocol.upgrade(request, rest)
        self.transport.set_protocol(protocol)
