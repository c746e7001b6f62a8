"""A lean Redis connection for the backplane's hot path: everything a replica writes
(publishes, hash and key writes, in order) and the messages of subscribed channels.

An asyncio protocol with hiredis parsing in the callback: no coroutine per message, no
round trip awaited per tick. Measured in scenario (b) (docs/benchmarks.md), redis-py's
pipeline and pub/sub reads cost tens of microseconds per message, a third of a
replica's CPU. redis-py still does the reads and the cluster topology; connection
options (TLS, credentials, database) are parsed by it from the same URL.

Replies are not awaited but tracked: :meth:`RespConnection.waiting` says how long the
oldest one has been due, which is how a stalled Redis is noticed (a frozen Redis keeps
its sockets open: nothing else would tell).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.exceptions import ConnectionError, ResponseError

# Commands waiting in the socket buffer beyond this mean Redis stopped reading: give up on
# the connection (the backplane reconnects and re-synchronises).
MAX_BUFFERED = 8 * 1024 * 1024
_PUSHES = (b"message", b"smessage")
_PONG = b"pong"  # the reply to PING on a subscribed connection
_CONFIRMATIONS = (b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe")
_SUBSCRIBED = (b"subscribe", b"ssubscribe")


def pack(*args: str | bytes | int) -> bytes:
    """One command in the RESP protocol."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = (
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# What to do with a reply: nothing (errors are lost), resolve a future, or call back
# (with the reply, a hiredis.ReplyError for an error).
Handler = asyncio.Future[Any] | Callable[[Any], None] | None


class RespConnection(asyncio.Protocol):
    """A connection for commands (replies go to their handlers) or, given
    ``on_message``, a subscribing one (messages go to the callback as they arrive)."""

    def __init__(
        self,
        on_lost: Callable[[BaseException], None],
        on_message: Callable[[bytes, bytes], None] | None = None,
        clock: Callable[[], float] = time.monotonic,  # when replies became due
    ) -> None:
        self._on_lost = on_lost
        self._clock = clock
        self._on_message = on_message
        self._reader = hiredis.Reader()
        self._replies: deque[tuple[float, Handler]] = deque()  # (sent at, handler)
        self.transport: asyncio.Transport | None = None
        self.on_reply: Callable[[], None] | None = None  # after each reply, if set
        self._confirming: dict[bytes, deque[asyncio.Future[None]]] = {}  # by channel
        self._closing = False

    @classmethod
    async def open(
        cls,
        url: str,
        on_lost: Callable[[BaseException], None],
        on_message: Callable[[bytes, bytes], None] | None = None,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> RespConnection:
        """Connect, authenticate and select the URL's database, within ``timeout``."""
        conn = cls(on_lost, on_message, clock)
        try:
            await asyncio.wait_for(conn._open(url), timeout)
        except TimeoutError:
            conn.close()
            raise ConnectionError(f"no answer from Redis within {timeout:g} s") from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open(self, url: str) -> None:
        options = parse_redis_url(url)
        kind: Any = options.pop("connection_class", Connection)
        settings: Any = kind(**options)  # redis-py's reading of the URL: host, TLS, ...
        loop = asyncio.get_running_loop()
        if isinstance(settings, UnixDomainSocketConnection):
            await loop.create_unix_connection(lambda: self, settings.path)
        else:
            ssl = settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
            await loop.create_connection(
                lambda: self,
                settings.host,
                settings.port,
                ssl=ssl,
                server_hostname=settings.host if ssl else None,
            )
        password = options.get("password")
        if password:
            user = options.get("username")
            await self.call(*(["AUTH", user, password] if user else ["AUTH", password]))
        if options.get("db"):
            await self.call("SELECT", options["db"])
        await self.call("PING")  # a subscriber's PING gets a push; before SUBSCRIBE, a reply

    @property
    def closing(self) -> bool:
        """Closed, or closing. uvloop closes a transport the moment the peer closes the
        socket but calls ``connection_lost`` a loop turn later: in between, writing would
        raise RuntimeError."""
        return self.transport is None or self.transport.is_closing()

    def send(self, commands: list[tuple[bytes, Handler]]) -> None:
        """Write packed commands; each reply goes to its handler as it comes. Raises
        ConnectionError if the connection is closing (lost, not yet reported)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to Redis is closing")
        if self._on_message is None:
            now = self._clock()
            self._replies.extend((now, handler) for _, handler in commands)
        self.transport.write(b"".join(command for command, _ in commands))
        if self.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.transport.abort()

    async def subscribe(self, command: str, channel: str, timeout: float) -> None:
        """Subscribe, and return once Redis confirms: from then on every message published
        on the channel comes. Raises ConnectionError, or TimeoutError (Redis stalled)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to Redis is closing")
        confirmed = asyncio.get_running_loop().create_future()
        self._confirming.setdefault(channel.encode(), deque()).append(confirmed)
        self.transport.write(pack(command, channel))
        await asyncio.wait_for(confirmed, timeout)

    def ping(self) -> None:
        """A PING whose reply (a push, on a subscribed connection) counts as any other."""
        if self.transport is None or self.transport.is_closing():
            return
        self._replies.append((self._clock(), None))
        self.transport.write(pack("PING"))

    def waiting(self, now: float) -> float:
        """Seconds the oldest reply has been due (0: none is)."""
        return now - self._replies[0][0] if self._replies else 0.0

    async def call(self, *args: str | bytes | int) -> Any:
        """A command whose reply we wait for (set-up: AUTH, SELECT, PING)."""
        assert self.transport is not None
        reply = asyncio.get_running_loop().create_future()
        self._replies.append((self._clock(), reply))
        self.transport.write(pack(*args))
        return await reply

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

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
                    if reply[0] in _SUBSCRIBED and self._confirming:
                        self._confirmed(reply[1])
                    continue
                if reply[0] == _PONG:
                    reply = b"PONG"
            self._reply(reply)

    def _confirmed(self, channel: bytes) -> None:
        waiting = self._confirming.get(channel)
        while waiting:
            confirmed = waiting.popleft()
            if not confirmed.done():  # else given up on (timed out)
                confirmed.set_result(None)
                break
        if not waiting:
            self._confirming.pop(channel, None)

    def _reply(self, reply: Any) -> None:
        handler = self._replies.popleft()[1] if self._replies else None
        if isinstance(handler, asyncio.Future):
            if isinstance(reply, hiredis.ReplyError):
                handler.set_exception(ResponseError(str(reply)))
            else:
                handler.set_result(reply)
        elif handler is not None:
            handler(reply)
        if self.on_reply is not None:
            self.on_reply()

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError("connection closed by Redis")
        for _, waiting in self._replies:
            if isinstance(waiting, asyncio.Future) and not waiting.done():
                waiting.set_exception(ConnectionError(str(error)))
        self._replies.clear()
        for confirming in self._confirming.values():
            for confirmed in confirming:
                if not confirmed.done():
                    confirmed.set_exception(ConnectionError(str(error)))
        self._confirming.clear()
        if not self._closing:
            self._on_lost(error)
