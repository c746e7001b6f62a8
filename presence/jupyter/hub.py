"""For JupyterHub: hub users' colours and initials, through the authenticator.

On a hub, single-user servers take identities from the hub (``JupyterHubIdentityProvider``
is forced there), and JupyterHub >= 6 copies ``name``, ``display_name``, ``initials``,
``avatar_url`` and ``color`` from the hub user's ``user_info`` into ``/api/me``. This hook
fills ``initials`` and ``color`` when the authenticator left them out, so that
JupyterLab's cursors of hub users are drawn in presence's readable, colour-blind-aware
palette instead of its 7 shared colours:

    # jupyterhub_config.py
    from presence.jupyter.hub import post_auth_hook
    c.Authenticator.post_auth_hook = post_auth_hook
"""

from __future__ import annotations

from typing import Any

from presence.core.colors import stable_color
from presence.core.identity import initials_of


def hub_identity(username: str, display_name: str | None = None) -> dict[str, str]:
    """Initials and a palette colour for a hub user, the same at every login.

    The colour comes from a hash of the username: a hub has more users than the palette
    has colours, so two users can share one; their names and initials tell them apart.
    """
    return {"initials": initials_of(display_name or username), "color": stable_color(username)}


def post_auth_hook(authenticator: Any, handler: Any, auth_model: dict[str, Any]) -> dict[str, Any]:
    """``Authenticator.post_auth_hook``: adds what ``user_info`` lacks, keeps the rest."""
    info = dict(auth_model.get("user_info") or {})
    made = hub_identity(auth_model["name"], info.get("display_name") or info.get("name"))
    for key, value in made.items():
        info.setdefault(key, value)
    auth_model["user_info"] = info
    return auth_model
