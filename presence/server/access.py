"""``--auth`` and ``--allowed-origins`` at the doors: WebSockets, the REST and SSE views.

The room token's signature and encoding are checked with PyJWT (HS256 only, ``exp``
required); what its claims allow is :func:`presence.core.access.decide`. With
``--auth jupyterhub`` the hub answers (:mod:`presence.server.jupyterhub_auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
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
from presence.core.identity import hub_face
from presence.core.room import is_valid_room_name
from presence.server.access_log import access_log_of
from presence.server.views import bearer

if TYPE_CHECKING:
    from presence.server.connection import Connection
    from presence.server.hub import Hub
    from presence.server.jupyterhub_auth import JupyterHubAuth

# The query parameter of the room token (``token`` is the identity token's).
PARAMETER = "access_token"
ALGORITHMS = ["HS256"]
CLOCK_SKEW = 60  # seconds a token's "not before" may be ahead of this clock


@dataclass(frozen=True)
class Access:
    """A deployment's rules: ``mode`` ('none', 'token' or 'jupyterhub'), the secret of
    room tokens, the origins allowed besides the service's own (None: any), and in
    'jupyterhub' mode the hub that answers."""

    mode: str
    secret: str
    origins: frozenset[str] | None
    clock: Callable[[], float] = time.time
    jupyterhub: JupyterHubAuth | None = None
    previous_secrets: tuple[str, ...] = ()  # being rotated out: their tokens still pass

    @staticmethod
    def of(hub: Any) -> Access:
        """The rules of ``hub``'s settings (a stand-in of a test without auth settings:
        no tokens, any origin). One per hub, not per settings: in hub mode it holds an
        HTTP client and a recheck task, which two apps must not share."""
        settings = hub.settings
        if not isinstance(settings, Settings):
            return Access("none", "", None)
        found = _accesses.get(hub)
        if found is None:
            found = _accesses[hub] = _access_of(settings)
        return found

    async def start(self) -> None:
        if self.jupyterhub is not None:
            await self.jupyterhub.start()

    async def stop(self) -> None:
        if self.jupyterhub is not None:
            await self.jupyterhub.stop()

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        # The request's own host counts as allowed only for a hub service, whose public
        # address the hub may not say; elsewhere it would let DNS rebinding through.
        return origin_allowed(origin, self.origins, host if self.jupyterhub else None)

    def token_of(
        self, headers: Mapping[str, str], query: Mapping[str, str], *, http: bool = False
    ) -> str | None:
        """The credential a request carries (a WebSocket's, or with ``http`` a REST or
        SSE view's), where this mode looks for it."""
        if self.jupyterhub is not None:
            return self.jupyterhub.token_of(headers, query, via="http" if http else "websocket")
        # Another scheme (``Basic`` from an auth proxy in front) is not ours: the query
        # parameter applies then (EventSource cannot set headers anyway).
        return bearer(headers.get("authorization", "")) or query.get(PARAMETER)

    async def check(self, token: str | None, room: str, want: Want) -> Grant | None:
        """The grant of ``token`` for ``want`` in ``room`` (None: no tokens here);
        raises :class:`AccessError`."""
        if self.jupyterhub is not None:
            return await self.jupyterhub.check(token, room, want)
        return self.check_token(token, room, want)

    def check_token(self, token: str | None, room: str, want: Want) -> Grant | None:
        """:meth:`check` of a room token (``--auth token``; None in 'none' mode)."""
        if self.mode != "token":
            return None
        if not token:
            raise missing()
        for key in (self.secret, *self.previous_secrets):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=ALGORITHMS,
                    # ``iat`` is not checked: a backend whose clock runs ahead would mint
                    # tokens "from the future" that PyJWT refuses. The leeway lets an
                    # ``nbf`` a little ahead pass; ``exp`` is decided without it (decide()).
                    options={"require": ["exp"], "verify_iat": False},
                    leeway=CLOCK_SKEW,
                )
            except jwt.ExpiredSignatureError:
                raise expired() from None
            except jwt.InvalidSignatureError:
                continue  # perhaps signed with a secret being rotated out
            except jwt.InvalidTokenError as exc:
                raise invalid(str(exc)) from None
            return decide(claims, room, want, self.clock())
        raise invalid("bad signature (not signed with this service's secret)")

    def until_expiry(self, grant: Grant | None) -> float | None:
        """Seconds left of ``grant``; None if it does not expire."""
        if grant is None or math.isinf(grant.expires):
            return None
        return max(0.0, grant.expires - self.clock())


_accesses: weakref.WeakKeyDictionary[Hub, Access] = weakref.WeakKeyDictionary()


