"""Per-member rate limiting of state updates: excess updates merge, never queue."""

from __future__ import annotations

import asyncio
import contextlib

from presence.core.events import State
from presence.core.ratelimit import TokenBucket
from presence.core.room import RoomError
from presence.hub.hub import Hub


class RateLimitedUpdates:
    """Applies a client's updates at most ``rate`` per second; the excess is merged
    into one pending patch (latest value per field) and applied when allowed."""

    def __init__(self, hub: Hub, room: str, member_id: str) -> None:
        self.hub = hub
        self.room = room
        self.member_id = member_id
        rate = hub.settings.rate_limit
        self.bucket = TokenBucket(rate, max(1.0, rate), hub.clock())
        self.pending: State | None = None
        self.timer: asyncio.TimerHandle | None = None

    def submit(self, patch: State) -> None:
        if self.pending is None and self.bucket.allow(self.hub.clock()):
            self._apply(patch)
            return
        if self.pending is None:
            self.pending = dict(patch)
        else:
            self._merge(self.pending, patch)
            self.hub.metrics.updates_coalesced += 1
        if self.timer is None:
            delay = self.bucket.wait_time(self.hub.clock())
            self.timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _release(self) -> None:
        self.timer = None
        if self.pending is None:
            return
        now = self.hub.clock()
        if not self.bucket.allow(now):
            # Early (the hub's clock is not the loop's): the patch waits for its token.
            delay = self.bucket.wait_time(now)
            self.timer = asyncio.get_running_loop().call_later(delay, self._release)
            return
        patch, self.pending = self.pending, None
        # The member may have left meanwhile, or the merged state be too large: drop it.
        with contextlib.suppress(RoomError):
            self._apply(patch)

    def _merge(self, pending: State, patch: State) -> None:
        pending.update(patch)

    def _apply(self, patch: State) -> None:
        self.hub.update(self.room, self.member_id, patch)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
