"""The ``presence.jupyter`` server extension: no ghost cursors, and the presence mirror.

Configuration (``jupyter_server_config.py`` or ``--PresenceJupyter.url=…``)::

    c.PresenceJupyter.url = "https://presence.example.org"  # unset: no mirror
    c.PresenceJupyter.scope = "team-a"  # default: the hub user (and server), or host-port
"""

from __future__ import annotations

import os
import socket
from typing import Any

from traitlets import Bool, Float, Unicode, default
from traitlets.config import Configurable

from presence.jupyter import awareness, sharing, singleuser
from presence.jupyter.mirror import RENEW_EVERY, Mirror, hub_scope, sanitize, yjs_url

# Without pings, a peer that vanished without a FIN (a laptop lid, a dropped network) is
# only noticed by the kernel's TCP timeouts, minutes later: its cursor stays until then.
# jupyter_server sends none on collaboration sockets by default.
PING_INTERVAL = 10  # seconds; tornado closes a socket whose pong is missing after as long
SCOPE_MAX = 64  # leaves room for the room id in presence's 128 characters


class PresenceJupyter(Configurable):
    url = Unicode(
        config=True,
        help="""Base URL of a presence service (http(s):// or ws(s)://) to mirror each
        collaboration room's awareness into, as the presence room <scope>:<room id>.
        Default: $PRESENCE_JUPYTER_URL. Empty: no mirror.""",
    )
    anonymous = Bool(
        config=True,
        help="""On JupyterHub: show every collaborator under an anonymous name, initials
        and colour (the hub's, from presence's post_auth_hook), never their hub name.
        Default: $PRESENCE_JUPYTER_ANONYMOUS (1 or true).""",
    )
    recheck = Float(
        10.0,
        config=True,
        help="""On JupyterHub: seconds between checks, with the hub, of the open sockets of
        collaborators (not the owner); a revoked share closes them within that.""",
    )

    @default("url")
    def _default_url(self) -> str:
        return os.environ.get("PRESENCE_JUPYTER_URL", "")

    @default("anonymous")
    def _default_anonymous(self) -> bool:
        return os.environ.get("PRESENCE_JUPYTER_ANONYMOUS", "").lower() in ("1", "true", "yes")

    scope = Unicode(
        "",
        config=True,
        help="""Prefix of the mirrored presence rooms, which keeps servers apart. Empty:
        the hub user (user~server for a named server) on JupyterHub, else host-port of
        this server. Characters outside [A-Za-z0-9_.:~-] become '_'.""",
    )
    renew_interval = Float(
        RENEW_EVERY,
        config=True,
        help="""Seconds between renewals of unchanged states in presence: less than half
        of presence's --expire-after (30 s by default).""",
    )


def default_scope(serverapp: Any) -> str:
    user = os.environ.get("JUPYTERHUB_USER")
    if user:
        server = os.environ.get("JUPYTERHUB_SERVER_NAME")
        scope = f"{user}~{server}" if server else user
    else:
        scope = f"{socket.gethostname()}-{serverapp.port}"
    return sanitize(scope)[:SCOPE_MAX]


def _ensure_pings(serverapp: Any, log: Any) -> None:
    """Ping collaboration sockets unless the user chose (ServerApp.websocket_ping_*)."""
    chosen = serverapp.config.get("ServerApp") or {}
    if "websocket_ping_interval" in chosen:
        return
    settings = serverapp.web_app.settings
    if settings.get("websocket_ping_interval"):
        return
    settings["websocket_ping_interval"] = PING_INTERVAL
    if "websocket_ping_timeout" not in chosen:
        settings["websocket_ping_timeout"] = PING_INTERVAL
    log.info(
        "presence.jupyter: WebSocket pings every %s s (ServerApp.websocket_ping_interval was "
        "unset), so that vanished collaborators leave",
        PING_INTERVAL,
    )


def load(serverapp: Any) -> None:
    log = serverapp.log
    config = PresenceJupyter(parent=serverapp)
    if awareness.handler_class() is None:
        log.info("presence.jupyter: jupyter-collaboration is not installed; nothing to do")
        return
    hook = awareness.install(log)
    if hook is None:
        return  # the error is logged: collaboration runs as it would without us
    log.info("presence.jupyter: a collaboration socket's awareness states now leave with it")
    _ensure_pings(serverapp, log)
    on_hub = _on_hub(serverapp, config, hook, log)
    if not config.url:
        return
    try:
        yjs_url(config.url, "check")
    except ValueError as exc:
        log.error("presence.jupyter: PresenceJupyter.url: %s; no mirror", exc)
        return
    scope = sanitize(config.scope)[:SCOPE_MAX]
    headers = None
    if on_hub:
        # The hub service serves the server's rooms as <owner>/<server>:<room>, to the
        # server's own token (its 'server' role: docs/jupyter.md).
        scope = scope or hub_scope(os.environ["JUPYTERHUB_USER"], _server_name())
        headers = {"Authorization": f"token {os.environ['JUPYTERHUB_API_TOKEN']}"}
    mirror = Mirror(
        config.url,
        (lambda: scope) if scope else (lambda: default_scope(serverapp)),
        hook,
        log,
        renew_every=max(0.1, config.renew_interval),
        headers=headers,
    )
    hook.listeners.append(mirror)
    log.info("presence.jupyter: mirroring collaboration awareness to presence at %s", config.url)


def _server_name() -> str:
    return os.environ.get("JUPYTERHUB_SERVER_NAME", "")


def _on_hub(serverapp: Any, config: PresenceJupyter, hook: awareness.Ownership, log: Any) -> bool:
    """Under jupyterhub-singleuser: faces and revocation (presence.jupyter.singleuser)."""
    provider = getattr(serverapp, "identity_provider", None)
    hub_auth = getattr(provider, "hub_auth", None)
    owner = os.environ.get("JUPYTERHUB_USER")
    if hub_auth is None or not owner or not os.environ.get("JUPYTERHUB_API_TOKEN"):
        return False
    key = singleuser.server_key()
    faces = singleuser.Faces(
        anonymous=config.anonymous, key=key, fallback=singleuser.local_faces(key)
    )
    guard = singleuser.Guard(provider, faces, owner, max(1.0, config.recheck), log)
    guard.install()
    hook.guard = guard
    serverapp.web_app.add_handlers(".*$", sharing.handlers(_hub_sharing(serverapp, guard)))
    sharing.mark_owner_pages(serverapp, provider, owner)
    log.info(
        "presence.jupyter: on JupyterHub: collaborators shown %s, their sockets re-checked "
        "every %s s; sharing at %spresence/sharing",
        "anonymously" if config.anonymous else "under their hub names",
        config.recheck,
        serverapp.base_url,
    )
    return True


def _hub_sharing(serverapp: Any, guard: singleuser.Guard) -> sharing.HubSharing:
    hub_auth = guard.hub_auth
    verify: Any = True
    if hub_auth.certfile or hub_auth.keyfile:  # the hub's internal SSL
        from jupyterhub.utils import make_ssl_context  # type: ignore[import-untyped]

        verify = make_ssl_context(hub_auth.keyfile, hub_auth.certfile, cafile=hub_auth.client_ca)
    return sharing.HubSharing(
        api_url=hub_auth.api_url,
        owner=guard.owner,
        server_name=_server_name(),
        base_url=serverapp.base_url,
        verify=verify,
        on_revoke=guard.recheck_all,
    )
