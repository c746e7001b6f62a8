"""The ``presence.jupyter`` server extension: no ghost cursors."""

from __future__ import annotations

from typing import Any

from presence.jupyter import awareness

# Without pings, a peer that vanished without a FIN (a laptop lid, a dropped network) is
# only noticed by the kernel's TCP timeouts, minutes later: its cursor stays until then.
# jupyter_server sends none on collaboration sockets by default.
PING_INTERVAL = 10  # seconds; tornado closes a socket whose pong is missing after as long


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
    if awareness.handler_class() is None:
        log.info("presence.jupyter: jupyter-collaboration is not installed; nothing to do")
        return
    hook = awareness.install(log)
    if hook is None:
        return  # the error is logged: collaboration runs as it would without us
    log.info("presence.jupyter: a collaboration socket's awareness states now leave with it")
    _ensure_pings(serverapp, log)
