# presence on a JupyterHub (>= 6): collaborators share servers, see each other's cursors
# under anonymous names, leave no ghosts, and a revoked collaborator is out.
#
# Install `presence-awareness[jupyter]` in the hub's environment (this file imports it,
# and the hub starts the service) and in the single-user image (the server extension is
# on as soon as it is installed). Set PRESENCE_SECRET wherever `jupyterhub` runs with
# this file:
# `python -c "import secrets; print(secrets.token_urlsafe(32))"` makes one; keep it.
# docs/jupyter.md explains every line; tests/test_jupyterhub_story.py runs this file.
import os

from presence.jupyter.hub import make_post_auth_hook

c = get_config()  # noqa: F821 (JupyterHub provides it)

SECRET = os.environ.get("PRESENCE_SECRET", "")
if not SECRET:
    raise SystemExit("jupyterhub_config.py: set PRESENCE_SECRET (see the comment above)")
# Where presence listens: the hub, its proxy and the single-user servers reach it here.
PRESENCE = os.environ.get("PRESENCE_SERVICE_URL", "http://127.0.0.1:10101")
# Collaborators appear under anonymous names (False: under their hub names).
ANONYMOUS = os.environ.get("PRESENCE_ANONYMOUS", "true") == "true"

# Names, initials and readable colours in JupyterLab (the hub's user_info -> /api/me).
c.Authenticator.post_auth_hook = make_post_auth_hook(anonymous=ANONYMOUS, secret=SECRET)

c.JupyterHub.services = [
    {
        "name": "presence",
        "url": PRESENCE,
        "command": ["presence", "serve", "--auth", "jupyterhub"]
        + (["--jupyterhub-anonymous", "true"] if ANONYMOUS else []),
        # The hub's proxy, whose X-Forwarded-For names the browser, connects from here
        # (on one host; else set PRESENCE_FORWARDED_ALLOW_IPS to the proxy's address).
        "environment": {
            "PRESENCE_SECRET": SECRET,
            "PRESENCE_FORWARDED_ALLOW_IPS": os.environ.get(
                "PRESENCE_FORWARDED_ALLOW_IPS", "127.0.0.1,::1"
            ),
        },
        "oauth_no_confirm": True,
    }
]
c.JupyterHub.custom_scopes = {
    "custom:presence:mirror": {
        "description": "Mirror a server's collaborators into presence, speaking for them.",
    },
}
c.JupyterHub.load_roles = [
    # Users share their servers (share codes) and use presence; their servers' tokens can
    # only hold what their users hold: the mirror's scope (below) must be here too.
    {
        "name": "user",
        "scopes": [
            "self",
            "shares!user",
            "access:services!service=presence",
            "custom:presence:mirror!user",
        ],
    },
    # Single-user servers' own tokens: the defaults, plus mirroring into their own rooms.
    {
        "name": "server",
        "scopes": [
            "users:activity!user",
            "access:servers!server",
            "access:services!service=presence",
            "custom:presence:mirror!server",
        ],
    },
    # presence reads who a server is shared with, and nothing else.
    {"name": "presence", "services": ["presence"], "scopes": ["read:users:shares"]},
]
# JupyterLab's "Share with collaborators…" asks the hub with the owner's token from this
# server's login: let that token share this server (it holds only what its user holds).
c.Spawner.oauth_client_allowed_scopes = ["shares!server"]
# Single-user servers mirror into presence, and show the same faces as presence does.
c.Spawner.environment = {
    "PRESENCE_JUPYTER_URL": PRESENCE + "/services/presence",
    "PRESENCE_JUPYTER_ANONYMOUS": "1" if ANONYMOUS else "",
}
