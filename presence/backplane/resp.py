"""A lean Redis connection for the backplane's hot path: the commands of each tick
(publishes, members-hash writes) and the messages of subscribed channels.

An asyncio protocol with hiredis parsing in the callback: no coroutine per message, no
round trip awaited per tick. Measured in scenario (b) (docs/benchmarks.md), redis-py's
pipeline and pub/sub reads cost tens of microseconds per message, a third of a
replica's CPU. redis-py still does everything else (reads, heartbeats, cluster
topology); connection options (TLS, credentials) are parsed by it from the same URL.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.exceptions import ConnectionError, ResponseError

log = logging.getLogger("presence.redis")

# Commands waiting in the socket buffer beyond this mean Redis stopped reading: give up on
# the connection (the backplane reconnects and re-synchronises).
MAX_BUFFERED = 8 * 1024 * 1024
_PUSHES = (b"message", b"smessage")
_CONFIRMATIONS = (b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe")


def pack(*args: str | bytes | int) -> bytes:
    """One command in the RESP protocol."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = (
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespConnection(asyncio.Protocol):
    """A publishing connection (replies are checked, not awaited) or, given
    ``on_message``, a subscribing one (messages go to the callback as they arrive)."""

    def __init__(
        self,
        on_lost: Callable[[BaseException], None],
        on_message: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self._on_lost = on_lost
        self._on_message = on_message
        self._reader = hiredis.Reader()
        self._replies: deque[asyncio.Future[Any] | None] = deque()  # None: not awaited
        self.transport: asyncio.Transport | None = None
        self.errors = 0
        self._closing = False

    @classmethod
    async def open(
        cls,
        url: str,
        on_lost: Callable[[BaseException], None],
        on_message: Callable[[bytes, bytes], None] | None = None,
    ) -> RespConnection:
        options = parse_redis_url(url)
        kind: Any = options.pop("connection_class", Connection)
        settings: Any = kind(**options)  # redis-py's reading of the URL: host, TLS, ...
        loop = asyncio.get_running_loop()
        conn = cls(on_lost, on_message)
        if isinstance(settings, UnixDomainSocketConnection):
            await loop.create_unix_connection(lambda: conn, settings.path)
        else:
            ssl = settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
            await loop.create_connection(
                lambda: conn,
                settings.host,
                settings.port,
                ssl=ssl,
                server_hostname=settings.host if ssl else None,
            )
        password = options.get("password")
        if password:
            user = options.get("username")
            await conn.call(*(["AUTH", user, password] if user else ["AUTH", password]))
        return conn

    def send(self, *commands: bytes) -> None:
        """Write packed commands; their replies are checked for errors as they come."""
        assert self.transport is not None
        if self._on_message is None:
            self._replies.extend([None] * len(commands))
        self.transport.write(b"".join(commands))
        if self.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.transport.abort()

    async def call(self, *args: str | bytes | int) -> Any:
        """A command whose reply we wait for (set-up only: AUTH)."""
        assert self.transport is not None
        reply = asyncio.get_running_loop().create_future()
        self._replies.append(reply)
        self.transport.write(pack(*args))
        return await reply

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if type(reply) is list and reply:
                if reply[0] in _PUSHES and self._on_message is not None:
                    self._on_message(reply[-2], reply[-1])
                    continue
                if reply[0] in _CONFIRMATIONS:
                    continue
            self._reply(reply)

    def _reply(self, reply: Any) -> None:
        waiting = self._replies.popleft() if self._replies else None
        failed = isinstance(reply, hiredis.ReplyError)
        if waiting is not None:
            if failed:
                waiting.set_exception(ResponseError(str(reply)))
            else:
                waiting.set_result(reply)
        elif failed:
            self.errors += 1
            log.warning("redis refused a command: %s", reply)

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError("connection closed by Redis")
        for waiting in self._replies:
            if waiting is not None and not waiting.done():
                waiting.set_exception(ConnectionError(str(error)))
        self._replies.clear()
        if not self._closing:
            self._on_lost(error)
