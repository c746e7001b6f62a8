"""The Jupyter identity provider's client of a presence service (``POST /identities``),
behind a circuit breaker.

A new user's identity is asked for synchronously (jupyter_server's
``generate_anonymous_user`` is not async), so each call may block the server's event loop
for up to ``timeout`` seconds. After a failure the breaker stays open for
``retry_after`` seconds: no call at all, users get identities made in process. Then one
call probes the service; others wait for its answer rather than pile onto a dead service.
An outage is logged once when it starts and once when it ends, not once per user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from presence.core.colors import parse_hex
from presence.core.identity import Identity, InvalidToken


@dataclass(frozen=True, slots=True)
class Assigned:
    """What the service answered: the identity to show now, and the token that keeps it."""

    identity: Identity
    token: str


SECRET_ADVICE = (
    "set PresenceIdentityProvider.secret (or PRESENCE_SECRET) to the service's PRESENCE_SECRET"
)


class ServiceError(Exception):
    """The service could not be reached, failed, or answered something unusable."""


class CircuitBreaker:
    def __init__(
        self,
        what: str,
        retry_after: float,
        log: logging.Logger | logging.LoggerAdapter[Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.retry_after = retry_after
        self.log = log
        self.clock = clock
        self.failing = False  # in an outage (logged when it started)
        self._open_until = 0.0
        self._probing = False  # the one call let through after retry_after is under way

    def may_call(self) -> bool:
        """Whether :meth:`allow` would let a call go out now (without asking it)."""
        return not self.failing or (not self._probing and self.clock() >= self._open_until)

    def allow(self) -> bool:
        """Whether a call may go out now (if so, report its outcome)."""
        if not self.failing:
            return True
        if self._probing or self.clock() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        if self.failing:
            self.log.info(f"{self.what} is back: identities come from it again")
        self.failing, self._probing = False, False

    def failure(self, reason: str) -> None:
        self._open_until = self.clock() + self.retry_after
        self._probing = False
        if not self.failing:
            self.failing = True
            self.log.warning(
                f"{self.what} failed ({reason}); anonymous users get identities made by "
                f"this server until it answers again (tried again every "
                f"{self.retry_after:g} s)"
            )
        else:
            self.log.debug(f"{self.what} still failing: {reason}")


class ServiceClient:
    """Asks a presence service for identities within one scope."""

    def __init__(
        self,
        url: str,
        scope: str,
        *,
        key: str,
        verify: Callable[[str], Identity],
        timeout: float,
        retry_after: float,
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.endpoint = url.rstrip("/") + "/identities"
        self.scope = scope
        self.headers = {"Authorization": f"Bearer {key}"}  # the scope's key: claims need it
        self.verify = verify  # the provider's token check: the cookie must pass it later
        self.timeout = timeout
        self.breaker = CircuitBreaker(f"presence service {self.endpoint}", retry_after, log)
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None

    def create(self, ttl: float) -> Assigned | None:
        """A new identity of the scope (blocking); None when the service fails or the
        breaker is open."""
        if not self.breaker.allow():
            return None
        if self._sync is None:
            self._sync = httpx.Client(timeout=self.timeout, headers=self.headers)
        started = time.monotonic()
        try:
            response = self._sync.post(self.endpoint, json={"scope": self.scope, "ttl": ttl})
            assigned = self._answer(response, None)
        except Exception as exc:  # whatever it is, the user logs in with a local identity
            self.breaker.failure(_reason(exc))
            return None
        took = time.monotonic() - started
        if took > self.timeout:
            # This call blocks the Jupyter server: a slow service counts as a failing one
            # (the answer is still used), so that the next logins do not wait for it.
            self.breaker.failure(f"answered after {took:.1f} s, over the {self.timeout:g} s")
        return assigned

    async def renew(self, token: str, ttl: float) -> Assigned | None:
        """The identity ``token`` shows in the scope now, live for ``ttl`` more seconds;
        None when the service fails or the breaker is open."""
        if not self.breaker.allow():
            return None
        if self._async is None:
            self._async = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        body = {"scope": self.scope, "token": token, "ttl": ttl}
        try:
            return self._answer(await self._async.post(self.endpoint, json=body), token)
        except Exception as exc:  # never leave the breaker half-open
            self.breaker.failure(_reason(exc))
            return None

    def _answer(self, response: httpx.Response, sent: str | None) -> Assigned:
        if response.status_code == 401:
            raise ServiceError(f"it refused this server's key to the scope: {SECRET_ADVICE}")
        if response.status_code != 200:
            raise ServiceError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
            token, data = body["token"], body["identity"]
            wanted = self.verify(token)
            identity = Identity(data["username"], data["name"], data["initials"], data["color"])
            if not all(isinstance(x, str) and x for x in (identity.name, identity.initials)):
                raise TypeError("empty name or initials")
            parse_hex(identity.color)
            if identity.username != wanted.username or sent not in (None, token):
                raise ServiceError("the answer is not about the identity asked for")
        except InvalidToken:
            raise ServiceError(
                f"its tokens do not verify with this server's secret: {SECRET_ADVICE}"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ServiceError(f"unexpected answer: {exc!r}") from None
        self.breaker.success()
        return Assigned(identity, token)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, ServiceError) else str(exc)
