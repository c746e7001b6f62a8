"""Sharing a JupyterHub server from JupyterLab: the server side of "Share with
collaborators…" (the labextension in labextension/).

JupyterHub >= 5 has shares and share codes but no page that makes them. The browser
asks this server (``<base_url>/presence/sharing``), which asks the hub's REST API with
the token of the user who asks, and only for the server's owner:

- the page holds no token it did not have already, and other users' pages none of the
  owner's; a collaborator's requests are refused here, and their own token could not
  share this server on the hub either;
- requests are jupyter_server's API requests: authenticated, and XSRF-checked when a
  cookie authenticates them;
- the hub's refusals become messages that say what to do;
- revoking a user also ends what the hub's answer does not reach (singleuser.Guard):
  the hub's cached answer for them and their open sockets, at once.

The owner's token can share only if the hub lets it: ``shares!user`` in the user's role
and ``shares!server`` in ``c.Spawner.oauth_client_allowed_scopes`` (docs/jupyter.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httputil import url_concat

MIN_EXPIRY, MAX_EXPIRY = 60, 365 * 86400  # what the hub accepts for a share code
OLDEST_HUB = (5, 0)  # shares and share codes arrived in JupyterHub 5.0
MAX_PATH = 4096
MAX_PAGES = 50  # of the hub's lists: 10,000 shares or links
CODE_ID = re.compile(r"sc_[0-9]{1,18}")


class SharingError(web.HTTPError):
    """An answer the owner can act on; ``reason`` names the case for the page."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(status, message, reason=reason)
        self.message = message


