"""The Starlette application: routes and lifespan."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from presence.access.http import guarded
from presence.access.rules import make_access
from presence.backplane.base import Backplane
from presence.backplane.memory import MemoryBackplane
from presence.backplane.replication import Replication
from presence.config import Settings
from presence.core.identity import IdentityFactory
from presence.endpoints.json import JsonEndpoint
from presence.hub.hub import Hub, new_replica_id
from presence.logs.access import AccessLog
from presence.metrics import watch_hub, watch_limits, watch_replication
from presence.scopes.base import ScopeStore
from presence.scopes.memory import MemoryScopes
from presence.server.health import healthz, metrics, readyz
from presence.server.identities import claim_rates, identity, post_identities
from presence.server.pages import STATIC, index
from presence.server.views import list_rooms, room_events, room_members
from presence.websocket.limits import Limits
from presence.yjs.endpoint import YjsEndpoint
from presence.yjs.holds import Holds

log = logging.getLogger("presence.app")


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


def make_scopes(settings: Settings) -> ScopeStore:
    """Where ``POST /identities`` holds identity scopes: the replicas' Redis, if any."""
    if not settings.redis_url:
        return MemoryScopes()
    from presence.scopes.redis import RedisScopes

    return RedisScopes(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout=max(1.0, 0.4 * settings.replica_timeout),  # as the backplane's reads
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
    return Hub(settings, identities=identities, backplane=make_backplane(settings))


def app_from_env() -> Starlette:
    """The application of a worker process, configured by PRESENCE_* variables."""
    from presence import logs

    settings = Settings.load()
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)


# The WebSocket endpoints, by the first segment of their path: /rooms/<room>, /yjs/<room>.
WEBSOCKET_ROUTES: dict[str, Any] = {"rooms": JsonEndpoint, "yjs": YjsEndpoint}


def create_app(
    settings: Settings,
    hub: Hub | None = None,
    websocket_routes: Mapping[str, Any] = WEBSOCKET_ROUTES,
    scopes: ScopeStore | None = None,
) -> Starlette:
    """The application, and what it shares with its WebSocket connections (its
    lifespan's state, which uvicorn hands them): the hub, the access rules and log, the
    connection limits, and which endpoint serves which path. The identity scopes
    (``scopes``: :func:`make_scopes` if not given) serve HTTP requests only
    (``app.state.scopes``)."""
    hub = hub or make_hub(settings)
    store = scopes or make_scopes(settings)
    access = make_access(settings)
    access_log = AccessLog(settings.access_log)
    limits = Limits(settings, hub.metrics)
    watch_hub(hub.metrics, hub)
    if isinstance(hub.backplane, Replication):
        watch_replication(hub.metrics, hub.backplane)
    watch_limits(hub.metrics, limits)
    Holds.of(hub)  # the Yjs endpoint's reserved client IDs, told those of other replicas
    shared = {
        "hub": hub,
        "access": access,
        "access_log": access_log,
        "connection_limits": limits,
        "websocket_routes": websocket_routes,
    }

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await hub.start()
        await access.start()
        log.info("presence ready", extra={"replica": hub.replica_id})
        try:
            # The state reaches the WebSocket connections (presence.websocket) too.
            yield shared
        finally:
            await access.stop()
            await hub.stop()
            await store.close()
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
        from presence.access.jupyterhub import hub_routes  # httpx: only on a hub

        routes += hub_routes(access.jupyterhub, settings.base_path)
    if settings.base_path:
        routes = [Mount(settings.base_path, routes=routes)]
    app = Starlette(
        # Pages on other origins (those of --allowed-origins, if set) may load the client
        # modules and read the views; WebSockets are not subject to CORS (their Origin
        # is checked in websocket/connection.py).
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
    for key, value in shared.items():
        setattr(app.state, key, value)
    app.state.scopes = store
    app.state.claim_rates = claim_rates(hub.settings.identity_claim_rate)
    return app
