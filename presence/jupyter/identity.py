"""``PresenceIdentityProvider``: JupyterLab's anonymous collaborators get presence
identities (a name, initials and a readable colour, all distinct among the server's live
users) instead of jupyter_server's "Anonymous <moon>" with no colour::

    jupyter lab --ServerApp.identity_provider_class=presence.jupyter.PresenceIdentityProvider

Token and password login work as with jupyter_server's default provider, which this one
extends. The identity rides in the signed login cookie as a presence token, so a browser
keeps it across reloads and server restarts (while the secret and jupyter's cookie secret
stay). With ``url`` set, identities come from a presence service, unique within
``scope`` across all its replicas; without it, or while the service fails, this server
makes them itself with the same code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from jupyter_server.auth.identity import PasswordIdentityProvider, UpdatableField, User
from tornado import web
from traitlets import Enum, Float, List, TraitError, Unicode, default, validate

from presence import config
from presence.core.colors import is_hex, parse_hex, pick_color
from presence.core.distinct import LiveIdentities, choose, create
from presence.core.identity import (
    NAME_STYLES,
    Identity,
    IdentityFactory,
    InvalidToken,
    NameStyle,
    initials_of,
)
from presence.core.room import ROOM_NAME_RULE, is_valid_room_name
from presence.jupyter.identity_client import ServiceClient

MAX_LIVE_SECONDS = 7 * 24 * 3600.0  # the service's longest ttl
# A login's identity is held this long until its cookie comes back, then live_seconds. A
# browser's next request comes within seconds; API clients that send the token with every
# request and drop the cookie are each "a new user", and must not hold names for long.
PENDING_SECONDS = 60.0


@dataclass(slots=True)
class _Person:
    """One browser's identity, as this server knows it."""

    token: str  # what its cookie keeps: the identity it wants, signed
    wanted: Identity
    shown: Identity  # what /api/me shows now: ``wanted``, changed where another holds it
    renewed: float = -1e18  # when the service last renewed it (monotonic); never yet
    renewing: bool = False
    stale_cookie: bool = False  # the cookie does not hold ``token`` yet (jupyter's JSON)


