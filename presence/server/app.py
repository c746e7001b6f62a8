"""The Starlette application: routes and lifespan."""

from __future__ import annotations

import html
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from presence.backplane.base import Backplane
from presence.backplane.memory import MemoryBackplane
from presence.backplane.replication import Replication
from presence.config import Settings
from presence.core.access import AccessError
from presence.core.identity import IdentityFactory, InvalidToken
from presence.server.access import Access, guarded
from presence.server.hub import Hub, new_replica_id
from presence.server.identities import claim_rates, post_identities
from presence.server.views import list_rooms, room_events, room_members

if TYPE_CHECKING:
    from presence.server.jupyterhub_auth import JupyterHubAuth

log = logging.getLogger("presence.app")
STATIC = Path(__file__).resolve().parent.parent / "static"


def make_backplane(settings: Settings) -> Backplane:
    replica = new_replica_id()
    if not settings.redis_url:
        return MemoryBackplane(replica)
    from presence.backplane.redis import RedisBackplane

    return RedisBackplane(
        replica,
        settings.redis_url,
        sharded=settings.redis_sharded,
        cluster=settings.redis_cluster,
        replica_timeout=settings.replica_timeout,
        permdown_after=settings.replica_permdown,
    )


def random_secret() -> str:
    """A secret for a server started without one, and the warning that goes with it."""
    log.warning(
        "PRESENCE_SECRET is not set: using a random secret. Identity tokens will "
        "not survive a restart, and replicas must share one secret."
    )
    return secrets.token_urlsafe(32)


def make_hub(settings: Settings) -> Hub:
    secret = settings.secret or random_secret()
    identities = IdentityFactory(
        secret.encode(),
        style=settings.name_style,  # type: ignore[arg-type]
        locale=settings.locale,
        seed=settings.seed,
        max_age=settings.token_max_age,
        previous=[s.encode() for s in settings.previous_secret_list],
    )
    hub = Hub(settings, identities=identities, backplane=make_backplane(settings))
    replication_metrics(hub)
    return hub


def replication_metrics(hub: Hub) -> None:
    """What the replication layer counts, next to the hub's backplane metrics."""
    backplane = hub.backplane
    if not isinstance(backplane, Replication):
        return
    m = hub.metrics
    m.gauges["backplane_replicas"] = (
        "Other replicas heard from and up, as this replica sees them.",
        lambda: backplane.replicas_up,
    )
    m.counters["backplane_replicas_down_total"] = (
        "Times another replica went silent and its members were removed here.",
        lambda: backplane.downs,
    )
    m.counters["backplane_gaps_total"] = (
        "Messages from other replicas found missing (their state was asked for again).",
        lambda: backplane.gaps,
    )
    m.counters["backplane_stalls_total"] = (
        "Times this replica's own timers ran later than the replica timeout allows "
        "(it announced its members again).",
        lambda: backplane.stalls,
    )


async def index(request: Request) -> Response:
    """The demo page: live cursors, the room's members, a link to share. It is told, in
    attributes of its ``<body>``, what it cannot learn by itself: the ``--auth`` mode,
    whether names are anonymous (``data-names``: ``anonymous``, or ``hub`` for hub user
    names) and, on a hub, whose page it is (``data-user``: rooms there are
    ``<owner>/<server>:<room>``, and its lobby is its user's, ``<user>/:lobby``)."""
    access = Access.of(request.app.state.hub)
    page = {"auth": access.mode, "names": "anonymous"}
    hub = access.jupyterhub
    if hub is not None:
        settings = request.app.state.hub.settings
        user = await _hub_user(hub, request)
        if user is False:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return hub.login(request, settings.base_path, here)  # and back here
        if not settings.jupyterhub_anonymous:
            page["names"] = "hub"
        if isinstance(user, str):
            page["user"] = user
    attributes = " ".join(f'data-{key}="{html.escape(value)}"' for key, value in page.items())
    text = (STATIC / "index.html").read_text(encoding="utf-8")
    text = text.replace("<body>", f"<body {attributes}>", 1)
    # Private: on a hub the page names its user.
    return HTMLResponse(text, headers={"Cache-Control": "no-cache, private"})


async def _hub_user(hub: JupyterHubAuth, request: Request) -> str | bool:
    """The hub user of the page's request (its cookie's token); False: log in first (no
    token, or one the hub disowns: a stale cookie would load a page whose every socket
    is refused with 4401); True: load the page without knowing whose it is (a hub that
    does not answer is no reason to log in again, nor is a token without access to this
    service: its sockets will say why)."""
    try:
        token = hub.token_of(request.headers, request.query_params)
        if not token:
            return False
        return (await hub.user(token)).name
    except AccessError as exc:
        return exc.status != 401


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    ready = hub.started and hub.backplane.ready
    body: dict[str, Any] = {"ready": ready, "backplane": type(hub.backplane).__name__}
    if (status := hub.backplane.status()) is not None:
        body["redis"] = status
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    return PlainTextResponse(
        hub.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


async def identity(request: Request) -> Response:
    """A fresh anonymous identity (or the one a token stands for), as jupyter_server's
    ``/api/me`` identity, with the token that keeps it."""
    hub: Hub = request.app.state.hub
    token = request.query_params.get("token")
    try:
        ident = hub.identities.verify(token) if token else hub.identities.create()
    except InvalidToken as exc:
        return JSONResponse({"error": "invalid_token", "message": str(exc)}, status_code=400)
    return JSONResponse(
        {"identity": ident.to_json(), "token": hub.identities.token(ident)},
        headers={"Cache-Control": "no-store"},
    )


def app_from_env() -> Starlette:
    """The application of a worker process, configured by PRESENCE_* variables."""
    from presence import logs

    settings = Settings.load()
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)


def create_app(settings: Settings, hub: Hub | None = None) -> Starlette:
    hub = hub or make_hub(settings)
    access = Access.of(hub)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Hub]]:
        await hub.start()
        await access.start()
        log.info("presence ready", extra={"replica": hub.replica_id})
        try:
            # The state reaches the WebSocket connections (server/connection.py) too.
            yield {"hub": hub}
        finally:
            await access.stop()
            await hub.stop()
            log.info("presence stopped", extra={"replica": hub.replica_id})

    routes: list[BaseRoute] = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/rooms", list_rooms),
        Route("/rooms/{room:path}/events", guarded(room_events, stream=True)),
        Route("/rooms/{room:path}", guarded(room_members)),
        Route("/identity", identity),
        Route("/identities", post_identities, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    if access.jupyterhub is not None:
        from presence.server.jupyterhub_auth import hub_routes  # httpx: only on a hub

        routes += hub_routes(access.jupyterhub, settings.base_path)
    if settings.base_path:
        routes = [Mount(settings.base_path, routes=routes)]
    app = Starlette(
        # Pages on other origins (those of --allowed-origins, if set) may load the client
        # modules and read the views; WebSockets are not subject to CORS (their Origin
        # is checked in server/connection.py).
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if access.origins is None else sorted(access.origins),
                allow_methods=["GET"],
                allow_headers=["Authorization"],
            )
        ],
        routes=routes,
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.state.claim_rates = claim_rates(hub.settings.identity_claim_rate)
    return app