def hub_version(text: str) -> tuple[int, ...]:
    """(5, 1, 0) of "5.1.0" or "5.1.0b1"; () when unreadable."""
    parts = []
    for part in text.split(".")[:3]:
        digits = re.match(r"[0-9]+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


@dataclass
class HubSharing:
    """The hub's sharing API for one server, spoken with the asking user's token."""

    api_url: str  # JUPYTERHUB_API_URL: http://hub:8081/hub/api
    owner: str
    server_name: str  # "" for the default server
    base_url: str  # this server's: /user/alice/
    verify: Any = True  # an SSLContext where the hub's internal SSL is on
    # Closes revoked users' sockets: of one hub user (a name), or of everyone revoked (None).
    on_revoke: Callable[[str | None], Awaitable[int]] | None = None
    _version: str = ""

    @property
    def _server(self) -> str:
        return f"{quote(self.owner, safe='')}/{quote(self.server_name, safe='')}"

    async def _call(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        try:
            async with httpx.AsyncClient(verify=self.verify, timeout=20) as client:
                return await client.request(
                    method, self.api_url.rstrip("/") + path, headers=headers, **kwargs
                )
        except httpx.HTTPError as exc:
            raise SharingError(
                502, "hub_unreachable", f"The hub did not answer ({exc}); try again in a moment."
            ) from exc

    async def version(self) -> str:
        if not self._version:
            answer = await self._call("", "GET", "/")
            try:
                self._version = str(answer.json()["version"])
            except (ValueError, KeyError, TypeError) as exc:
                raise SharingError(
                    502, "hub_unreachable", f"The hub's API answered {answer.status_code}."
                ) from exc
        if hub_version(self._version) < OLDEST_HUB:
            raise SharingError(
                501,
                "hub_too_old",
                f"This hub runs JupyterHub {self._version}; sharing needs JupyterHub 5 or "
                "later. Ask your hub admin to upgrade.",
            )
        return self._version

    async def _hub(self, token: str, method: str, path: str, gone: str = "", **kwargs: Any) -> Any:
        """The hub's JSON answer; a 404 is ``gone`` (reason code_gone) when given."""
        await self.version()
        answer = await self._call(token, method, path, **kwargs)
        if answer.status_code < 400:
            return answer.json() if answer.content else None
        try:
            said = str(answer.json().get("message", ""))
        except (ValueError, AttributeError):  # no JSON, or no JSON object
            said = answer.text[:200]
        if answer.status_code == 403:
            raise self._not_allowed(said or "forbidden")
        if answer.status_code == 404 and gone:
            raise SharingError(404, "code_gone", gone)
        raise SharingError(502, "hub_error", f"The hub answered {answer.status_code}: {said}")

    def _not_allowed(self, said: str) -> SharingError:
        return SharingError(
            403,
            "sharing_not_allowed",
            f"Your hub does not let you share this server ({said}). Ask your hub admin "
            "to add the scope shares!user to the users' role, and shares!server to "
            "c.Spawner.oauth_client_allowed_scopes; then restart your server and log in "
            "again.",
        )

    def may_share(self, scopes: list[str]) -> bool:
        """Whether a token with ``scopes`` (as the hub expands them) shares this server."""
        mine = {
            "shares",
            f"shares!user={self.owner}",
            f"shares!server={self.owner}/{self.server_name}",
        }
        return any(scope in mine for scope in scopes)

    async def access(self, token: str) -> dict[str, Any]:
        """The server's shares and unexpired share codes; refused at once (not at the
        first change) if the token cannot share."""
        me = await self._hub(token, "GET", "/user")
        if not self.may_share(me.get("scopes") or []):
            raise self._not_allowed("your login holds no shares scope for it")
        return {
            "owner": self.owner,
            "server_name": self.server_name,
            "hub_version": self._version,
            "shares": [_share(s) for s in await self._list(token, "shares")],
            "codes": [_code(c) for c in await self._list(token, "share-codes")],
        }

    async def _list(self, token: str, kind: str) -> list[dict[str, Any]]:
        """Every page of a list the hub answers a page (200 rows) at a time."""
        items: list[dict[str, Any]] = []
        offset: Any = 0
        for _ in range(MAX_PAGES):
            page = await self._hub(
                token, "GET", f"/{kind}/{self._server}", params={"offset": offset}
            )
            rows = page.get("items", []) if isinstance(page, dict) else page or []
            items += [row for row in rows if isinstance(row, dict)]
            following = isinstance(page, dict) and (page.get("_pagination") or {}).get("next")
            if not following:
                break
            offset = following.get("offset")
        return items

    async def create(self, token: str, expires_in: int, path: str | None) -> dict[str, Any]:
        """A share code; its accept link lands on ``path`` (a file of this server) or the
        server itself."""
        made = await self._hub(
            token, "POST", f"/share-codes/{self._server}", json={"expires_in": expires_in}
        )
        if path:
            segments = "/".join(quote(p, safe="") for p in _segments(path))
            landing = url_path_join(self.base_url, "lab", "tree", segments)
        else:
            landing = self.base_url
        accept_url = made.get("full_accept_url") or made["accept_url"]
        return {
            "id": made["id"],
            "accept_url": url_concat(accept_url, {"next": landing}),
            "expires_at": made["expires_at"],
            "next": landing,
        }

    async def revoke_code(self, token: str, code_id: str) -> None:
        await self._hub(
            token,
            "DELETE",
            f"/share-codes/{self._server}",
            gone="That link had already expired or been revoked.",
            params={"id": code_id},
        )

    async def revoke_share(self, token: str, kind: str, name: str) -> int:
        """Ends the access of a user or group; returns how many sockets were closed."""
        await self._hub(token, "PATCH", f"/shares/{self._server}", json={kind: name})
        if self.on_revoke is None:
            return 0
        return await self.on_revoke(name if kind == "user" else None)


def _segments(path: str) -> list[str]:
    """A file's path under this server, refused if it climbs out of the server's URL."""
    parts = path.strip("/").split("/")
    if any(part in (".", "..", "") for part in parts):
        raise SharingError(400, "bad_path", "path: a file's path under the server's root.")
    return parts


def _share(share: dict[str, Any]) -> dict[str, Any]:
    kind = "group" if share.get("group") else "user"
    return {
        "kind": kind,
        "name": (share.get(kind) or {}).get("name", ""),
        "scopes": share.get("scopes") or [],
        "created_at": share.get("created_at"),
    }


def _code(code: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "created_at", "expires_at", "exchange_count", "last_exchanged_at")
    return {key: code.get(key) for key in keys}


class _Handler(APIHandler):
    sharing: HubSharing

    def initialize(self, sharing: HubSharing) -> None:
        self.sharing = sharing

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if not isinstance(error, SharingError):
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": error.message, "reason": error.reason}))

    def owner_token(self) -> str:
        """The asking owner's own hub token (from the request: header or cookie)."""
        hub_user = getattr(self.current_user, "hub_user", None) or {}
        if hub_user.get("name") != self.sharing.owner:
            raise SharingError(
                403, "not_owner", f"Only {self.sharing.owner} can share this server."
            )
        hub_auth = self.identity_provider.hub_auth  # type: ignore[attr-defined]
        token: str | None = hub_auth.get_token(self)
        if not token:
            raise SharingError(401, "no_token", "Log in to the hub again, then retry.")
        if token == hub_auth.api_token:
            # The server's own token, which whoever runs code here can read: never.
            raise SharingError(403, "not_owner", "Share with your own login, not the server's.")
        return token

    def body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise SharingError(400, "bad_request", "The request is no JSON object.") from exc
        if not isinstance(body, dict):
            raise SharingError(400, "bad_request", "The request is no JSON object.")
        return body


class AccessHandler(_Handler):
    @web.authenticated
    async def get(self) -> None:
        self.finish(await self.sharing.access(self.owner_token()))


class CodesHandler(_Handler):
    @web.authenticated
    async def post(self) -> None:
        token = self.owner_token()
        body = self.body()
        expires_in = body.get("expires_in", 86400)
        if (
            not isinstance(expires_in, int)
            or isinstance(expires_in, bool)
            or not MIN_EXPIRY <= expires_in <= MAX_EXPIRY
        ):
            raise SharingError(
                400, "bad_expiry", "A link lasts from one minute to one year (expires_in, s)."
            )
        path = body.get("path")
        if path is not None and (not isinstance(path, str) or len(path) > MAX_PATH):
            raise SharingError(400, "bad_path", "path: the open file's path, or null.")
        self.finish(await self.sharing.create(token, expires_in, path or None))


class CodeHandler(_Handler):
    @web.authenticated
    async def delete(self, code_id: str) -> None:
        token = self.owner_token()
        if not CODE_ID.fullmatch(code_id):
            raise SharingError(404, "code_gone", "That link had already expired or been revoked.")
        await self.sharing.revoke_code(token, code_id)
        self.set_status(204)
        self.finish()


class SharesHandler(_Handler):
    @web.authenticated
    async def delete(self) -> None:
        token = self.owner_token()
        user, group = self.get_argument("user", ""), self.get_argument("group", "")
        if bool(user) == bool(group):
            raise SharingError(400, "bad_request", "Name a user or a group to revoke.")
        closed = await self.sharing.revoke_share(token, "user" if user else "group", user or group)
        self.finish({"closed": closed})


PAGE_FLAG = "presenceShare"  # in the owner's JupyterLab page: the labextension is on


def mark_owner_pages(serverapp: Any, provider: Any, owner: str) -> None:
    """Puts PAGE_FLAG in the page config of the owner's JupyterLab pages.

    The page's own hubUser cannot tell: it is the name the user is shown under (an
    anonymous one here). jupyterhub-singleuser installs its provider's hook in the
    settings (before or after this runs): both are wrapped."""

    def marking(hook: Callable[[Any, dict[str, Any]], dict[str, Any]]) -> Any:
        def page_config_hook(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
            page_config = hook(handler, page_config)
            hub_user = getattr(handler.current_user, "hub_user", None) or {}
            page_config[PAGE_FLAG] = "true" if hub_user.get("name") == owner else ""
            return page_config

        return page_config_hook

    provider.page_config_hook = marking(provider.page_config_hook)
    settings = serverapp.web_app.settings
    if settings.get("page_config_hook") is not None:
        settings["page_config_hook"] = marking(settings["page_config_hook"])


def handlers(sharing: HubSharing) -> list[tuple[str, type[APIHandler], dict[str, Any]]]:
    base = url_path_join(sharing.base_url, "presence", "sharing")
    kwargs = {"sharing": sharing}
    return [
        (base + "/?", AccessHandler, kwargs),
        (url_path_join(base, "codes"), CodesHandler, kwargs),
        (url_path_join(base, "codes", "([^/]+)"), CodeHandler, kwargs),
        (url_path_join(base, "shares"), SharesHandler, kwargs),
    ]