class PresenceIdentityProvider(PasswordIdentityProvider):
    name_style = Enum(
        list(NAME_STYLES),
        default_value="jupyter",
        config=True,
        help="Names made by this server: 'jupyter' (Anonymous Io), 'animal' (Brave Otter) "
        "or 'person' (a faker name in `locale`), like presence's --name-style. With `url`, "
        "the service's --name-style applies.",
    )
    locale = Unicode("en_US", config=True, help="Faker locale for the 'person' name style.")
    secret = Unicode(
        config=True,
        help="Secret that signs the identity tokens kept in login cookies. Default: "
        "$PRESENCE_SECRET; if unset, one derived from the server's cookie secret (which "
        "jupyter keeps across restarts). With `url`, it must be the service's secret.",
    )
    url = Unicode(
        "",
        config=True,
        help="Base URL of a presence service (http://host:8000) to get identities from, "
        "unique within `scope` across its replicas. Empty: identities are made here.",
    )
    scope = Unicode(
        config=True,
        help="The presence scope whose live identities are kept distinct: this server's "
        "users. Default: PresenceJupyter.scope if set, else as the mirror derives it: the "
        "hub user (USER~SERVER for a named server) on JupyterHub, else HOSTNAME-PORT.",
    )
    live_seconds = Float(
        3600.0,
        config=True,
        help="A user is live while any request of theirs came within this many seconds: "
        "no other live user shows their name, initials or colour.",
    )
    renew_seconds = Float(
        300.0,
        config=True,
        help="Renew a live user's identity with the service at most this often (and at "
        "least three times per live_seconds), in the background.",
    )
    timeout = Float(2.0, config=True, help="Seconds to wait for the service per request.")
    retry_after = Float(
        30.0,
        config=True,
        help="After the service failed, seconds without calling it (identities are made "
        "here meanwhile).",
    )
    # Identities are assigned to be distinct; a self-chosen name or colour would defeat
    # that. Set ["name", "color"] to let users PATCH /api/me: what they choose becomes what
    # they want, still shown with the smallest change that keeps it distinct.
    updatable_fields: List[str] = List(
        config=True, default_value=[], help="Fields users may PATCH."
    )

    # Why "live" means "seen within live_seconds": a server does not learn when a browser
    # tab closes, but a visible JupyterLab tab polls it every few seconds (hidden tabs
    # pause most polling; a WebSocket counts when it opens). An hour keeps a name through
    # a tab left in the background or a lunch break, and frees it an hour after its holder
    # left; a returning user whose name was taken meanwhile shows "... 2" until it is free
    # again (their cookie still wants the plain name).

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory: IdentityFactory | None = None
        self._service: ServiceClient | None = None
        self._live = LiveIdentities()
        self._people: dict[str, _Person] = {}
        self._replaced: dict[str, str] = {}  # unreadable cookie -> username it now has
        self._tasks: set[asyncio.Task[None]] = set()

    # -- configuration -----------------------------------------------------------------

    @default("secret")
    def _default_secret(self) -> str:
        return os.environ.get("PRESENCE_SECRET", "")

    @default("scope")
    def _default_scope(self) -> str:
        # The mirror's scope (presence.jupyter.extension), so that one name stands for this
        # server in presence. Read at the first request: the port is bound by then.
        from presence.jupyter.extension import SCOPE_MAX, default_scope
        from presence.jupyter.mirror import sanitize

        chosen = (self.config.get("PresenceJupyter") or {}).get("scope")
        if chosen:
            return sanitize(str(chosen))[:SCOPE_MAX]
        if self.parent is not None and hasattr(self.parent, "port"):
            return default_scope(self.parent)
        return sanitize(socket.gethostname())[:SCOPE_MAX]

    @validate("scope")
    def _validate_scope(self, proposal: dict[str, Any]) -> str:
        value: str = proposal["value"]
        if not is_valid_room_name(value):
            raise TraitError(f"PresenceIdentityProvider.scope: {ROOM_NAME_RULE}; got {value!r}")
        return value

    @validate("locale")
    def _validate_locale(self, proposal: dict[str, Any]) -> str:
        try:
            return config.locale(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"PresenceIdentityProvider.locale: {exc}") from None

    @validate("url")
    def _validate_url(self, proposal: dict[str, Any]) -> str:
        value: str = proposal["value"]
        if value and not value.startswith(("http://", "https://")):
            raise TraitError(f"PresenceIdentityProvider.url: expected http(s)://…, got {value!r}")
        return value.rstrip("/")

    @validate("live_seconds", "renew_seconds", "timeout", "retry_after")
    def _validate_seconds(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if not 0 < value <= MAX_LIVE_SECONDS:
            name = proposal["trait"].name
            raise TraitError(f"PresenceIdentityProvider.{name}: 0 < seconds <= 604800")
        return value

    @property
    def factory(self) -> IdentityFactory:
        if self._factory is None:
            style = cast(NameStyle, self.name_style)
            self._factory = IdentityFactory(self._secret(), style=style, locale=self.locale)
        return self._factory

    def _secret(self) -> bytes:
        if self.secret:
            return self.secret.encode()
        cookie_secret = getattr(self.parent, "cookie_secret", b"")
        if cookie_secret:
            # jupyter keeps its cookie secret in a file across restarts, and without it the
            # login cookie is lost anyway; a derived key is not the cookie key itself.
            return hmac.new(cookie_secret, b"presence-identity", hashlib.sha256).digest()
        self.log.warning("PresenceIdentityProvider: no secret; identities end with the process")
        return secrets.token_bytes(32)

    @property
    def service(self) -> ServiceClient | None:
        if self._service is None and self.url:
            self._service = ServiceClient(
                self.url,
                self.scope,
                key=self.factory.scope_key(self.scope),
                verify=self.factory.verify,
                timeout=self.timeout,
                retry_after=self.retry_after,
                log=self.log,
            )
        return self._service

    # -- jupyter_server's hooks --------------------------------------------------------

    def generate_anonymous_user(self, handler: web.RequestHandler) -> User:
        """A new user (a token or password login without a cookie of ours)."""
        return _user(self._new().shown)

    def user_to_cookie(self, user: User) -> str:
        person = self._people.get(user.username)
        if person is not None and (user.name, user.color) in (
            (person.shown.name, person.shown.color),
            (person.wanted.name, person.wanted.color),
        ):
            return person.token
        # Changed by PATCH /api/me (see updatable_fields), or a user made elsewhere: what
        # it is now is what it wants from now on.
        wanted = self._wanted_from(user, person.wanted.color if person else None)
        person = self._know(wanted, self.factory.token(wanted), time.monotonic())
        return person.token

    def user_from_cookie(self, cookie_value: str) -> User | None:
        # The cookie is signed by tornado with jupyter's cookie secret: only this server
        # wrote it. It holds a presence token, or jupyter's JSON from before this provider.
        if cookie_value.startswith("{"):
            legacy = super().user_from_cookie(cookie_value)
            if legacy is None:
                return None
            known = self._people.get(legacy.username)
            wanted = self._wanted_from(legacy, known.wanted.color if known else None)
            person = self._seen(wanted, self.factory.token(wanted))
            person.stale_cookie = True
            return _user(person.shown)
        try:
            wanted = self.factory.verify(cookie_value)
        except InvalidToken:
            # Signed with another secret (it was changed): a new identity, same login.
            replaced = self._people.get(self._replaced.get(cookie_value, ""))
            if replaced is None:
                self.log.info("identity token of another secret in a login cookie: replaced")
                replaced = self._new()
                replaced.stale_cookie = True
                if len(self._replaced) > 10_000:
                    self._replaced.clear()
                self._replaced[cookie_value] = replaced.wanted.username
            return _user(self._seen(replaced.wanted, replaced.token).shown)
        return _user(self._seen(wanted, cookie_value).shown)

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        got = super().get_user(handler)
        user: User | None = await got if inspect.isawaitable(got) else got
        if user is not None:
            person = self._people.get(user.username)
            if person is not None and person.stale_cookie:
                person.stale_cookie = False  # from now on the cookie holds our token
                self.set_login_cookie(handler, user)
        return user

    def check_update(self, user_data: dict[UpdatableField, str]) -> None:
        super().check_update(user_data)
        if "color" in user_data:
            try:
                parse_hex(user_data["color"])
            except (ValueError, TypeError):
                raise ValueError("color must be like #1A2B3C") from None
        if "name" in user_data and not str(user_data["name"]).strip():
            raise ValueError("name must not be empty")

    def update_user_model(self, current_user: User, user_data: dict[UpdatableField, str]) -> User:
        user: User = super().update_user_model(current_user, user_data)
        if "name" in user_data:
            user.display_name = user.name  # one name, shown everywhere
        return user

    # -- identities --------------------------------------------------------------------

    def _new(self) -> _Person:
        """A new identity: the service's, or made here when it is unset or failing. It is
        held for PENDING_SECONDS, and for live_seconds once its cookie comes back."""
        now, ttl = time.monotonic(), min(PENDING_SECONDS, self.live_seconds)
        held = self._prune(now)
        service = self.service
        assigned = service.create(ttl) if service is not None else None
        if assigned is not None:
            wanted = self.factory.verify(assigned.token)
            shown, token = assigned.identity, assigned.token
            self._live.put(shown, now, ttl)  # the service keeps the scope distinct
        else:
            wanted = create(held, self.factory)
            shown, token = self._hold(wanted, now, ttl), self.factory.token(wanted)
        person = self._people[wanted.username] = _Person(token, wanted, shown)
        return person

    def _seen(self, wanted: Identity, token: str) -> _Person:
        """A request with this identity's cookie: it is live; renew it if due."""
        now = time.monotonic()
        person = self._people.get(wanted.username)
        if person is None or person.token != token:
            # New to this process (a restart, a long absence) or changed elsewhere.
            person = self._know(wanted, token, now)
        elif self._live.touch(wanted.username, now, self.live_seconds) is None:
            person.shown = self._hold(wanted, now, self.live_seconds)
        service = self.service
        due = now - person.renewed >= min(self.renew_seconds, self.live_seconds / 3)
        if service is not None and due and not person.renewing and service.breaker.may_call():
            self._renew_soon(person)
        return person

    def _know(self, wanted: Identity, token: str, now: float) -> _Person:
        person = _Person(token, wanted, self._hold(wanted, now, self.live_seconds))
        self._people[wanted.username] = person
        return person

    def _hold(self, wanted: Identity, now: float, ttl: float) -> Identity:
        """What ``wanted`` shows among this server's live users, held for ``ttl``. (With
        the service, its renewal corrects this for the whole scope.)"""
        shown = choose(self._prune(now), wanted).identity
        self._live.put(shown, now, ttl)
        return shown

    def _prune(self, now: float) -> dict[str, Identity]:
        """The live identities; forgets the people whose identity expired."""
        held = self._live.held(now)
        for username in [u for u, p in self._people.items() if u not in held and not p.renewing]:
            del self._people[username]
        return held

    def _renew_soon(self, person: _Person) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        person.renewing = True
        task = loop.create_task(self._renew(person))
        self._tasks.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, person: _Person) -> None:
        assert self.service is not None
        try:
            assigned = await self.service.renew(person.token, self.live_seconds)
        finally:
            person.renewing = False
        if assigned is not None and self._people.get(person.wanted.username) is person:
            now = time.monotonic()
            person.renewed, person.shown = now, assigned.identity
            self._live.put(assigned.identity, now, self.live_seconds)

    def _wanted_from(self, user: User, fallback: str | None) -> Identity:
        """An identity to want from a jupyter User (jupyter's cookie, or a PATCH)."""
        color = next((c for c in (user.color, fallback) if c and is_hex(c)), None)
        if color is None:  # jupyter leaves it null: the one farthest from the live ones
            color = pick_color(i.color for i in self._live.held(time.monotonic()).values())
        name = user.name or user.username
        return Identity(user.username, name, initials_of(name), color)


def _user(identity: Identity) -> User:
    return User(
        username=identity.username,
        name=identity.name,
        display_name=identity.name,
        initials=identity.initials,
        avatar_url=None,
        color=identity.color,
    )
