"""The uvicorn internals presence.websocket.connection.HttpProtocol relies on, checked for
shape and behaviour: when one of these fails after an upgrade of uvicorn, HttpProtocol
needs reviewing (and the uvicorn pin in pyproject.toml moving) before it can be trusted
again. It learns where an upgrade request ends, so that frames sent in the same read
reach the connection, from the ``HttpParserUpgrade`` that uvicorn is handling when it
calls ``handle_websocket_upgrade``."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from presence.config import Settings
from presence.metrics import Metrics
from presence.websocket import frames as ws
from presence.websocket.guard import HttpProtocol
from presence.websocket.limits import Limits
from tests.test_websocket_codec import client_frame, request
from tests.test_websocket_connection import ROUTES, Endpoint, FakeConnection, Transport, until

pytestmark = pytest.mark.unit

UPGRADE = (
    "presence.websocket.guard.HttpProtocol was written for uvicorn 0.54 "
    f"(installed: {uvicorn.__version__})"
)


class SocketTransport(Transport):
    """The fake transport, with what uvicorn's HTTP protocol asks of a real one."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


async def app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("an upgrade does not reach the ASGI app")


def http_protocol() -> HttpProtocol:
    config = uvicorn.Config(
        app, ws=FakeConnection, http=HttpProtocol, lifespan="off", log_config=None
    )
    settings = SimpleNamespace(max_message_bytes=1000, ping_interval=60)
    hub = SimpleNamespace(settings=settings, metrics=Metrics())
    app_state = {
        "hub": hub,
        "websocket_routes": ROUTES,
        "connection_limits": Limits(Settings(), hub.metrics),
    }
    return HttpProtocol(config=config, server_state=ServerState(), app_state=app_state)


def test_uvicorn_calls_handle_websocket_upgrade_inside_its_except_http_parser_upgrade() -> None:
    source = textwrap.dedent(inspect.getsource(HttpToolsProtocol.data_received))
    calls = [
        handler
        for handler in ast.walk(ast.parse(source))
        if isinstance(handler, ast.ExceptHandler)
        and ast.unparse(handler.type or ast.Name("")) == "httptools.HttpParserUpgrade"
        and "self.handle_websocket_upgrade()" in ast.unparse(handler)
    ]
    assert calls, f"data_received no longer upgrades in its except HttpParserUpgrade; {UPGRADE}"


async def test_frames_in_the_read_of_the_request_reach_the_websocket_protocol() -> None:
    protocol = http_protocol()
    transport = SocketTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    Endpoint.gate = asyncio.Event()
    Endpoint.gate.set()  # joins at once
    frames = client_frame(ws.TEXT, b"hello") + client_frame(ws.PING, b"p")
    protocol.data_received(request() + frames)  # one read
    connection = transport.protocol
    assert isinstance(connection, FakeConnection), f"no hand-over to the ws protocol; {UPGRADE}"
    await until(lambda: connection.state == "open")
    endpoint = connection.endpoint
    assert isinstance(endpoint, Endpoint)
    assert endpoint.received == ["hello"], f"the first frames were lost; {UPGRADE}"
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    assert transport.frames() == [(ws.PONG, b"p")]


async def test_an_upgrade_outside_the_parsers_exception_is_an_error_not_a_silent_loss() -> None:
    protocol = http_protocol()
    with pytest.raises(RuntimeError, match=f"uvicorn {uvicorn.__version__} calls"):
        protocol.handle_websocket_upgrade()


async def test_the_request_is_handed_over_as_parsed_not_written_out_and_parsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def parse_request(data: bytes) -> ws.Request:
        raise AssertionError("the hand-over parsed the request again")

    monkeypatch.setattr(ws, "parse_request", parse_request)
    protocol = http_protocol()
    transport = SocketTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    Endpoint.gate = asyncio.Event()
    raw = request("/rooms/a%20room?token=t", X_Seen="1").replace(
        b"X-Seen: 1\r\n", b"X-Seen: 1\r\nX-Seen:  2 \r\n"
    )
    protocol.data_received(raw)
    connection = transport.protocol
    assert isinstance(connection, FakeConnection)
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    assert connection.room == "a room" and connection.query == {"token": "t"}
    assert connection.headers["x-seen"] == "1, 2" and connection.headers["host"] == "example.org"


@pytest.mark.parametrize(
    "raw,response",
    [
        (
            request().replace(b"HTTP/1.1", b"HTTP/1.0"),
            b"HTTP/1.1 400 Bad Request\r\n",
        ),
        (
            # In one read: the guard's own count of header bytes stops at the end of the
            # headers; the handshake's limit applies to the request as a whole.
            request(X_Padding="x" * ws.MAX_REQUEST_BYTES),
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        ),
    ],
    ids=["http-1.0", "too-large"],
)
async def test_the_handshakes_checks_apply_to_the_request_handed_over(
    raw: bytes, response: bytes
) -> None:
    protocol = http_protocol()
    transport = SocketTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(raw)
    assert bytes(transport.written).startswith(response)
    assert transport.closing and isinstance(transport.protocol, FakeConnection)
