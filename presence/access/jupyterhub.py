"""``--auth jupyterhub``: presence as a JupyterHub service.

Who a request comes from is a hub token: the one the OAuth login with the hub left in
this service's cookie (browsers), or a hub API token (programs: ``Authorization: Bearer``
or ``token``, or ``?access_token=``). The hub says whose it is (``GET /hub/api/user``)
and which servers are shared with that user (``GET /hub/api/users/{user}/shared``, with
this service's token and its ``read:users:shares`` scope); :mod:`presence.core.access`
judges. Answers are kept ``--jupyterhub-recheck`` seconds, and open connections are
checked again that often: a share revoked, or a token revoked, closes its sockets
within twice that (the hub tells nobody; jupyter-collaboration keeps them open).

While the hub cannot be reached, answers it gave stay good and connections stay open
(nobody can revoke anything then); requests it would have to answer get 503 / 1013.

A single-user server mirrors its collaborators into its rooms (presence.jupyter.mirror)
with its own API token, which the hub gives the custom scope
``custom:presence:mirror!server=<owner>/<server>``: such a token enters exactly that
server's rooms, as a *mirror*, with no identity of its own (it speaks for several
collaborators, each declaring its ``user``), and no other room.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from presence.config import HUB_API_TOKEN, HUB_API_URL
from presence.core.access import AccessError, Grant, Want, may_enter, not_shared, server_of
from presence.core.colors import stable_color
from presence.core.identity import Identity, b64url, unb64url

log = logging.getLogger("presence.jupyterhub")

MAX_CACHED = 10_000  # answers kept: random tokens from a flood cannot grow it further
HUB_TIMEOUT = 5.0
# Requests in flight to the hub at most (more wait, up to HUB_TIMEOUT): a flood of
# made-up tokens, each a question, cannot turn presence into a flood of the hub.
HUB_CONNECTIONS = 20
RECHECKS_AT_ONCE = 16  # hub requests in flight while re-checking open connections
# A single-user server's token carries it, filtered to that server (the hub's "server"
# role has custom:presence:mirror!server, which it expands to !server=<owner>/<server>).
MIRROR_SCOPE = "custom:presence:mirror"
_MIRROR_FILTER = f"{MIRROR_SCOPE}!server="


def unavailable(detail: str) -> AccessError:
    return AccessError(503, "hub_unavailable", f"the hub could not be asked: {detail}")


@dataclass(frozen=True)
class HubService:
    """What the hub gives a service it starts (or an operator sets by hand)."""

    api_url: str  # http://127.0.0.1:8081/hub/api
    api_token: str
    name: str = "presence"
    client_id: str = "service-presence"
    callback_url: str = "/services/presence/oauth_callback"  # as registered with the hub
    base_url: str = "/"  # the hub's, for the browser's way to /hub/api/oauth2/authorize
    public_origin: str | None = None  # JUPYTERHUB_PUBLIC_URL's scheme://host[:port]

    @staticmethod
    def from_env(env: Mapping[str, str]) -> HubService:
        name = env.get("JUPYTERHUB_SERVICE_NAME", "presence")
        public = urlsplit(
            env.get("JUPYTERHUB_PUBLIC_HUB_URL") or env.get("JUPYTERHUB_PUBLIC_URL", "")
        )
        base_url = env.get("JUPYTERHUB_BASE_URL", "/").rstrip("/") + "/"
        return HubService(
            api_url=env[HUB_API_URL].rstrip("/"),
            api_token=env[HUB_API_TOKEN],
            name=name,
            client_id=env.get("JUPYTERHUB_CLIENT_ID", f"service-{name}"),
            # A service the hub does not start (on Kubernetes) is told no callback: the
            # one the hub registers for it is under the hub's base URL.
            callback_url=env.get(
                "JUPYTERHUB_OAUTH_CALLBACK_URL", f"{base_url}services/{name}/oauth_callback"
            ),
            base_url=base_url,
            public_origin=f"{public.scheme}://{public.netloc}".lower() if public.netloc else None,
        )

    @property
    def access_scopes(self) -> frozenset[str]:
        """A user's token must carry one of these to use this service (as HubAuth checks)."""
        return frozenset(("access:services", f"access:services!service={self.name}"))


