"""For JupyterHub: hub users' faces in JupyterLab, through the authenticator.

On a hub, single-user servers take identities from the hub (``JupyterHubIdentityProvider``
is forced there), and JupyterHub >= 6 copies ``name``, ``display_name``, ``initials``,
``avatar_url`` and ``color`` from the hub user's ``user_info`` into ``/api/me``, which is
what JupyterLab draws a collaborator's cursor with: the name in the flag, the initials in
white on the colour. The hooks made here fill those fields at every login:

- under their hub names (``anonymous=False``): ``initials`` and ``color`` where the
  authenticator left them out, the colour from presence's JUPYTER_PALETTE (readable under
  white initials, colour-blind-aware) instead of JupyterLab's 7 shared colours;
- anonymously (``anonymous=True``): ``name``, ``display_name``, ``initials`` and ``color``
  become the user's anonymous face (:func:`presence.core.identity.hub_face`: "Brave
  Otter", short enough for JupyterLab's flag), the same face the presence service shows
  with ``--jupyterhub-anonymous`` and the same secret; ``avatar_url`` is dropped.

    # jupyterhub_config.py
    import os
    from presence.jupyter.hub import make_post_auth_hook
    c.Authenticator.post_auth_hook = make_post_auth_hook(
        anonymous=True, secret=os.environ["PRESENCE_SECRET"]
    )
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from presence.core.colors import stable_color
from presence.core.identity import hub_face, initials_of

PostAuthHook = Callable[[Any, Any, dict[str, Any]], dict[str, Any]]

# Marks user_info made by the anonymous hook: a single-user server takes the face from it
# (presence.jupyter.singleuser), and makes one for users who logged in before the hook.
ANONYMOUS_MARK = "presence_anonymous"


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


def anonymous_user_info(
    secret: str, username: str, user_info: dict[str, Any] | None
) -> dict[str, Any]:
    """``user_info`` with the anonymous face of ``username`` in every field JupyterHub
    copies into ``/api/me``: none of them names the hub user any more."""
    face = hub_face(secret, username)
    info = dict(user_info or {})
    info.pop("avatar_url", None)  # a picture of the person, or a URL with their name
    info.update(
        name=face.name,
        display_name=face.name,
        initials=face.initials,
        color=face.color,
    )
    info[ANONYMOUS_MARK] = True
    return info


def make_post_auth_hook(*, anonymous: bool, secret: str | None = None) -> PostAuthHook:
    """The ``Authenticator.post_auth_hook`` for this hub: :func:`post_auth_hook` under hub
    names, or one that gives every user their anonymous face; that needs presence's
    secret (``PRESENCE_SECRET``), the one the presence service is given."""
    if not anonymous:
        return post_auth_hook
    if not secret:
        raise ValueError(
            "anonymous faces need presence's secret (PRESENCE_SECRET): the presence "
            "service draws the same faces from it"
        )
    key = secret

    def anonymous_post_auth_hook(
        authenticator: Any, handler: Any, auth_model: dict[str, Any]
    ) -> dict[str, Any]:
        """Every login: the hub user's anonymous face in ``user_info``."""
        auth_model["user_info"] = anonymous_user_info(
            key, auth_model["name"], auth_model.get("user_info")
        )
        return auth_model

    return anonymous_post_auth_hook
