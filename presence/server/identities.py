"""``POST /identities``: anonymous identities unique within a named scope, on every replica.

A scope is a set of people who should be told apart: the anonymous collaborators of one
Jupyter server (presence.jupyter.identity asks here for each new one, and renews the live
ones). No two live identities of a scope show one name or one pair of initials, nor one
colour while the palette has a free one; the scopes store (:mod:`presence.scopes`) makes
each claim atomically (in Redis, for all replicas), and a claim that lost a race is
chosen again.

Only holders of the secret may claim: a request carries the scope's key
(:meth:`IdentityFactory.scope_key`). A scope keeps at most ``--max-identities-per-scope``
live identities, letting go of those renewed longest ago, and each replica takes a
scope's claims at a bounded rate: what a scope costs is bounded, and nobody is locked out.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from presence.core.access import bearer
from presence.core.distinct import (
    FRESH_DRAWS,
    Claim,
    choose,
    create,
    first_free,
    initials_candidates,
    name_candidates,
    shown_for,
)
from presence.core.identity import Identity, IdentityFactory, InvalidToken
from presence.core.ratelimit import Buckets
from presence.core.room import ROOM_NAME_RULE, is_valid_room_name
from presence.hub.hub import Hub
from presence.scopes.base import ScopeStore, Unavailable

DEFAULT_TTL = 3600.0  # seconds an identity stays live without a renewal
MAX_TTL = 7 * 24 * 3600.0
MAX_BODY = 4096  # bytes: a scope, a token and a ttl
# A replica makes one claim of a scope at a time; an attempt loses only to a claim that
# another replica made meanwhile, and then retries with the scope as it is now, after a
# random pause: claims made at once choose alike (the farthest colour is the same for
# all), and would otherwise lose in lockstep.
ATTEMPTS = 16
PAUSE = 0.002  # seconds, times the attempt number, at most
# Claims of a scope per replica (--identity-claim-rate) come in bursts of ten times the
# rate: a class logging in at once. A scope's key that leaked cannot make a replica or
# Redis spend more on it.
BURST_SECONDS = 10.0
MAX_SCOPES_RATED = 10_000  # scopes whose rate is followed; the least recent is forgotten


def claim_rates(rate: float) -> Buckets:
    """Where each replica follows the rate of claims of each scope."""
    return Buckets(rate, BURST_SECONDS, MAX_SCOPES_RATED)


class Contended(Exception):
    """Claims kept losing races to other claims of the scope."""


_queues: dict[str, tuple[asyncio.Lock, int]] = {}  # scope -> (its lock, requests using it)


@asynccontextmanager
async def _one_at_a_time(scope: str) -> AsyncIterator[None]:
    lock, users = _queues.get(scope, (asyncio.Lock(), 0))
    _queues[scope] = (lock, users + 1)
    try:
        async with lock:
            yield
    finally:
        lock, users = _queues[scope]
        if users == 1:
            del _queues[scope]
        else:
            _queues[scope] = (lock, users - 1)


async def assign(
    scopes: ScopeStore, hub: Hub, scope: str, wanted: Identity | None, ttl: float
) -> Identity:
    """The identity that ``wanted`` (a new one when None) shows in ``scope``, now held
    there for ``ttl`` seconds."""
    async with _one_at_a_time(scope):
        return await _assign(scopes, hub, scope, wanted, ttl)


async def _assign(
    scopes: ScopeStore, hub: Hub, scope: str, wanted: Identity | None, ttl: float
) -> Identity:
    keep = hub.settings.max_identities_per_scope
    # A renewal claims what its person shows now (read alone: O(1)), wishing for its own
    # name back if it lost it; a new identity is chosen from what the scope says about a
    # few candidates. Only when that does not settle it (a clash, a race, every candidate
    # taken) is the whole scope read, to choose from.
    if wanted is not None:
        held = await scopes.scope_identities(scope, wanted.username)
        current = held.get(wanted.username)
        if current is not None and await _kept(scopes, scope, current, wanted, ttl, keep):
            return current
    else:
        fresh = await _fresh_claim(scopes, scope, hub.identities)
        if fresh is not None and await scopes.claim_identity(scope, fresh, ttl, keep) is None:
            return fresh.identity
        held = await scopes.scope_identities(scope)
    for attempt in range(ATTEMPTS):
        claim = choose(held, wanted or create(held, hub.identities))
        again = await scopes.claim_identity(scope, claim, ttl, keep)
        if again is None:
            return claim.identity
        await asyncio.sleep(random.uniform(0, PAUSE * (attempt + 1)))
        held = again
    raise Contended(f"scope {scope!r} is busy: {ATTEMPTS} claims in a row lost a race")


async def _kept(
    scopes: ScopeStore, scope: str, current: Identity, wanted: Identity, ttl: float, keep: int
) -> bool:
    """Whether ``current`` ("Io 2"), which wants its name back ("Io") while another
    holds it, was held again as it shows, without reading the scope."""
    if current.name == wanted.name or not shown_for(current, wanted):
        return False
    if not (await scopes.probe_scope(scope, names=[wanted.name])).names:
        return False  # its name is free: choose() gives it back
    return await scopes.claim_identity(scope, Claim(current), ttl, keep) is None


async def _fresh_claim(scopes: ScopeStore, scope: str, factory: IdentityFactory) -> Claim | None:
    """A new identity for ``scope``, from two questions of a fixed size (which of some
    names, then which of its initials, are held); None if none of those asked is free."""
    names = name_candidates(factory.name_draws(FRESH_DRAWS + 1))
    probe = await scopes.probe_scope(scope, names=names)
    name = first_free(names, probe.names)
    if name is None:
        return None
    asked = initials_candidates(name, factory)
    initials = first_free(asked, (await scopes.probe_scope(scope, initials=asked)).initials)
    if initials is None:
        return None
    return Claim(Identity(factory.new_id(), name, initials, factory.color_apart(probe.colors)))


async def _body(request: Request) -> bytes | None:
    """The request body, or None past MAX_BODY (not read further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _ttl(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ttl = float(value)
    return ttl if math.isfinite(ttl) and 1 <= ttl <= MAX_TTL else None


async def post_identities(request: Request) -> Response:
    """``{"scope", ["token"], ["ttl"]}`` -> ``{"identity", "token", "scope", "ttl"}``."""
    hub: Hub = request.app.state.hub
    # Only JSON: a cross-origin page can POST text/plain without asking (no preflight).
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _error(415, "unsupported_media_type", "send the body as application/json")
    raw = await _body(request)
    if raw is None:
        return _error(413, "too_large", f"the body must be at most {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except ValueError:
        return _error(400, "invalid_json", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "invalid_request", "the body must be a JSON object")
    scope = body.get("scope")
    if not isinstance(scope, str) or not is_valid_room_name(scope):
        return _error(400, "invalid_scope", f"scope names are {ROOM_NAME_RULE}; got {scope!r}")
    key = bearer(request.headers.get("authorization", "")) or ""
    if not hub.identities.is_scope_key(scope, key):
        return _error(
            401,
            "unauthorized",
            "claims need the scope's key in Authorization: Bearer <key> (the Jupyter "
            "identity provider sends it; `presence scope-key SCOPE` prints it)",
            {"WWW-Authenticate": 'Bearer realm="presence"'},
        )
    wait = request.app.state.claim_rates.take(scope, time.monotonic())
    if wait > 0:
        return _error(
            429,
            "rate_limited",
            f"more than {hub.settings.identity_claim_rate:g} claims per second in scope "
            f"{scope!r} (--identity-claim-rate)",
            {"Retry-After": str(math.ceil(wait))},
        )
    ttl = _ttl(body.get("ttl", DEFAULT_TTL))
    if ttl is None:
        return _error(400, "invalid_ttl", f"ttl is a number of seconds from 1 to {MAX_TTL:g}")
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        return _error(400, "invalid_token", "token must be a string")
    try:
        # The token keeps what the person wants (their name and colour, from the token);
        # what they show in the scope can differ while another live identity holds it.
        wanted = hub.identities.verify(token) if token else None
    except InvalidToken as exc:
        return _error(400, "invalid_token", str(exc))
    try:
        shown = await assign(request.app.state.scopes, hub, scope, wanted, ttl)
    except (Unavailable, Contended) as exc:
        return _error(503, "unavailable", str(exc))
    kept = wanted or shown
    return JSONResponse(
        {
            "identity": shown.to_json(),
            "token": token or hub.identities.token(kept),
            "scope": scope,
            "ttl": ttl,
        },
        headers={"Cache-Control": "no-store"},
    )


async def identity(request: Request) -> Response:
    """A fresh anonymous identity (or the one a token stands for), as jupyter_server's
    ``/api/me`` identity, with the token that keeps it."""
    hub: Hub = request.app.state.hub
    token = request.query_params.get("token")
    try:
        ident = hub.identities.verify(token) if token else hub.identities.create()
    except InvalidToken as exc:
        return JSONResponse({"error": "invalid_token", "message": str(exc)}, status_code=400)
    return JSONResponse(
        {"identity": ident.to_json(), "token": hub.identities.token(ident)},
        headers={"Cache-Control": "no-store"},
    )
