"""``--auth`` and ``--allowed-origins`` at the doors: WebSockets, the REST and SSE views.

The room token's signature and encoding are checked with PyJWT (HS256 only, ``exp``
required); what its claims allow is :func:`presence.core.access.decide`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from presence.config import Settings
from presence.core.access import (
    AccessError,
    Grant,
    Want,
    decide,
    expired,
    invalid,
    missing,
    origin_allowed,
    parse_origins,
)
from presence.core.room import is_valid_room_name

if TYPE_CHECKING:
    from presence.server.connection import Connection

# The query parameter of the room token (``token`` is the identity token's).
PARAMETER = "access_token"
ALGORITHMS = ["HS256"]


@dataclass(frozen=True)
class Access:
    """A deployment's rules: ``mode`` 'none' or 'token', its secret, allowed origins."""

    mode: str
    secret: str
    origins: frozenset[str]
    clock: Callable[[], float] = time.time

    @staticmethod
    def of(settings: Any) -> Access:
        """The rules of ``settings`` (a :class:`Settings`, or a stand-in of a test that
        has no auth settings: no tokens, any origin)."""
        if isinstance(settings, Settings):
            return _access_of(settings)
        return Access("none", "", frozenset())

    def origin_allowed(self, origin: str | None) -> bool:
        return origin_allowed(origin, self.origins)

    def check(self, token: str | None, room: str, want: Want) -> Grant | None:
        """The grant of ``token`` for ``want`` in ``room`` (None: no tokens here);
        raises :class:`AccessError`."""
        if self.mode != "token":
            return None
        if not token:
            raise missing()
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=ALGORITHMS,
                # ``iat`` is not checked: a backend whose clock runs ahead would mint
                # tokens "from the future" that PyJWT refuses (it has no leeway here).
                options={"require": ["exp"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise expired() from None
        except jwt.InvalidSignatureError:
            raise invalid("bad signature (not signed with this service's secret)") from None
        except jwt.InvalidTokenError as exc:
            raise invalid(str(exc)) from None
        return decide(claims, room, want, self.clock())

    def until_expiry(self, grant: Grant | None) -> float | None:
        """Seconds left of ``grant``; None if it does not expire."""
        return None if grant is None else max(0.0, grant.expires - self.clock())


@lru_cache(maxsize=8)
def _access_of(settings: Settings) -> Access:
    return Access(settings.auth, settings.secret, parse_origins(settings.allowed_origins))


# -- WebSockets -----------------------------------------------------------------------------


class Admission:
    """A socket let into a room: its grant, and the timer that closes it with 4401 when
    the token expires (cancel it when the socket closes)."""

    def __init__(self, connection: Connection, room: str, want: Want = "join") -> None:
        """Raises :class:`AccessError`: close the socket with its ``close_code``."""
        access = Access.of(connection.hub.settings)
        self.grant = access.check(connection.query.get(PARAMETER), room, want)
        left = access.until_expiry(self.grant)
        self._timer = (
            None
            if left is None
            else asyncio.get_running_loop().call_later(
                left, connection.close, 4401, "token expired"
            )
        )

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def refused(connection: Connection, exc: AccessError) -> None:
    connection.hub.metrics.refused("access_" + exc.code)
    connection.close(exc.close_code, exc.message[:120])


# -- HTTP -----------------------------------------------------------------------------------


def request_token(request: Request) -> str | None:
    """``Authorization: Bearer <token>``, else ``?access_token=`` (EventSource cannot set
    headers). Another scheme (``Basic`` from an auth proxy in front) is not ours: the
    query parameter applies then."""
    from presence.server.views import bearer

    return bearer(request.headers.get("authorization", "")) or request.query_params.get(PARAMETER)


def _refusal(exc: AccessError) -> Response:
    headers = {"WWW-Authenticate": f'Bearer error="{exc.code}"'} if exc.status == 401 else None
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler, *, stream: bool = False) -> Handler:
    """``handler`` (a view of one room) behind the room token and, for a stream, the
    Origin check; a stream ends when its token expires."""

    async def view(request: Request) -> Response:
        access = Access.of(request.app.state.hub.settings)
        if stream and not access.origin_allowed(request.headers.get("origin")):
            request.app.state.hub.metrics.refused("origin")
            return JSONResponse(
                {"error": "origin", "message": "this origin may not use this service"},
                status_code=403,
            )
        room = request.path_params["room"]
        grant = None
        if is_valid_room_name(room):  # else the view answers 400
            try:
                grant = access.check(request_token(request), room, "view")
            except AccessError as exc:
                request.app.state.hub.metrics.refused("access_" + exc.code)
                return _refusal(exc)
        response = await handler(request)
        left = access.until_expiry(grant)
        if left is not None and isinstance(response, StreamingResponse):
            response.body_iterator = until(response.body_iterator, left)
        return response

    return view


async def until(stream: AsyncIterable[Any], seconds: float) -> AsyncIterator[Any]:
    """``stream`` for ``seconds``, then the end (the stream is closed)."""
    chunks = aiter(stream)
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                chunk = await asyncio.wait_for(anext(chunks), left)
            except (StopAsyncIteration, TimeoutError):
                return
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