class _Cache:
    """Answers (or refusals) by key for ``ttl`` seconds, one hub request per key at a time."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl, self.clock = ttl, clock
        self._answers: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._asking: dict[str, asyncio.Future[Any]] = {}

    async def get(self, key: str, ask: Callable[[], Awaitable[Any]]) -> Any:
        """The answer for ``key``; raises the AccessError it was (503s are not kept)."""
        kept = self._answers.get(key)
        if kept is not None and self.clock() < kept[0]:
            self._answers.move_to_end(key)  # least recently used goes first
            return self._result(kept[1])
        if key in self._asking:
            return self._result(await asyncio.shield(self._asking[key]))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        try:
            try:
                answer: Any = await ask()
            except AccessError as exc:
                answer = exc
            except Exception as exc:  # an answer we cannot read: as if the hub were away
                log.warning("unexpected answer from the hub: %r", exc)
                answer = unavailable(f"unexpected answer: {type(exc).__name__}")
            if not (isinstance(answer, AccessError) and answer.status == 503):
                self._answers[key] = (self.clock() + self.ttl, answer)
                self._answers.move_to_end(key)
                while len(self._answers) > MAX_CACHED:
                    self._answers.popitem(last=False)
            elif kept is not None:
                answer = kept[1]  # the hub is away: what it said last still holds
            future.set_result(answer)
        except BaseException as exc:  # cancelled: whoever waits asks again
            future.set_exception(unavailable(type(exc).__name__))
            future.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            del self._asking[key]
        return self._result(answer)

    @staticmethod
    def _result(answer: Any) -> Any:
        if isinstance(answer, AccessError):
            raise answer
        return answer


@dataclass(frozen=True)
class HubUser:
    name: str
    # The servers (``<owner>/<server>``) this token mirrors: a single-user server's own
    # token. Such a token enters those servers' rooms only, as a mirror.
    mirrors: frozenset[str] = frozenset()


class _Watch:
    """An open connection's right to its room, checked again every recheck."""

    def __init__(self, token: str, room: str, revoke: Callable[[AccessError], None]) -> None:
        self.token, self.room, self.revoke = token, room, revoke


