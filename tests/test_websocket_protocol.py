"""The WebSocket protocol's decisions without I/O: states, keepalive, the closing
handshake either way, violations; the clock is a number passed in."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from presence.websocket import frames as ws
from presence.websocket import protocol as wsp
from presence.websocket.protocol import CLOSE_TIMEOUT, ServerProtocol
from tests.test_websocket_codec import client_frame, request

pytestmark = pytest.mark.unit

PING_INTERVAL = 20.0
T0 = 1000.0  # the fake clock when the endpoint took the connection in


def opened(text: bool | None = True) -> ServerProtocol:
    """A protocol whose handshake was accepted and whose endpoint took it in at T0."""
    p = ServerProtocol(1000, PING_INTERVAL)
    response = p.accept(ws.parse_request(request().partition(b"\r\n\r\n")[0]), text)
    assert response.startswith(b"HTTP/1.1 101 ") and p.state == wsp.OPENING
    p.opened(T0)
    assert p.state == wsp.OPEN and p.deadline == T0 + PING_INTERVAL
    return p


def events(p: ServerProtocol, *frames: bytes, now: float = T0, limit: int = 1000) -> list[Any]:
    p.receive_data(b"".join(frames))
    return list(p.events(limit, now))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# -- the way in ---------------------------------------------------------------------------


def test_a_refused_handshake_leaves_it_connecting() -> None:
    p = ServerProtocol(1000, PING_INTERVAL)
    with pytest.raises(ws.HandshakeError):
        p.accept(ws.parse_request(request(Sec_WebSocket_Version="8")[:-4]), True)
    assert p.state == wsp.CONNECTING and p.deadline is None
    p.lost()
    assert p.state == wsp.CLOSED and p.ended is None  # never upgraded: no session to log


def test_frames_wait_while_opening_and_no_keepalive_runs() -> None:
    p = ServerProtocol(1000, PING_INTERVAL)
    p.accept(ws.parse_request(request()[:-4]), True)
    p.receive_data(client_frame(ws.TEXT, b"early"))
    assert p.deadline is None
    p.opened(T0)
    assert list(p.events(10, T0)) == [(ws.TEXT, "early")]


def test_a_connection_closed_while_opening_does_not_open() -> None:
    p = ServerProtocol(1000, PING_INTERVAL)
    p.accept(ws.parse_request(request()[:-4]), True)
    assert p.close(4403, "no", T0) == ws.close_frame(4403, "no")
    p.opened(T0 + 1)
    assert p.state == wsp.CLOSING and p.deadline == T0 + CLOSE_TIMEOUT
    assert p.ended == (4403, "no", "server")


# -- messages -----------------------------------------------------------------------------


def test_messages_of_the_endpoints_kind_are_events() -> None:
    p = opened(text=True)
    assert events(p, client_frame(ws.TEXT, "é".encode()), client_frame(ws.TEXT, b"")) == [
        (ws.TEXT, "é"),
        (ws.TEXT, ""),
    ]
    p = opened(text=False)
    assert events(p, client_frame(ws.BINARY, b"\0")) == [(ws.BINARY, b"\0")]
    p = opened(text=None)  # either (the echo server)
    data = client_frame(ws.BINARY, b"\0"), client_frame(ws.TEXT, b"t")
    assert events(p, *data) == [(ws.BINARY, b"\0"), (ws.TEXT, "t")]


@pytest.mark.parametrize(
    "text,opcode,label,reason",
    [
        (True, ws.BINARY, "binary_frame", "binary frames are not supported here; send JSON text"),
        (False, ws.TEXT, "text_frame", "y-websocket messages are binary frames"),
    ],
)
def test_a_message_of_the_wrong_kind_is_closed_with_1003(
    text: bool, opcode: int, label: str, reason: str
) -> None:
    p = opened(text)
    p.receive_data(client_frame(opcode, b"x") + client_frame(ws.TEXT, b"y"))
    stream = p.events(100, T0 + 1)
    assert next(stream) == (wsp.REFUSED, label)
    assert p.state == wsp.CLOSING  # as the event is told: the I/O layer sees it closing
    assert list(stream) == [(wsp.CLOSE_SENT, ws.close_frame(1003, reason))]  # "y" skipped
    assert p.ended == (1003, reason, "server") and p.deadline == T0 + 1 + CLOSE_TIMEOUT


def test_events_stop_where_the_io_layer_stops_and_resume_there() -> None:
    p = opened()
    p.receive_data(b"".join(client_frame(ws.TEXT, b"%d" % i) for i in range(3)))
    for event in p.events(100, T0):
        assert event == (ws.TEXT, "0")
        break  # the client stopped reading what we write: the rest waits
    assert list(p.events(100, T0)) == [(ws.TEXT, "1"), (ws.TEXT, "2")]


def test_a_turn_reads_at_most_its_limit_of_frames() -> None:
    p = opened()
    p.receive_data(b"".join(client_frame(ws.PONG, b"") for _ in range(3)))
    p.receive_data(client_frame(ws.TEXT, b"last"))
    assert list(p.events(3, T0)) == [] and p.reader.more
    assert list(p.events(3, T0)) == [(ws.TEXT, "last")] and not p.reader.more


# -- keepalive ----------------------------------------------------------------------------


def test_pings_are_answered_with_pongs_while_open() -> None:
    p = opened()
    assert events(p, client_frame(ws.PING, b"a"), client_frame(ws.PING, b"")) == [
        (wsp.WRITE, ws.frame(ws.PONG, b"a")),
        (wsp.WRITE, ws.frame(ws.PONG, b"")),
    ]


def test_keepalive_pings_each_interval_while_pongs_come() -> None:
    p = opened()
    now = T0
    for _ in range(3):
        now = p.deadline or 0
        assert list(p.timeout(now)) == [(wsp.WRITE, ws.frame(ws.PING, b""))]
        assert p.deadline == now + PING_INTERVAL and not p.heard
        assert events(p, client_frame(ws.PONG, b""), now=now + 1) == []
        assert p.heard
    assert p.state == wsp.OPEN and p.ended is None


def test_no_pong_for_a_whole_interval_closes_with_1011_and_drops_now() -> None:
    p = opened()
    assert list(p.timeout(T0 + PING_INTERVAL)) == [(wsp.WRITE, ws.frame(ws.PING, b""))]
    # Data frames are no pong: a client that sends but does not read is gone too.
    assert events(p, client_frame(ws.TEXT, b"x")) == [(ws.TEXT, "x")]
    now = T0 + 2 * PING_INTERVAL
    assert list(p.timeout(now)) == [
        (wsp.CLOSE_SENT, ws.close_frame(1011, "keepalive ping timeout")),
        (wsp.END, None),  # the close frame goes out if the socket takes it
        (wsp.GONE, None),  # the endpoint is told now: its members leave
    ]
    assert p.state == wsp.CLOSING and p.ended == (1011, "keepalive ping timeout", "server")
    assert p.deadline == now + CLOSE_TIMEOUT
    assert list(p.timeout(now + CLOSE_TIMEOUT)) == [(wsp.ABORT, None)]
    assert p.deadline is None


def test_a_timer_that_fires_a_little_early_still_counts() -> None:
    p = opened()
    assert list(p.timeout(T0 + PING_INTERVAL - 0.0004)) == [(wsp.WRITE, ws.frame(ws.PING, b""))]


def test_no_timeout_outside_open_and_closing() -> None:
    p = ServerProtocol(1000, PING_INTERVAL)
    assert list(p.timeout(T0)) == [] and p.deadline is None
    p = opened()
    p.lost()
    assert list(p.timeout(T0)) == [] and p.deadline is None


# -- the closing handshake, started by the server -----------------------------------------


def test_a_close_by_the_server_completes_on_the_clients_reply() -> None:
    p = opened()
    assert p.close(1008, "too many invalid messages", T0 + 5) == ws.close_frame(
        1008, "too many invalid messages"
    )
    assert p.state == wsp.CLOSING and p.deadline == T0 + 5 + CLOSE_TIMEOUT
    assert p.close(1000, "again", T0 + 6) is None  # once
    assert events(p, client_frame(ws.CLOSE, close_payload(1000)), now=T0 + 7) == [
        (wsp.CLOSE_RECEIVED, None),  # no reply: the handshake was ours
        (wsp.END, None),
    ]
    assert p.ended == (1008, "too many invalid messages", "server")  # who closed first
    # The transport closes once what was written is sent; dropped if that does not finish.
    assert p.deadline == T0 + 7 + CLOSE_TIMEOUT
    assert list(p.timeout(T0 + 7 + CLOSE_TIMEOUT)) == [(wsp.ABORT, None)]


def test_a_close_by_the_server_is_dropped_after_close_timeout() -> None:
    p = opened()
    p.close(1012, "server shutting down", T0)
    assert p.deadline == T0 + CLOSE_TIMEOUT
    assert list(p.timeout(T0 + CLOSE_TIMEOUT)) == [(wsp.ABORT, None)]
    p.lost()
    assert p.ended == (1012, "server shutting down", "server") and p.state == wsp.CLOSED


def test_the_close_timeout_is_the_protocols_parameter() -> None:
    p = ServerProtocol(1000, PING_INTERVAL, close_timeout=0.5)
    p.accept(ws.parse_request(request()[:-4]), True)
    p.close(1000, "", T0)
    assert p.deadline == T0 + 0.5


def test_while_closing_data_frames_are_skipped_and_pings_not_answered() -> None:
    p = opened()
    p.close(1013, "slow client", T0)
    frames = client_frame(ws.TEXT, b"skipped"), client_frame(ws.PING, b"p")
    assert events(p, *frames, client_frame(ws.PONG, b"")) == []
    assert events(p, client_frame(ws.BINARY, b"wrong kind, skipped too")) == []


def test_a_close_by_the_endpoint_changes_what_the_next_frames_mean() -> None:
    p = opened()
    p.receive_data(
        client_frame(ws.TEXT, b"bad")
        + client_frame(ws.TEXT, b"skipped")
        + client_frame(ws.PING, b"unanswered")
        + client_frame(ws.CLOSE, b"")
        + client_frame(ws.TEXT, b"after the close: never read")
    )
    stream = p.events(100, T0)
    assert next(stream) == (ws.TEXT, "bad")
    p.close(1008, "too many invalid messages", T0)  # what the endpoint does with it
    assert list(stream) == [(wsp.CLOSE_RECEIVED, None), (wsp.END, None)]
    assert p.ended == (1008, "too many invalid messages", "server")


def test_nothing_after_a_close_frame_is_read() -> None:
    p = opened()
    after = client_frame(ws.TEXT, b"after")
    assert events(p, client_frame(ws.CLOSE, b""), after) == [
        (wsp.CLOSE_RECEIVED, ws.frame(ws.CLOSE, b"")),
        (wsp.END, None),
    ]
    assert bytes(p.reader._buffer) == after  # left unread


# -- the closing handshake, started by the client -----------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 1012, 1013, 1014, 3000, 4999])
def test_a_close_by_the_client_is_echoed_with_its_code(code: int) -> None:
    p = opened()
    frame = client_frame(ws.CLOSE, close_payload(code, b"bye"))
    assert events(p, frame, now=T0 + 3) == [
        (wsp.CLOSE_RECEIVED, ws.close_frame(code, "")),  # its code, no reason
        (wsp.END, None),
    ]
    assert p.state == wsp.CLOSING and p.ended == (code, "bye", "client")
    assert p.deadline == T0 + 3 + CLOSE_TIMEOUT  # in case the reply cannot be sent
    assert p.close(1000, "too late", T0 + 4) is None
    assert p.ended == (code, "bye", "client")
    p.lost()
    assert p.ended == (code, "bye", "client") and p.deadline is None


def test_an_empty_close_frame_gets_an_empty_reply_and_1005() -> None:
    p = opened()
    assert events(p, client_frame(ws.CLOSE, b"")) == [
        (wsp.CLOSE_RECEIVED, ws.frame(ws.CLOSE, b"")),
        (wsp.END, None),
    ]
    assert p.ended == (1005, "", "client")


@pytest.mark.parametrize(
    "payload,code,reason",
    [
        (b"\x03", 1002, "close frame with a 1-byte payload"),
        (close_payload(999), 1002, "invalid close code 999"),
        (close_payload(1005), 1002, "invalid close code 1005"),
        (close_payload(1006), 1002, "invalid close code 1006"),
        (close_payload(1015), 1002, "invalid close code 1015"),
        (close_payload(2000), 1002, "invalid close code 2000"),
        (close_payload(5000), 1002, "invalid close code 5000"),
        (close_payload(1000, b"\xff"), 1007, "close reason is not UTF-8"),
    ],
)
def test_an_invalid_close_frame_is_answered_with_1002_or_1007(
    payload: bytes, code: int, reason: str
) -> None:
    p = opened()
    assert events(p, client_frame(ws.CLOSE, payload)) == [
        (wsp.CLOSE_RECEIVED, ws.close_frame(code, "")),
        (wsp.END, None),
    ]
    assert p.ended == (code, reason, "client")  # counted as the client's close


# -- protocol violations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame,code,reason",
    [
        (client_frame(ws.TEXT, b"x", mask=False), 1002, "client frames must be masked"),
        (client_frame(0x3, b""), 1002, "unknown opcode 3"),
        (client_frame(ws.PING, b"x" * 126), 1002, "invalid control frame"),
        (client_frame(ws.CONTINUATION, b"x"), 1002, "continuation frame without a message"),
        (client_frame(ws.TEXT, b"\xff"), 1007, "text message is not valid UTF-8"),
        (client_frame(ws.TEXT, b"x" * 1001), 1009, "message over 1000 bytes"),
    ],
)
def test_a_violation_closes_with_its_code_and_drops_now(
    frame: bytes, code: int, reason: str
) -> None:
    p = opened()
    p.receive_data(client_frame(ws.TEXT, b"fine") + frame)
    stream = p.events(100, T0 + 2)
    assert next(stream) == (ws.TEXT, "fine")
    assert next(stream) == (wsp.ERROR, "websocket")
    assert p.state == wsp.CLOSING  # as the event is told
    assert list(stream) == [(wsp.CLOSE_SENT, ws.close_frame(code, reason)), (wsp.END, None)]
    assert p.ended == (code, reason, "server") and p.deadline == T0 + 2 + CLOSE_TIMEOUT


def test_a_violation_while_closing_drops_without_another_close_frame() -> None:
    p = opened()
    p.close(1001, "going away", T0)
    bad = client_frame(ws.TEXT, b"x", mask=False)
    assert events(p, bad) == [(wsp.ERROR, "websocket"), (wsp.END, None)]
    assert p.ended == (1001, "going away", "server")


# -- the record the access log uses -------------------------------------------------------


def test_a_connection_lost_without_a_close_frame_is_1006_by_neither() -> None:
    p = opened()
    p.lost()
    assert p.state == wsp.CLOSED and p.ended == (1006, "", "") and p.deadline is None


def test_a_connection_lost_while_opening_is_1006_too() -> None:
    p = ServerProtocol(1000, PING_INTERVAL)
    p.accept(ws.parse_request(request()[:-4]), True)
    p.lost()
    assert p.ended == (1006, "", "")
    assert p.close(1000, "", T0) is None  # nothing more to send