def _access_of(settings: Settings) -> Access:
    origins = parse_origins(settings.allowed_origins)
    if settings.auth != "jupyterhub":
        previous = tuple(settings.previous_secret_list)
        return Access(settings.auth, settings.secret, origins or None, previous_secrets=previous)
    from presence.server.jupyterhub_auth import HubService, JupyterHubAuth

    service = HubService.from_env(os.environ)
    if not origins and service.public_origin:
        origins = frozenset([service.public_origin])  # and, as always, the service's own
    anonymous = None
    if settings.jupyterhub_anonymous:
        # The faces the hub's post_auth_hook gives JupyterLab (presence.jupyter.hub): the
        # same name, initials and colour from the same secret, whatever --name-style says.
        anonymous = partial(hub_face, settings.secret)
    hub = JupyterHubAuth(
        service,
        recheck=settings.jupyterhub_recheck,
        anonymous=anonymous,
        websocket_cookie=settings.jupyterhub_allow_websocket_cookie,
    )
    return Access(settings.auth, settings.secret, origins, jupyterhub=hub)


# -- WebSockets -----------------------------------------------------------------------------


class Admission:
    """A socket let into a room: its grant, and what closes it when that ends: the timer
    of its token's expiry (4401), the hub's answer changing (4403: a share revoked).
    Cancel it when the socket closes."""

    def __init__(self, grant: Grant | None) -> None:
        self.grant = grant
        self._timer: asyncio.TimerHandle | None = None
        self._unwatch: Callable[[], None] | None = None

    @staticmethod
    async def of(connection: Connection, room: str, want: Want = "join") -> Admission:
        """Raises :class:`AccessError`: close the socket with its ``close_code``."""
        access = Access.of(connection.hub)
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


# -- HTTP -----------------------------------------------------------------------------------


def _refusal(exc: AccessError) -> Response:
    headers = {"WWW-Authenticate": f'Bearer error="{exc.code}"'} if exc.status == 401 else None
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )


Handler = Callable[[Request], Awaitable[Response]]

# A room's views are data, never a page: no page may frame them (a same-origin frame
# could read what the viewer's cookie lets in), and nothing in them may load or run.
VIEW_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def guarded(handler: Handler, *, stream: bool = False) -> Handler:
    """:func:`checked`, with :data:`VIEW_HEADERS` on every answer."""
    view = checked(handler, stream=stream)

    async def framed(request: Request) -> Response:
        response = await view(request)
        response.headers.update(VIEW_HEADERS)
        return response

    return framed


def checked(handler: Handler, *, stream: bool = False) -> Handler:
    """``handler`` (a view of one room) behind the room's access rules and, for a
    stream, the Origin check; a stream ends when its access does (token expired,
    share revoked)."""

    async def view(request: Request) -> Response:
        hub = request.app.state.hub
        access = Access.of(hub)
        metrics = hub.metrics
        room = request.path_params["room"]

        def refusal(reason: str, message: str, status: int) -> None:
            metrics.refused(reason)
            # The client as uvicorn's proxy headers make it (with --forwarded-allow-ips
            # '*' the leftmost X-Forwarded-For entry, where the limits take the last).
            ip = request.client.host if request.client else None
            access_log_of(hub).refused(
                "sse" if stream else "http", ip, reason, message, room=room, status=status
            )

        if stream and not access.origin_allowed(
            request.headers.get("origin"), request.headers.get("host")
        ):
            message = "this origin may not use this service"
            refusal("origin", message, 403)
            return JSONResponse({"error": "origin", "message": message}, status_code=403)
        grant, token = None, None
        if is_valid_room_name(room):  # else the view answers 400
            try:
                token = access.token_of(request.headers, request.query_params, http=True)
                grant = await access.check(token, room, "view")
            except AccessError as exc:
                refusal("access_" + exc.code, exc.message, exc.status)
                return _refusal(exc)
        response = await handler(request)
        left = access.until_expiry(grant)
        jupyterhub = access.jupyterhub if token else None
        if not isinstance(response, StreamingResponse) or (left is None and jupyterhub is None):
            return response

        def arm(ended: asyncio.Event) -> Callable[[], None]:
            """Set ``ended`` when the token expires or the hub revokes; returns the
            function that disarms both."""
            timer = None if left is None else asyncio.get_running_loop().call_later(left, ended.set)
            unwatch = (
                None
                if jupyterhub is None
                else jupyterhub.watch(str(token), room, lambda _: ended.set())
            )

            def disarm() -> None:
                if timer is not None:
                    timer.cancel()
                if unwatch is not None:
                    unwatch()

            return disarm

        response.body_iterator = until(response.body_iterator, arm)
        return response

    return view


async def until(
    stream: AsyncIterable[Any], arm: Callable[[asyncio.Event], Callable[[], None]]
) -> AsyncIterator[Any]:
    """``stream`` until the event that ``arm`` is given is set, then the end. Armed when
    the stream starts, disarmed and ``stream`` closed however it ends (a client that
    goes away cancels it)."""
    ended = asyncio.Event()
    disarm = arm(ended)
    chunks = aiter(stream)
    waiting = asyncio.ensure_future(ended.wait())
    try:
        while not ended.is_set():
            next_chunk = asyncio.ensure_future(anext(chunks))
            try:
                await asyncio.wait((next_chunk, waiting), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not next_chunk.done():  # ended, or this stream was cancelled
                    next_chunk.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await next_chunk
            if next_chunk.cancelled() or isinstance(next_chunk.exception(), StopAsyncIteration):
                return
            yield next_chunk.result()
    finally:
        waiting.cancel()
        disarm()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
