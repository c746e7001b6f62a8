"""Identity scopes in Redis: every replica's claims decided atomically by one script.

The keys (:meth:`presence.backplane.keys.Keys.scope`) share the scope's hash slot, so
this works on Redis Cluster too. Reached through redis-py, with the timeouts of the
backplane's reads (:func:`presence.backplane.redis.redis_client`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from presence.backplane.keys import Keys
from presence.backplane.redis import _text, read, redis_client
from presence.codecs import replica as codec
from presence.core.distinct import Claim, Probe
from presence.core.identity import Identity
from presence.scopes.base import ScopeStore

# An identity scope: forget expired identities (at most the bound: claims keep no more),
# then return the live identities (no ARGV) or one of them (ARGV: its username), or which
# of some names and initials are held, and the colours shown (ARGV: '?', how many names,
# the names, the initials); or, given
# a claim (ARGV: username, identity as JSON, ttl in ms, the most kept, the palette), hold
# it unless another live identity shows its name or initials, or its colour while a
# palette colour is shown by no other: the check of presence.core.distinct.clashes,
# atomic across replicas. Indexes of names, initials and colours make a claim O(log n)
# in the scope, and past the bound the identity renewed longest ago goes, so that a
# flood reclaims its own. Returns {1} when held, else {0, identities as HGETALL gives
# them}. TIME is Redis's clock, the same for all replicas; replicate_commands lets a
# script write after reading it on Redis < 7.
SCOPE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local live, expiry, renewed, names, initials, colors = unpack(KEYS)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(u)
  local record = redis.call('HGET', live, u)
  if record then
    local r = cjson.decode(record)
    if redis.call('HGET', names, r.n) == u then redis.call('HDEL', names, r.n) end
    if redis.call('HGET', initials, r.i) == u then redis.call('HDEL', initials, r.i) end
    if redis.call('HINCRBY', colors, r.c, -1) <= 0 then redis.call('HDEL', colors, r.c) end
    redis.call('HDEL', live, u)
  end
  redis.call('ZREM', expiry, u)
  redis.call('ZREM', renewed, u)
end
for _, u in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do drop(u) end
if #ARGV == 0 then return {0, redis.call('HGETALL', live)} end
if ARGV[1] == '?' then
  local asked, held = tonumber(ARGV[2]), {{}, {}}
  for i = 3, #ARGV do
    local index, which = i <= 2 + asked and names or initials, i <= 2 + asked and 1 or 2
    if redis.call('HEXISTS', index, ARGV[i]) == 1 then table.insert(held[which], ARGV[i]) end
  end
  return {2, held[1], held[2], redis.call('HGETALL', colors)}
end
if #ARGV == 1 then
  local record = redis.call('HGET', live, ARGV[1])
  return {0, record and {ARGV[1], record} or {}}
end
local me, record, ttl, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local mine = cjson.decode(record)
local function other(holder) return holder and holder ~= me end
local clash = other(redis.call('HGET', names, mine.n))
  or other(redis.call('HGET', initials, mine.i))
if not clash then
  local old = redis.call('HGET', live, me)
  old = old and cjson.decode(old).c
  local function others_showing(color)
    local n = tonumber(redis.call('HGET', colors, color) or '0')
    return old == color and n - 1 or n
  end
  if others_showing(mine.c) > 0 then
    for i = 5, #ARGV do
      if others_showing(ARGV[i]) == 0 then clash = true break end
    end
  end
end
if clash then return {0, redis.call('HGETALL', live)} end
drop(me)
redis.call('HSET', live, me, record)
redis.call('HSET', names, mine.n, me)
redis.call('HSET', initials, mine.i, me)
redis.call('HINCRBY', colors, mine.c, 1)
redis.call('ZADD', expiry, now + ttl, me)
redis.call('ZADD', renewed, now, me)
while redis.call('ZCARD', renewed) > keep do
  local oldest = redis.call('ZRANGE', renewed, 0, 1)
  drop(oldest[1] == me and oldest[2] or oldest[1])
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return {1}
"""


class RedisScopes(ScopeStore):
    def __init__(
        self, url: str, *, cluster: bool = False, timeout: float = 2.0, prefix: str = "presence"
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.redis = redis_client(url, cluster=cluster, timeout=timeout)
        self._script = self.redis.register_script(SCOPE_SCRIPT)

    async def close(self) -> None:
        await self.redis.aclose()

    async def scope_identities(
        self, scope: str, username: str | None = None
    ) -> dict[str, Identity]:
        _, held = await self._run(scope, *([] if username is None else [username]))
        return held

    async def probe_scope(
        self, scope: str, names: Sequence[str] = (), initials: Sequence[str] = ()
    ) -> Probe:
        args: list[str | int] = ["?", len(names), *names, *initials]
        _, held_names, held_initials, colors = await read(
            self.url, self._script(keys=self.keys.scope(scope), args=args)
        )
        counts = {_text(c): int(n) for c, n in zip(colors[::2], colors[1::2], strict=True)}
        return Probe(
            frozenset(map(_text, held_names)), frozenset(map(_text, held_initials)), counts
        )

    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float, keep: int
    ) -> dict[str, Identity] | None:
        i = claim.identity
        record = codec.dumps({"u": i.username, "n": i.name, "i": i.initials, "c": i.color})
        ttl_ms = max(1, round(ttl * 1000))
        done, held = await self._run(scope, i.username, record, ttl_ms, keep, *claim.palette)
        return None if done else held

    async def _run(self, scope: str, *args: Any) -> tuple[bool, dict[str, Identity]]:
        reply = await read(self.url, self._script(keys=self.keys.scope(scope), args=list(args)))
        if reply[0] == 1:
            return True, {}
        flat = reply[1]
        held = {}
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            d = codec.loads(value)
            held[_text(field)] = Identity(d["u"], d["n"], d["i"], d["c"])
        return False, held
