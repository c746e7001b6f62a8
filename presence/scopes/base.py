"""The identity scopes store: what ``POST /identities`` (:mod:`presence.server.identities`)
claims identities in.

A scope (the anonymous users of one Jupyter server, say) holds each username's identity
while it is live: no two live identities of a scope show one name or one pair of
initials, nor one colour while a palette colour is free, on any replica. Two
implementations: in memory (one process; replicas of one
:class:`presence.backplane.memory.MemoryBus` share one) and Redis (all replicas).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from presence.backplane.base import Unavailable
from presence.core.distinct import Claim, Probe
from presence.core.identity import Identity

__all__ = ["ScopeStore", "Unavailable"]


class ScopeStore(ABC):
    """Where the live identities of every scope are held. Every method raises
    :class:`Unavailable` when the store cannot be reached now."""

    @abstractmethod
    async def scope_identities(
        self, scope: str, username: str | None = None
    ) -> dict[str, Identity]:
        """The live identities of ``scope`` by username (expired ones are forgotten); only
        ``username``'s, if given (a renewal: O(1))."""

    @abstractmethod
    async def probe_scope(
        self, scope: str, names: Sequence[str] = (), initials: Sequence[str] = ()
    ) -> Probe:
        """Which of ``names`` and ``initials`` live identities of ``scope`` show, and the
        colours they show, for choosing a new identity without reading them all (Redis
        answers from its indexes)."""

    @abstractmethod
    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float, keep: int
    ) -> dict[str, Identity] | None:
        """Atomically: unless another live identity of ``scope`` clashes with the claim
        (:func:`presence.core.distinct.clashes`), hold ``claim.identity`` for ``ttl``
        seconds and return None, letting go of the identities renewed longest ago past
        ``keep``; otherwise return the scope's live identities, to choose again from."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of connections (the app's shutdown)."""
