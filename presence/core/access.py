"""Who may do what in a room: a room token's claims to a decision, without I/O or clock.

With ``--auth token`` every request for a room carries a room token (a JWT, HS256,
signed with the service's secret) that the application's backend issued. Its signature
and encoding are checked by :mod:`presence.access.rules` (PyJWT); what its claims
allow is decided here, with the time given by the caller:

- ``room`` (exact) or ``room_prefix`` (every room whose name starts with it): exactly
  one of them;
- ``exp``: seconds since the epoch; the token is refused from then on;
- ``role``: ``member`` (join and view, the default) or ``viewer`` (view only: the REST
  and SSE views, no WebSocket);
- ``name``, ``color`` (``#rrggbb``), ``username``: the identity to show, each optional;
  what is given replaces that part of the member's identity.

With ``--auth jupyterhub`` a room belongs to a hub user's server: ``<owner>/<server>:<room>``
(``<server>`` empty for the default one). Its owner may enter, and whoever it is shared
with (JupyterHub >= 5 shares, to them or to one of their groups); the hub's answers are
fetched by :mod:`presence.access.jupyterhub`, judged here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from presence.core.colors import parse_hex
from presence.core.identity import Identity, initials_of

Want = Literal["join", "view"]
ROLES = ("member", "viewer")
MAX_IDENTITY_CHARS = 100


class AccessError(Exception):
    """A request refused: ``status`` 401 (no usable token: get a new one), 403 (a good
    token that does not allow this) or 503 (the hub that would tell is unreachable);
    ``code`` names the reason for programs."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        """The WebSocket close code: 4401 or 4403; 1013 (try again later) for a 503."""
        return 1013 if self.status == 503 else 4000 + self.status


def missing() -> AccessError:
    return AccessError(401, "missing_token", "this room needs an access token (access_token)")


def invalid(detail: str) -> AccessError:
    return AccessError(401, "invalid_token", f"invalid access token: {detail}")


def expired() -> AccessError:
    return AccessError(401, "token_expired", "access token expired: fetch a new one")


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows, for the request it was checked for."""

    role: str
    expires: float  # seconds since the epoch
    name: str | None = None
    color: str | None = None
    username: str | None = None

    @property
    def has_identity(self) -> bool:
        return any(v is not None for v in (self.name, self.color, self.username))

    def identity(self, base: Callable[[], Identity]) -> Identity | None:
        """The member's identity with the claimed parts in place of ``base()``'s (None
        if the token claims none: the usual identity applies)."""
        if not self.has_identity:
            return None
        given = base()
        name = self.name or given.name
        return Identity(
            self.username or given.username,
            name,
            initials_of(name) if self.name else given.initials,
            self.color or given.color,
        )


def _text(claims: Mapping[str, Any], key: str) -> str | None:
    value = claims.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_IDENTITY_CHARS:
        raise invalid(f"claim {key!r} must be a string of 1 to {MAX_IDENTITY_CHARS} characters")
    return value.strip()


def decide(claims: Mapping[str, Any], room: str, want: Want, now: float) -> Grant:
    """What the verified ``claims`` allow for ``want`` in ``room`` at ``now`` (seconds
    since the epoch); raises :class:`AccessError`."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise invalid("claim 'exp' must be a number of seconds since the epoch")
    if now >= exp:
        raise expired()
    exact, prefix = claims.get("room"), claims.get("room_prefix")
    if (exact is None) == (prefix is None):
        raise invalid("give exactly one of the claims 'room' and 'room_prefix'")
    for key, value in (("room", exact), ("room_prefix", prefix)):
        if value is not None and (not isinstance(value, str) or not value):
            raise invalid(f"claim {key!r} must be a non-empty string")
    role = claims.get("role", "member")
    if role not in ROLES:
        raise invalid(f"claim 'role' must be one of {', '.join(ROLES)}")
    color = _text(claims, "color")
    if color is not None:
        try:
            parse_hex(color)
        except ValueError:
            raise invalid("claim 'color' must be a colour like #1f77b4") from None
    grant = Grant(
        role, float(exp), _text(claims, "name"), color and color.lower(), _text(claims, "username")
    )
    if not (room == exact if exact is not None else room.startswith(str(prefix))):
        raise AccessError(403, "other_room", "this access token is for another room")
    if want == "join" and role != "member":
        raise AccessError(
            403, "read_only", "a viewer token may read the room's views but not join it"
        )
    return grant


# -- JupyterHub ------------------------------------------------------------------------------


def server_of(room: str) -> tuple[str, str]:
    """The hub server ``(owner, server name)`` a room belongs to; raises
    :class:`AccessError` if the name is not ``<owner>/<server>:<room>``."""
    owner, slash, rest = room.partition("/")
    server, colon, name = rest.partition(":")
    if not (owner and slash and colon and name) or "/" in server:
        raise AccessError(
            403,
            "other_room",
            "rooms here belong to a hub server: name them <owner>/<server>:<room> "
            "(<server> empty for the default server)",
        )
    return owner, server


def may_enter(user: str, room: str, shares: Iterable[Mapping[str, Any]]) -> bool:
    """Whether hub user ``user`` may enter ``room``: they own its server, or one of
    ``shares`` (``GET /hub/api/users/{user}/shared`` items, which include the shares
    granted to the user's groups) is of that server and grants access to it."""
    owner, server = server_of(room)
    if user == owner:
        return True
    for share in shares:
        shared = share.get("server") or {}
        if (
            (shared.get("user") or {}).get("name") == owner
            and shared.get("name") == server
            and any(str(scope).startswith("access:servers") for scope in share.get("scopes") or ())
        ):
            return True
    return False


def not_shared(user: str, room: str) -> AccessError:
    owner, server = server_of(room)
    return AccessError(
        403, "not_shared", f"the server {owner}/{server} is not shared with the hub user {user}"
    )


def parse_origins(text: str) -> frozenset[str]:
    """``--allowed-origins``: comma-separated origins like ``https://example.com`` or
    ``http://localhost:3000`` (scheme, host and port; no path); empty: any origin."""
    origins = set()
    for part in text.split(","):
        origin = part.strip().lower()
        if not origin:
            continue
        scheme, sep, rest = origin.partition("://")
        if origin != "null" and (
            not sep or scheme not in ("http", "https") or not rest or "/" in rest
        ):
            raise ValueError(
                f"expected origins like https://example.com or http://localhost:3000 "
                f"(scheme://host[:port], no path), got {part.strip()!r}"
            )
        origins.add(origin)
    return frozenset(origins)


def origin_allowed(
    origin: str | None, allowed: frozenset[str] | None, host: str | None = None
) -> bool:
    """Whether a request with this ``Origin`` may go on: one without (a program, not a
    browser), any origin where ``allowed`` is None, one of ``allowed``, or a page of this
    very service (its host and port are the request's ``Host``)."""
    if origin is None or allowed is None:
        return True
    origin = origin.strip().lower()
    if origin in allowed:
        return True
    _, sep, netloc = origin.partition("://")
    return bool(sep) and host is not None and netloc == host.strip().lower()


def bearer(header: str) -> str | None:
    """The credential of ``Authorization: Bearer <credential>``, else None: the scheme
    is case-insensitive (RFC 7235), and a bare token or another scheme is no credential."""
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential or " " in credential:
        return None
    return credential
