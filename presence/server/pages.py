"""The demo page (``/``), told what it cannot learn by itself."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from presence.access.rules import Access
from presence.core.access import AccessError

if TYPE_CHECKING:
    from presence.access.jupyterhub import JupyterHubAuth

STATIC = Path(__file__).resolve().parent.parent / "static"


async def index(request: Request) -> Response:
    """The demo page: live cursors, the room's members, a link to share. It is told, in
    attributes of its ``<body>``, what it cannot learn by itself: the ``--auth`` mode,
    whether names are anonymous (``data-names``: ``anonymous``, or ``hub`` for hub user
    names) and, on a hub, whose page it is (``data-user``: rooms there are
    ``<owner>/<server>:<room>``, and its lobby is its user's, ``<user>/:lobby``)."""
    access: Access = request.app.state.access
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
