"""Identity scopes in memory: one process's (replicas on one memory bus share one)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

from presence.core.distinct import Claim, LiveIdentities, Probe
from presence.core.identity import Identity
from presence.scopes.base import ScopeStore


class MemoryScopes(ScopeStore):
    """Claims decided by :class:`presence.core.distinct.LiveIdentities`, on ``clock``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.scopes: dict[str, LiveIdentities] = {}

    async def close(self) -> None:
        pass  # nothing to let go of

    def _held(self, scope: str) -> dict[str, Identity]:
        live = self.scopes.get(scope)
        held = live.held(self.clock()) if live is not None else {}
        if not held:
            self.scopes.pop(scope, None)  # nobody left: the scope goes, as in Redis
        return held

    async def scope_identities(
        self, scope: str, username: str | None = None
    ) -> dict[str, Identity]:
        held = self._held(scope)
        if username is not None:
            return {username: held[username]} if username in held else {}
        return held

    async def probe_scope(
        self, scope: str, names: Sequence[str] = (), initials: Sequence[str] = ()
    ) -> Probe:
        held = self._held(scope).values()
        shown = {i.name for i in held}, {i.initials for i in held}
        return Probe(
            frozenset(names) & shown[0],
            frozenset(initials) & shown[1],
            dict(Counter(i.color for i in held)),
        )

    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float, keep: int
    ) -> dict[str, Identity] | None:
        live = self.scopes.setdefault(scope, LiveIdentities())
        return live.claim(claim, self.clock(), ttl, keep)
