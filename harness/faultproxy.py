"""A TCP proxy that injects network faults, for tests (the kernel here has no netem).

It forwards every connection to one upstream and can, at any moment and for every
connection open or to come:

- ``blackhole()``: stop forwarding in both directions without closing anything, as a
  partition does: the peers see silence, not an error, and what they send waits in
  buffers (TCP would retransmit it);
- ``delay(seconds)``: hold each chunk that long before forwarding it;
- ``reset()``: abort every open connection (both sides get a reset);
- ``heal()``: forward again, what waited included, in order (TCP delivers it once the
  partition heals, if the connection outlived it).

It runs in its own thread with its own event loop, so that a test's loop, or a
blocking test, can drive it; every method is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._flowing: asyncio.Event | None = None  # made in the proxy's loop
        self._delay = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- faults ----------------------------------------------------------------------

    def blackhole(self) -> None:
        self._call(self._set_flowing(False))

    def heal(self) -> None:
        self._call(self._set_flowing(True))
        self.delay(0.0)

    def delay(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_delay", seconds)

    def reset(self) -> None:
        self._call(self._reset())

    @property
    def connections(self) -> int:
        return len(self._writers) // 2

    # -- inside the proxy's loop -----------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        # Pipes waiting on a blackhole would wait for ever: end them before the loop.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _reset(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        flowing = self._flowing
        assert flowing is not None
        try:
            while True:
                await flowing.wait()  # a blackhole reads nothing: senders' buffers fill
                data = await src.read(65536)
                if not data:
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                await flowing.wait()  # what was read as the blackhole began waits too
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()
