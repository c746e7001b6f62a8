"""WebSockets let into a room: the grant of their token, and what closes them when it
ends (expiry, a share revoked on the hub)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from presence.access.rules import Access
from presence.core.access import AccessError, Grant, Want

if TYPE_CHECKING:
    from presence.websocket.connection import Connection


class Admission:
    """A socket let into a room: its grant, and what closes it when that ends: the timer
    of its token's expiry (4401), the hub's answer changing (4403: a share revoked).
    Cancel it when the socket closes."""

    def __init__(self, grant: Grant | None) -> None:
        self.grant = grant
        self._timer: asyncio.TimerHandle | None = None
        self._unwatch: Callable[[], None] | None = None

    @staticmethod
    async def of(
        access: Access, connection: Connection, room: str, want: Want = "join"
    ) -> Admission:
        """Raises :class:`AccessError`: close the socket with its ``close_code``."""
        token = access.token_of(connection.headers, connection.query)
        admission = Admission(await access.check(token, room, want))
        left = access.until_expiry(admission.grant)
        if left is not None:
            admission._timer = asyncio.get_running_loop().call_later(
                left, connection.close, 4401, "token expired"
            )
        if access.jupyterhub is not None and token:

            def revoke(exc: AccessError) -> None:
                connection.hub.metrics.refused("access_revoked")
                connection.close(exc.close_code, f"access revoked: {exc.message}"[:120])

            admission._unwatch = access.jupyterhub.watch(token, room, revoke)
        return admission

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None


def refused(connection: Connection, exc: AccessError) -> None:
    connection.hub.metrics.refused("access_" + exc.code)
    connection.close(exc.close_code, exc.message[:120])
