"""presence for JupyterLab real-time collaboration (the ``jupyter`` extra).

- :class:`PresenceIdentityProvider` (``presence.jupyter.identity``): anonymous
  collaborators get presence identities (name, initials, colour) in ``/api/me``.
- The server extension ``presence.jupyter``: removes a collaboration socket's awareness
  states as soon as it closes (no ghost cursors), and, with ``PresenceJupyter.url`` set,
  mirrors each collaboration room's awareness into a presence room.

See docs/jupyter.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PresenceIdentityProvider"]


def __getattr__(name: str) -> Any:
    # Importing the package (as jupyter_server does to find the extension) must not
    # import jupyter_server's auth machinery before it is needed.
    if name == "PresenceIdentityProvider":
        from presence.jupyter.identity import PresenceIdentityProvider

        return PresenceIdentityProvider
    raise AttributeError(name)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "presence.jupyter"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from presence.jupyter.extension import load

    load(serverapp)