class JupyterHubAuth:
    def __init__(
        self,
        service: HubService,
        *,
        recheck: float,
        anonymous: Callable[[str], Identity] | None = None,
        websocket_cookie: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.recheck = recheck
        self.anonymous = anonymous
        self.websocket_cookie = websocket_cookie  # --jupyterhub-allow-websocket-cookie
        self._users = _Cache(recheck, clock)
        self._shares = _Cache(recheck, clock)
        self._watches: set[_Watch] = set()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            base_url=self.service.api_url,
            timeout=HUB_TIMEOUT,
            limits=httpx.Limits(max_connections=HUB_CONNECTIONS),
        )
        self._task = asyncio.create_task(self._recheck_forever(), name="jupyterhub-recheck")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()

    # -- the hub's answers ----------------------------------------------------------------

    async def _get(self, path: str, token: str, params: dict[str, Any] | None = None) -> Any:
        """A hub API answer (JSON), None for 401/403/404; raises AccessError 503."""
        if self._http is None:
            raise unavailable("not started")
        try:
            response = await self._http.get(
                path, params=params, headers={"Authorization": f"token {token}"}
            )
        except httpx.HTTPError as exc:
            raise unavailable(f"{type(exc).__name__}: {exc}") from None
        if response.status_code in (401, 403, 404):
            return None
        if response.status_code != 200:
            raise unavailable(f"{response.request.url.path} answered {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise unavailable("not a JSON answer") from None

    async def user(self, token: str) -> HubUser:
        """Whose ``token`` is; raises AccessError 401 (not a hub token), 403 (a token
        without access to this service, or a service's)."""

        async def ask() -> HubUser:
            model = await self._get("/user", token)
            if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                raise AccessError(401, "invalid_token", "not a valid hub token: log in again")
            if model.get("kind", "user") != "user":
                raise AccessError(403, "not_a_user", "only hub users have rooms here")
            if not self.service.access_scopes & set(model.get("scopes") or ()):
                raise AccessError(
                    403,
                    "no_access",
                    f"this hub token has no access to the service {self.service.name} "
                    f"(scope access:services!service={self.service.name})",
                )
            scopes = model.get("scopes") or ()
            mirrors = frozenset(
                scope.removeprefix(_MIRROR_FILTER)
                for scope in scopes
                if isinstance(scope, str) and scope.startswith(_MIRROR_FILTER)
            )
            return HubUser(model["name"], mirrors)

        # The token is never a key in memory as such: a hash is enough to find it again.
        return await self._users.get(_digest(token), ask)  # type: ignore[no-any-return]

    async def shares(self, user: str) -> list[dict[str, Any]]:
        """The shares that reach ``user`` (theirs and their groups'), every page."""

        async def ask() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            offset = 0
            while True:
                page = await self._get(
                    f"/users/{quote(user, safe='')}/shared",
                    self.service.api_token,
                    {"offset": offset, "limit": 200},
                )
                if page is None:
                    raise unavailable(
                        "shares unreadable: give this service's role the scope "
                        "read:users:shares (docs/jupyter.md)"
                    )
                items += page.get("items") or []
                following = (page.get("_pagination") or {}).get("next")
                if not following:
                    return items
                offset = int(following["offset"])

        return await self._shares.get(user, ask)  # type: ignore[no-any-return]

    async def check(self, token: str | None, room: str, want: Want) -> Grant:
        """The grant of ``token`` in ``room``; raises :class:`AccessError`."""
        if not token:
            raise AccessError(401, "missing_token", "log in with the hub (or send a hub API token)")
        owner, server = server_of(room)  # a room of no server: refused before asking the hub
        user = await self.user(token)
        if user.mirrors:
            # A single-user server's token, in its own rooms: a mirror, which speaks for
            # the collaborators it declares (Yjs client IDs, each with its own ``user``),
            # kept as sent (the server shows them as it chose, anonymous or not).
            if f"{owner}/{server}" in user.mirrors:
                return Grant("member", math.inf)
            raise AccessError(
                403,
                "other_room",
                f"this hub token mirrors {', '.join(sorted(user.mirrors))} only, "
                f"not the server {owner}/{server}",
            )
        if user.name != owner and not may_enter(user.name, room, await self.shares(user.name)):
            raise not_shared(user.name, room)
        if self.anonymous is not None:
            face = self.anonymous(user.name)
            return Grant("member", math.inf, face.name, face.color, face.username)
        return Grant("member", math.inf, user.name, stable_color(user.name), user.name)

    # -- open connections ---------------------------------------------------------------

    def watch(
        self, token: str, room: str, revoke: Callable[[AccessError], None]
    ) -> Callable[[], None]:
        """Check ``token`` in ``room`` again every recheck; ``revoke`` is called once
        when it no longer holds. Returns the function that stops watching."""
        watch = _Watch(token, room, revoke)
        self._watches.add(watch)
        return lambda: self._watches.discard(watch)

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self.recheck)
            try:
                await self.recheck_all()
            except Exception:
                log.exception("re-checking hub access failed")

    async def recheck_all(self) -> int:
        """Check every open connection's access again, several at a time; returns how
        many were revoked."""
        limit = asyncio.Semaphore(RECHECKS_AT_ONCE)

        async def recheck(watch: _Watch) -> bool:
            async with limit:
                try:
                    await self.check(watch.token, watch.room, "join")
                except AccessError as exc:
                    if exc.status == 503 or watch not in self._watches:
                        return False  # the hub is away (nothing was revoked), or it closed
                    self._watches.discard(watch)
                    log.info(
                        "hub access revoked: closing a connection",
                        extra={"room": watch.room, "reason": exc.code},
                    )
                    watch.revoke(exc)
                    return True
                except Exception:
                    log.exception("re-checking a connection's hub access failed")
                return False

        return sum(await asyncio.gather(*(recheck(w) for w in list(self._watches))))

    # -- browsers: OAuth with the hub -------------------------------------------------------

    @property
    def cookie(self) -> str:
        return self.service.client_id

    def token_of(
        self,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        *,
        via: Literal["page", "http", "websocket"] = "page",
    ) -> str | None:
        """The hub token of a request: Authorization (``Bearer`` or ``token``), then
        ``?access_token=``, then the login cookie. Without per-user subdomains, other
        users' servers serve pages of the hub's origin, whose scripts send the cookie
        too, and no check in the browser can tell them from presence's own pages (they
        choose their own headers). So the cookie counts for a page presence serves
        (``page``); for the HTTP views only when a person navigates there (JupyterHub's
        HubOAuth refuses cookies to script requests as well); on WebSockets only with
        --jupyterhub-allow-websocket-cookie, else the request is refused (403)."""
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
        if query.get("access_token"):
            return query["access_token"]
        if via == "http" and headers.get("sec-fetch-mode") != "navigate":
            return None
        # Split by hand, leniently: one odd cookie of another app on the hub's domain
        # must not hide ours (http.cookies drops the whole header then). Two of ours
        # are refused, not the last taken: a page of the hub's origin (another user's
        # server) can set one at path / that browsers send after the real one, and the
        # victim's sockets would run as the attacker.
        ours = [
            value.strip()
            for name, _, value in (c.partition("=") for c in headers.get("cookie", "").split(";"))
            if name.strip() == self.cookie
        ]
        if len(ours) > 1:
            raise AccessError(
                401, "invalid_token", f"two cookies named {self.cookie}: log in again"
            )
        token = ours[0] if ours and ours[0] else None
        if token and via == "websocket" and not self.websocket_cookie:
            raise AccessError(
                403,
                "cookie_refused",
                "this service takes no login cookie on WebSockets: send a hub token",
            )
        return token

    def login(self, request: Request, prefix: str, wanted: str = "") -> Response:
        """Off to the hub's authorize page; it comes back to the callback with a code,
        then to ``wanted`` (a path on this host; else ``?next=``, else the front page)."""
        wanted = _local(wanted or request.query_params.get("next", ""), prefix)
        state = b64url(orjson.dumps({"s": secrets.token_urlsafe(16), "next": wanted}))
        query = urlencode(
            {
                "client_id": self.service.client_id,
                "redirect_uri": self.service.callback_url,
                "response_type": "code",
                "state": state,
            }
        )
        response = RedirectResponse(
            f"{self.service.base_url}hub/api/oauth2/authorize?{query}", status_code=302
        )
        response.set_cookie(
            self.cookie + "-oauth-state",
            state,
            max_age=600,
            path=prefix + "/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    async def callback(self, request: Request, prefix: str) -> Response:
        """The hub's answer to the login: a code, exchanged for this user's token."""
        state = request.query_params.get("state", "")
        code = request.query_params.get("code", "")
        expected = request.cookies.get(self.cookie + "-oauth-state", "")
        if not code or not state or not secrets.compare_digest(state, expected):
            return JSONResponse(
                {"error": "oauth_state", "message": "OAuth state mismatch: log in again"},
                status_code=400,
            )
        if self._http is None:
            raise RuntimeError("JupyterHubAuth.start() was not awaited")
        try:
            answer = await self._http.post(
                "/oauth2/token",
                data={
                    "client_id": self.service.client_id,
                    "client_secret": self.service.api_token,
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.service.callback_url,
                },
            )
            token = answer.json()["access_token"] if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str):
            return JSONResponse(
                {"error": "oauth_code", "message": "the hub refused the login: log in again"},
                status_code=403,
            )
        try:
            wanted = str(orjson.loads(unb64url(state))["next"])
        except (ValueError, KeyError, TypeError):
            wanted = ""
        # Checked again: a page of the same origin could have planted the state cookie.
        wanted = _local(wanted, prefix)
        response = RedirectResponse(wanted, status_code=302)
        secure = request.url.scheme == "https"
        if prefix:  # a cookie of ours planted at / (token_of refuses two) is gone too
            response.delete_cookie(self.cookie, path="/")
        response.set_cookie(
            self.cookie, token, path=prefix + "/", httponly=True, samesite="lax", secure=secure
        )
        response.delete_cookie(self.cookie + "-oauth-state", path=prefix + "/")
        return response


def hub_routes(auth: JupyterHubAuth, prefix: str) -> list[BaseRoute]:
    """``/login`` and the OAuth callback (``JUPYTERHUB_OAUTH_CALLBACK_URL``, which the
    hub sets to ``<service prefix>/oauth_callback``)."""

    async def login(request: Request) -> Response:
        return auth.login(request, prefix)

    async def callback(request: Request) -> Response:
        return await auth.callback(request, prefix)

    return [Route("/login", login), Route("/oauth_callback", callback)]


def _local(path: str, prefix: str) -> str:
    """``path`` if it is a path on this host (no scheme, no host, no backslash tricks),
    else the service's front page: no login sends a browser elsewhere."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path
    return prefix + "/"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
