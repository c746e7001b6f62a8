"""The access rules at the HTTP doors: a room's REST and SSE views."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from presence.access.rules import Access
from presence.core.access import AccessError
from presence.core.room import is_valid_room_name
from presence.logs.access import access_log_of


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
        access: Access = request.app.state.access
        metrics = hub.metrics
        room = request.path_params["room"]

        def refusal(reason: str, message: str, status: int) -> None:
            metrics.refused(reason)
            # The client as uvicorn's proxy headers make it (with --forwarded-allow-ips
            # '*' the leftmost X-Forwarded-For entry, where the limits take the last).
            ip = request.client.host if request.client else None
            access_log_of(request.app.state).refused(
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
