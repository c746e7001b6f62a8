"""A WebSocket connection's protocol decisions, server side, without I/O: the states of a
connection, the closing handshake, keepalive, and what a client's frames call for.

:class:`ServerProtocol` is fed bytes (:meth:`~ServerProtocol.receive_data`) and the time
(an explicit ``now`` wherever it starts a timer; :attr:`~ServerProtocol.deadline` is when
:meth:`~ServerProtocol.timeout` is due). It never writes, reads or sleeps: it says what
to do as ``(kind, value)`` events, in the order in which they must be done:

- ``(TEXT, str)``, ``(BINARY, bytes)``: a message for the endpoint;
- ``(WRITE, bytes)``: write these bytes (a pong, a ping);
- ``(REFUSED, label)``: a data message of the kind the endpoint does not take, which
  counts as a message received; ``label`` is its error's metric; our close follows;
- ``(ERROR, label)``: the client broke the protocol (``label``: the metric); our close
  follows unless the handshake was started already, then the end;
- ``(CLOSE_SENT, frame)``: we start the closing handshake: write our close frame, stop
  what the connection sends, read on for the client's reply;
- ``(CLOSE_RECEIVED, reply)``: the client's close frame: write our reply unless it is
  None (the handshake was ours), stop what the connection sends;
- ``(END, None)``: close the transport once what was written is sent; read no more;
- ``(GONE, None)``: the client is gone (no pong for a whole ping interval): tell the
  endpoint now, rather than when the transport is lost;
- ``(ABORT, None)``: drop the connection now, what was written but not sent with it.

An event that the protocol's own close follows is told with :attr:`state` closing
already.

The opening handshake's HTTP is :mod:`presence.websocket.frames`' (the I/O layer routes
the request and checks its origin first); :meth:`~ServerProtocol.accept` starts the
connection's life, :meth:`~ServerProtocol.opened` its keepalive once the endpoint took it
in, :meth:`~ServerProtocol.lost` ends it.

What is sent to the client (the frames of the endpoint's messages) is not the protocol's
business: it is written as it is, while :attr:`~ServerProtocol.state` is ``opening`` or
``open``; that check is the I/O layer's, on its hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from presence.websocket import frames as ws

# How long a closing handshake may take before the socket is dropped.
CLOSE_TIMEOUT = 10.0

CONNECTING: Final = "connecting"  # the opening handshake is due
OPENING: Final = "opening"  # accepted; the endpoint takes it in (its frames wait)
OPEN: Final = "open"
CLOSING: Final = "closing"  # a close frame was sent or received
CLOSED: Final = "closed"  # the transport is gone

# Event kinds besides the opcodes TEXT and BINARY (which are positive).
TEXT, BINARY = ws.TEXT, ws.BINARY
_PING, _PONG = ws.PING, ws.PONG
WRITE: Final = -1
REFUSED: Final = -2
ERROR: Final = -3
CLOSE_SENT: Final = -4
CLOSE_RECEIVED: Final = -5
END: Final = -6
GONE: Final = -7
ABORT: Final = -8

Event = tuple[int, Any]


class ServerProtocol:
    """One connection's protocol state: see the module's docstring."""

    __slots__ = (
        "close_timeout",
        "deadline",
        "ended",
        "heard",
        "ping_interval",
        "reader",
        "state",
        "text",
    )

    def __init__(
        self, max_size: int, ping_interval: float, close_timeout: float = CLOSE_TIMEOUT
    ) -> None:
        self.state: str = CONNECTING  # -> opening -> open -> closing -> closed
        self.reader = ws.FrameReader(max_size)
        # The messages the endpoint takes: text (True), binary (False), either (None).
        self.text: bool | None = None
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
        # When timeout() is due (the next ping, or the end of the closing handshake).
        self.deadline: float | None = None
        self.heard = True  # a pong arrived since the last ping
        # The first close frame: its code and reason, and who sent it ("server", "client";
        # "" for neither: the connection was lost without one). For the access log.
        self.ended: tuple[int, str, str] | None = None

    # -- the way in ------------------------------------------------------------------------

    def accept(self, request: ws.Request, text: bool | None) -> bytes:
        """The 101 response to ``request`` (routed, its origin allowed), for an endpoint
        that takes ``text`` messages; raises :class:`~frames.HandshakeError`."""
        response = ws.accept(request)
        self.state, self.text = OPENING, text
        return response

    def opened(self, now: float) -> None:
        """The endpoint took the connection in: its frames are read, keepalive starts."""
        if self.state == OPENING:
            self.state = OPEN
            self.deadline = now + self.ping_interval

    # -- the client's bytes ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self.reader.feed(data)

    def events(self, limit: int, now: float) -> Iterator[Event]:
        """What the frames received so far call for, reading at most ``limit`` of them
        (then ``reader.more`` is set); only while open or closing. A generator: each
        event is to be done before the next is asked for, as the endpoint's reply to a
        message may close the connection, which changes what the next frames mean. The
        I/O layer may stop asking at any event (the rest of the frames wait)."""
        try:
            for message in self.reader.messages(limit):
                opcode = message[0]
                if opcode <= BINARY:  # a message (the reader yields no continuations)
                    if self.state != OPEN:
                        continue  # closing: data frames are skipped
                    text = self.text
                    if text is None or (opcode == TEXT) == text:
                        yield message
                    elif text:
                        reason = "binary frames are not supported here; send JSON text"
                        yield from self._refuse(REFUSED, "binary_frame", 1003, reason, now)
                    else:
                        reason = "y-websocket messages are binary frames"
                        yield from self._refuse(REFUSED, "text_frame", 1003, reason, now)
                elif opcode == _PING:
                    if self.state == OPEN:  # closing: the client is to read no more
                        yield WRITE, ws.frame(_PONG, message[1])  # type: ignore[arg-type]
                elif opcode == _PONG:
                    self.heard = True  # it reads what we send: not half-open
                else:  # a close frame
                    yield from self._receive_close(message[1], now)  # type: ignore[arg-type]
                    return  # nothing after a close frame is read
        except ws.ProtocolError as exc:
            yield from self._refuse(ERROR, "websocket", exc.code, exc.reason, now)
            # The rest of the stream is garbage: the client's reply is not waited for.
            yield END, None

    def _receive_close(self, payload: bytes, now: float) -> Iterator[Event]:
        try:
            code, reason = ws.parse_close(payload)
        except ws.ProtocolError as exc:
            code, reason = exc.code, exc.reason
        self._ending(code, reason, "client")
        reply = None
        if self.state == OPEN:
            # Echo the code, as RFC 6455 asks; the client then closes the TCP connection.
            reply = ws.close_frame(code, "") if code != 1005 else ws.frame(ws.CLOSE, b"")
        self.state = CLOSING
        # The transport closes once our reply is sent, unless it cannot be sent.
        self.deadline = now + self.close_timeout
        yield CLOSE_RECEIVED, reply
        yield END, None

    # -- the server's decisions ------------------------------------------------------------

    def close(self, code: int, reason: str, now: float) -> bytes | None:
        """Start the closing handshake: our close frame, to write (None: it was started,
        or the connection is not open nor opening). The client's reply is waited for
        until :attr:`deadline`."""
        if self.state not in (OPENING, OPEN):
            return None
        self.state = CLOSING
        self._ending(code, reason, "server")
        self.deadline = now + self.close_timeout
        return ws.close_frame(code, reason)

    def _refuse(self, kind: int, label: str, code: int, reason: str, now: float) -> Iterator[Event]:
        # Closed before the event is told: the state it finds is the one that follows.
        frame = self.close(code, reason, now)
        yield kind, label
        if frame is not None:
            yield CLOSE_SENT, frame

    def timeout(self, now: float) -> Iterator[Event]:
        """:attr:`deadline` has come (an I/O layer's timer may fire a little early: it is
        not checked against ``now``, which starts the next timer)."""
        self.deadline = None
        if self.state == OPEN:
            if self.heard:
                self.heard = False
                self.deadline = now + self.ping_interval
                yield WRITE, ws.frame(ws.PING, b"")
                return
            # No pong for a whole interval: the peer is gone (a closed laptop lid) and
            # will not answer a closing handshake either. Its members leave now; the
            # close frame goes out if the socket takes it (an abort would discard it).
            frame = self.close(1011, "keepalive ping timeout", now)
            assert frame is not None
            yield CLOSE_SENT, frame
            yield END, None
            yield GONE, None
        elif self.state == CLOSING:
            yield ABORT, None  # the closing handshake did not finish in time

    def lost(self) -> None:
        """The transport is gone."""
        if self.state != CONNECTING:  # upgraded: no close frame either way, 1006
            self._ending(1006, "", "")
        self.state = CLOSED
        self.deadline = None

    def _ending(self, code: int, reason: str, by: str) -> None:
        if self.ended is None:
            self.ended = (code, reason, by)
