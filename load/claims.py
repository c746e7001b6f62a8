"""``python -m load claims``: what one ``POST /identities`` costs as a scope fills.

One replica on Redis. The scope is filled with 0, 2,000 and 20,000 claims of new users
(as a flood would, with ``ttl`` 7 days); then 100 more new users and 100 renewals are
timed one at a time, and Redis's own time per claim script is read from its command
statistics. The key is the scope's (``presence scope-key``): a service that takes none
ignores it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from harness.processes import SECRET, RedisProcess, Server
from presence.core.identity import IdentityFactory

SCOPE = "lab1-8888"
LEVELS = (0, 2_000, 20_000)
TIMED = 100
FLOOD_TTL = 7 * 24 * 3600


async def _fill(http: httpx.AsyncClient, count: int) -> dict[int, int]:
    """Claims of new users, 50 at once (a flood, not one client): how many got each
    status."""
    body = {"scope": SCOPE, "ttl": FLOOD_TTL}
    statuses: dict[int, int] = {}

    async def one() -> None:
        status = (await http.post("/identities", json=body)).status_code
        statuses[status] = statuses.get(status, 0) + 1

    for start in range(0, count, 50):
        await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return statuses


async def _timed(http: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Milliseconds per claim, one at a time (median, p99, max), how many got each
    status, and the tokens handed out."""
    took, statuses, tokens = [], {}, []
    for body in bodies:
        started = time.perf_counter()
        response = await http.post("/identities", json=body)
        took.append((time.perf_counter() - started) * 1000)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            tokens.append(response.json()["token"])
    took.sort()
    at = lambda q: round(took[min(len(took) - 1, int(q * len(took)))], 2)  # noqa: E731
    return {
        "p50": at(0.5),
        "p99": at(0.99),
        "max": round(took[-1], 2),
        "statuses": statuses,
        "tokens": tokens,
    }


def _script_usec(redis: RedisProcess) -> tuple[int, float]:
    stats = redis.client().info("commandstats")
    calls, usec = 0, 0.0
    for name, stat in stats.items():
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            calls += int(stat["calls"])
            usec += float(stat["usec"])
    return calls, usec


async def _measure(
    server: Server, redis: RedisProcess, levels: tuple[int, ...]
) -> list[dict[str, Any]]:
    key = IdentityFactory(SECRET.encode()).scope_key(SCOPE)
    headers = {"Authorization": f"Bearer {key}"}
    rows = []
    filled = 0
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=60) as http:
        for level in levels:
            statuses = await _fill(http, level - filled)
            filled = level
            calls0, usec0 = _script_usec(redis)
            new = await _timed(http, [{"scope": SCOPE} for _ in range(TIMED)])
            calls1, usec1 = _script_usec(redis)
            tokens = new.pop("tokens")
            renew = await _timed(http, [{"scope": SCOPE, "token": t} for t in tokens or ["x"]])
            renew.pop("tokens")
            filled += TIMED
            rows.append(
                {
                    "claimed_before": level,
                    "fill_statuses": statuses,
                    "new_ms": new,
                    "renew_ms": renew,
                    "redis_ms_per_script": round(
                        (usec1 - usec0) / max(1, calls1 - calls0) / 1000, 3
                    ),
                    "live": await _live(redis),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _per_call(usec: float, calls: int) -> float:
    return round(usec / max(1, calls) / 1000, 3)


async def _live(redis: RedisProcess) -> int:
    client = redis.client()
    return sum(int(client.hlen(k)) for k in client.scan_iter(match="*scope*:live"))


def run_claims(levels: tuple[int, ...] = LEVELS, rate: bool = True) -> dict[str, Any]:
    """With ``rate``, the claim rate is lifted so that the flood is made quickly: the
    figures are what each claim costs, not the limit."""
    redis = RedisProcess().start()
    args = ["--redis-url", redis.url, "--log-level", "warning"]
    if rate:
        args += ["--identity-claim-rate", "1000000"]
    server = Server(args, {"PRESENCE_SECRET": SECRET}).start()
    try:
        rows = asyncio.run(_measure(server, redis, levels))
    finally:
        server.stop()
        redis.stop()
    return {"scenario": "claims", "scope": SCOPE, "timed": TIMED, "levels": rows}
