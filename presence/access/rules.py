"""``--auth`` and ``--allowed-origins`` at the doors: WebSockets, the REST and SSE views.

The room token's signature and encoding are checked with PyJWT (HS256 only, ``exp``
required); what its claims allow is :func:`presence.core.access.decide`. With
``--auth jupyterhub`` the hub answers (:mod:`presence.access.jupyterhub`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jwt

from presence.config import Settings
from presence.core.access import (
    Grant,
    Want,
    bearer,
    decide,
    expired,
    invalid,
    missing,
    origin_allowed,
    parse_origins,
)
from presence.core.identity import hub_face

if TYPE_CHECKING:
    from presence.access.jupyterhub import JupyterHubAuth

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


def make_access(settings: Settings) -> Access:
    """The rules of ``settings``. One per app: in hub mode it holds an HTTP client and a
    recheck task, which two apps must not share."""
    origins = parse_origins(settings.allowed_origins)
    if settings.auth != "jupyterhub":
        previous = tuple(settings.previous_secret_list)
        return Access(settings.auth, settings.secret, origins or None, previous_secrets=previous)
    from presence.access.jupyterhub import HubService, JupyterHubAuth

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
