"""An echo server on presence's own WebSocket layer, for Autobahn|Testsuite's fuzzingclient
(scripts/autobahn.sh): ``python scripts/autobahn_echo.py PORT``, then ``ws://…/echo/any``.

It is the production stack (uvicorn, the HTTP protocol and :class:`Connection` that
``presence serve`` uses) with one more route, whose endpoint sends every message back
as it came: text as text, binary as binary.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import uvicorn

from presence.config import Settings
from presence.server.app import create_app
from presence.websocket.connection import Connection
from presence.websocket.guard import HttpProtocol


class Echo:
    text: ClassVar[bool | None] = None  # text and binary messages alike

    def __init__(self, connection: Connection, hub: Any, room: str) -> None:
        self.connection = connection

    async def open(self) -> None:
        pass

    def receive(self, message: str | bytes) -> None:
        self.connection.send([message])

    def closed(self) -> None:
        pass


def main(port: int) -> None:
    # Autobahn's largest messages in cases 1-7 and 10 are 64 KiB (1.1.6-1.1.8, 10.1.1).
    settings = Settings(
        secret="autobahn-echo-secret-of-32-bytes-or-more", max_message_bytes=1 << 20
    )
    uvicorn.run(
        create_app(settings, websocket_routes={"echo": Echo}),
        host="127.0.0.1",
        port=port,
        ws=Connection,
        http=HttpProtocol,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
