"""On a JupyterHub single-user server: who collaborators appear as, and who stays in.

jupyterhub-singleuser forces JupyterHub's identity provider, and a share revoked on the
hub does not reach the server for minutes (``HubAuth.cache_max_age``, 300 s) nor close
the sockets already open (jupyter-collaboration#434). This module, installed by the
``presence.jupyter`` extension when it runs under a hub:

- **Faces.** Every hub user who uses this server is shown (``/api/me``, and the
  ``user`` of each awareness state a socket of theirs sends) under one identity,
  distinct among this server's live collaborators. In anonymous mode the hub user name
  is replaced everywhere in awareness, username included; the name, initials and colour
  come from the hub (presence's ``post_auth_hook`` puts an anonymous face in
  ``user_info``), or, for a user who logged in before that hook, from this server.
- **Who speaks for whom.** A socket cannot show itself as somebody else: the ``user``
  of the states it sends for its own clients is replaced, it cannot change another
  person's client nor the server's, and nothing the room does not apply is relayed.
- **Revocation.** The tokens of users other than the owner that requests brought lately
  are checked with the hub every ``recheck`` seconds; a user whose access is gone loses
  the hub's cached answer (their next request asks the hub, which refuses it) and their
  open WebSockets (collaboration, kernels, terminals, events: closed with 4403). A
  refusal is believed REFUSAL_SECONDS only, so that a share given again lets them in.
  The owner's requests keep the hub's cache as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
import weakref
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import orjson
from tornado.websocket import WebSocketHandler

from presence.core.colors import JUPYTER_PALETTE, MIN_CONTRAST, WHITE, contrast_ratio, stable_color
from presence.core.distinct import LiveIdentities, choose
from presence.core.identity import Identity, hub_face, initials_of
from presence.jupyter.hub import ANONYMOUS_MARK

Log = logging.Logger | logging.LoggerAdapter[Any]

LIVE_SECONDS = 3600.0  # a collaborator holds their face this long after their last request
REVOKED = 4403
MAX_TOKENS = 10_000  # collaborators' tokens re-checked at most
# How long the hub's refusal of a token is believed: a share given again lets its user
# in after that (the hub's cache would keep the refusal 300 s); a refused tab's retries
# ask the hub at most this often.
REFUSAL_SECONDS = 2.0


class Faces:
    """Hub user name -> the identity this server shows for them, kept distinct."""

    def __init__(
        self,
        *,
        anonymous: bool,
        key: bytes,
        fallback: Callable[[str], Identity],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.anonymous = anonymous
        self._key = key  # keys opaque usernames: they tell collaborators nothing
        self._fallback = fallback  # (hub user name) -> Identity, for users without a face
        self._clock = clock
        self._live = LiveIdentities()

    def wanted(self, hub_user: dict[str, Any]) -> Identity:
        """The identity ``hub_user`` (the hub's user model) asks for."""
        name: str = hub_user["name"]
        info = hub_user.get("user_info") or {}
        username = self.username(name)
        if self.anonymous and not info.get(ANONYMOUS_MARK):
            face = self._fallback(name)
            return Identity(username, face.name, face.initials, face.color)
        shown = str(info.get("display_name") or info.get("name") or name)
        initials = str(info.get("initials") or initials_of(shown))
        color = str(info.get("color") or "")
        if not _white_readable(color):  # JupyterLab writes the initials in white
            color = stable_color(name)
        return Identity(username, shown, initials, color)

    def username(self, hub_name: str) -> str:
        if not self.anonymous:
            return hub_name
        return (
            "anonymous-" + hmac.new(self._key, hub_name.encode(), hashlib.sha256).hexdigest()[:16]
        )

    def shown(self, hub_user: dict[str, Any]) -> Identity:
        """What ``hub_user`` shows now: their wish, changed where a live collaborator
        holds its name, initials or colour; held for LIVE_SECONDS."""
        now = self._clock()
        wanted = self.wanted(hub_user)
        # choose keeps what a live user shows now (a renewal keeps their look).
        shown = choose(self._live.held(now), wanted, palette=JUPYTER_PALETTE).identity
        self._live.put(shown, now, LIVE_SECONDS)
        return shown


def _white_readable(color: str) -> bool:
    try:
        return contrast_ratio(WHITE, color) >= MIN_CONTRAST
    except ValueError:
        return False


def user_field(identity: Identity) -> dict[str, Any]:
    """The ``user`` of an awareness state, as JupyterLab sets it from ``/api/me``."""
    return {
        "username": identity.username,
        "name": identity.name,
        "display_name": identity.name,
        "initials": identity.initials,
        "avatar_url": None,
        "color": identity.color,
    }


class Guard:
    """Installed on the server's JupyterHubIdentityProvider: faces, what sockets may say
    in awareness (:class:`presence.jupyter.awareness.StateGuard`), and revocation."""

    def __init__(
        self,
        provider: Any,
        faces: Faces,
        owner: str,
        recheck: float,
        log: Log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.hub_auth = provider.hub_auth
        self.faces = faces
        self.owner = owner
        self.recheck = recheck
        self.log = log
        self.clock = clock
        # Tokens of users other than the owner, by when a request last brought them: the
        # hub's cached answer lets them in for cache_max_age, so they are asked again.
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (hub name, last seen)
        # Their WebSockets, from the request that opened them (before the handshake).
        self._sockets: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._users: weakref.WeakKeyDictionary[Any, Identity] = weakref.WeakKeyDictionary()
        self._revoked: set[str] = set()  # found revoked, with sockets still opening
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        original = self.provider.get_user

        async def get_user(handler: Any) -> Any:
            user = await original(handler)
            try:
                if user is not None:
                    self._seen(handler, user)
                else:
                    self._refused(handler)
            except Exception:
                self.log.exception("presence.jupyter: could not place a hub user")
            return user

        self.provider.get_user = get_user

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._recheck_forever())

    def _seen(self, handler: Any, user: Any) -> None:
        hub_user = getattr(user, "hub_user", None)
        if not isinstance(hub_user, dict) or "name" not in hub_user:
            return
        identity = self.faces.shown(hub_user)
        if self.faces.anonymous:
            user.username = identity.username
        user.name = user.display_name = identity.name
        user.initials, user.color = identity.initials, identity.color
        self._users[handler] = identity
        if hub_user["name"] != self.owner:
            token = self.hub_auth.get_token(handler)
            if token:
                if len(self._tokens) >= MAX_TOKENS and token not in self._tokens:
                    self._prune(force=True)
                self._tokens[token] = (hub_user["name"], self.clock())
                if _is_websocket(handler):
                    self._sockets[handler] = token
        self.start()

    # -- awareness: what a socket's states say about its user ------------------------------

    def rewrite(self, socket: Any, state: bytes) -> bytes | None:
        """A state ``socket`` sends for its own client: its ``user`` is the socket's.
        None (dropped) for a socket of nobody known, or a state that is no JSON object
        (what orjson refuses, browsers might still read)."""
        identity = self._users.get(socket)
        if identity is None:
            return None
        parsed = _json_object(state)
        if parsed is None:
            return None
        if parsed.get("user") == user_field(identity):
            return state
        parsed["user"] = user_field(identity)
        try:
            return orjson.dumps(parsed)
        except (TypeError, orjson.JSONEncodeError):  # nested deeper than orjson writes
            return None

    def person(self, socket: Any) -> str | None:
        identity = self._users.get(socket)
        return None if identity is None else identity.username

    # -- revocation -------------------------------------------------------------------------

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self.recheck)
            try:
                await self.recheck_all()
            except Exception:
                self.log.exception("presence.jupyter: re-checking collaborators failed")

    def _prune(self, force: bool = False) -> None:
        """Forget tokens the hub's cache no longer answers for (and, when ``force``,
        the least recently seen half)."""
        horizon = self.clock() - float(self.hub_auth.cache_max_age or 300) - self.recheck
        live = {t for t in self._sockets.values()}
        for token, (_, seen) in list(self._tokens.items()):
            if seen < horizon and token not in live:
                del self._tokens[token]
        if force and len(self._tokens) >= MAX_TOKENS:
            oldest = sorted(self._tokens, key=lambda t: self._tokens[t][1])
            for token in oldest[: len(oldest) // 2]:
                del self._tokens[token]

    async def recheck_all(self, only: str | None = None) -> int:
        """Ask the hub again about every collaborator's token seen lately (``only``: of
        that hub user); a revoked one loses its cached answer and its open sockets.
        Returns how many were closed."""
        for handler in [h for h in list(self._sockets) if getattr(h, "_on_close_called", False)]:
            self._sockets.pop(handler, None)  # closed
        self._prune()
        closed = 0
        for token, (name, _) in list(self._tokens.items()):
            if only is not None and name != only:
                continue
            if token not in self._revoked:
                try:
                    model = await self.hub_auth.user_for_token(token, use_cache=False, sync=False)
                except Exception as exc:  # the hub is away: nothing was revoked we know of
                    self.log.debug("presence.jupyter: hub not asked: %s", exc)
                    continue
                if model is not None and self.hub_auth.check_scopes(
                    self.hub_auth.access_scopes, model
                ):
                    continue
                self._revoked.add(token)
                self._forget(token)
                self.log.info(
                    "presence.jupyter: access of hub user %s to this server ended: its "
                    "sockets are closed, its requests refused",
                    name,
                )
            sockets = [h for h, t in list(self._sockets.items()) if t == token]
            for handler in sockets:
                if getattr(handler, "ws_connection", None) is None:
                    continue  # still opening: closed at a later check
                self._sockets.pop(handler, None)
                with contextlib.suppress(Exception):
                    handler.close(REVOKED, "access to this server was revoked")
                closed += 1
            if all(h not in self._sockets for h in sockets):  # none left opening
                self._revoked.discard(token)
                self._tokens.pop(token, None)
        return closed

    def _refused(self, handler: Any) -> None:
        """A request the hub's (cached) answer refused: that answer is kept
        REFUSAL_SECONDS, not cache_max_age."""
        token = self.hub_auth.get_token(handler)
        if token:
            self._forget(token, older_than=REFUSAL_SECONDS)

    def _forget(self, token: str, older_than: float = 0.0) -> None:
        """Drop the hub's cached answers for ``token`` (those cached more than
        ``older_than`` seconds ago): its next request asks again."""
        digest = hashlib.sha256(token.encode("utf8", "replace")).hexdigest()
        cache = self.hub_auth.cache
        horizon = time.monotonic() - older_than  # the cache's own clock
        for key in [k for k in list(cache.values) if str(k).endswith(digest)]:
            if cache.timestamps.get(key, 0.0) <= horizon:
                cache.values.pop(key, None)
                cache.timestamps.pop(key, None)


def _json_object(state: bytes) -> dict[str, Any] | None:
    """``state`` parsed if it is a JSON object, as a browser reads it: a lone surrogate
    (say, in a file name that is no UTF-8) is replaced, not refused."""
    try:
        parsed = orjson.loads(state)
    except orjson.JSONDecodeError:
        try:
            parsed = _readable(json.loads(state))
        except (ValueError, RecursionError):
            return None
    return parsed if isinstance(parsed, dict) else None


def _readable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, list):
        return [_readable(v) for v in value]
    if isinstance(value, dict):
        return {_readable(k): _readable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a JSON number")  # 1e400: JSON.parse says Infinity
    return value


def _is_websocket(handler: Any) -> bool:
    return isinstance(handler, WebSocketHandler)


def local_faces(key: bytes) -> Callable[[str], Identity]:
    """Anonymous faces made by this server (with its own key, not the hub's secret), for
    hub users the hub gave none; in the same style and palette as the hub's."""
    return lru_cache(maxsize=4096)(partial(hub_face, key))


def server_key() -> bytes:
    """A key held in this process's memory only: a collaborator who runs code in the
    server can read its files (the cookie secret among them), and could then match
    anonymous usernames against likely hub names."""
    return secrets.token_bytes(32)
