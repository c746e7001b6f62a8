"""Every channel and key name the replicas share, in one place.

``{...}`` is a Redis Cluster hash tag: a room's keys and channel share one slot, and so
do an identity scope's keys.

- ``presence:{room}``: the room's channel. Messages (:mod:`presence.codecs.replica`):
  events (``e``) and complete member sets (``f``), numbered per sender and room (``s``);
  held client IDs (``o``); state requests (``q``, to everyone or to one replica, ``t``;
  with the number of the sender's last message in the room).
- ``presence:{room}:members``: hash ``origin/member_id`` -> latest state and the number
  of the message that wrote it; read by a replica that opens the room (its snapshot).
- ``presence:{room}:holds``: hash ``client ID/replica`` -> key digest and expiry: held
  Yjs client IDs, apart from the members so that it expires a grace after the last hold.
- ``presence:replicas`` (``presence:{replicas}`` when sharded): heartbeats (``h``) and
  goodbyes (``b``).
- ``presence:replica:ID``: exists while a replica heartbeats (deleted after its
  goodbye); tells a replica that never heard another whether that one is alive, and
  when it last beat.
- ``presence:scope2:{scope}:live|expiry|renewed|names|initials|colors``: an identity
  scope (:mod:`presence.scopes.redis`; ``scope2``: the layout with indexes, apart from
  the one of release 0.1.0).
"""

from __future__ import annotations

SCOPE_KEYS = ("live", "expiry", "renewed", "names", "initials", "colors")


class Keys:
    """The names under ``prefix``; ``sharded``: the replicas channel has a hash tag of its
    own (sharded pub/sub needs every channel in a slot)."""

    def __init__(self, prefix: str = "presence", sharded: bool = False) -> None:
        self.prefix = prefix
        self.sharded = sharded
        self.replicas_channel = f"{prefix}:{{replicas}}" if sharded else f"{prefix}:replicas"
        self.members_pattern = f"{prefix}:{{*}}:members"  # every room's members hash

    def channel(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}"

    def members(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}:members"

    def holds(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}:holds"

    def replica(self, replica: str) -> str:
        """The liveness key of ``replica``."""
        return f"{self.prefix}:replica:{replica}"

    def room_of_channel(self, channel: str) -> str | None:
        """The room whose channel this is; None for any other channel."""
        if channel.startswith(self.prefix + ":{") and channel.endswith("}"):
            return channel[len(self.prefix) + 2 : -1]
        return None

    def room_of_members(self, key: str) -> str:
        """The room of a members hash (a key :attr:`members_pattern` matched)."""
        return key[len(self.prefix) + 2 : -len("}:members")]

    def scope(self, scope: str) -> list[str]:
        """An identity scope's keys, in :data:`SCOPE_KEYS` order."""
        base = f"{self.prefix}:scope2:{{{scope}}}"
        return [f"{base}:{kind}" for kind in SCOPE_KEYS]
