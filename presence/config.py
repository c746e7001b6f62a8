"""One validated settings object, from CLI flags and ``PRESENCE_*`` environment variables.

Each setting is declared once below, with its parser and help; the CLI flags, the
environment variables, the README's table and the checks all come from that list.
Precedence: flag, then environment variable, then default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

from presence.core.access import parse_origins
from presence.core.identity import NAME_STYLES, TOKEN_MAX_AGE

ENV_PREFIX = "PRESENCE_"


# Shorter HMAC keys fall to a brute force of one token they signed (a 3-byte secret took
# 0.04 s); 32 bytes is SHA-256's own size.
MIN_SECRET_BYTES = 32
MAX_SCOPE_IDENTITIES = 26 * 26  # pairs of initials; past them claims would clash forever


class ConfigError(ValueError):
    """A setting with a bad value; the message names the setting and what is expected."""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise ValueError(f"must be a port number from 1 to 65535, got {text!r}")
    return value


def optional_int(text: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def optional_positive_int(text: str) -> int | None:
    return None if text == "" else positive_int(text)


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def redis_url(text: str) -> str:
    if text and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"expected a URL like redis://[user:password@]host:6379/0 or rediss://… for TLS, "
            f"got {text!r}"
        )
    return text


def _database(url: str) -> int:
    """The database number of a Redis URL (``/3``, or ``?db=3``); 0 if none."""
    parts = urlsplit(url)
    number = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    return int(number) if number.isdigit() else 0


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}; got {text!r}")
        return text

    return parse


def locale(text: str) -> str:
    from faker.config import AVAILABLE_LOCALES

    if text not in AVAILABLE_LOCALES:
        raise ValueError(
            f"unknown locale {text!r}; use a Faker locale such as en_US, fr_FR, de_DE, ja_JP"
        )
    return text


def origins(text: str) -> str:
    parse_origins(text)  # raises ValueError
    return text


def base_path(text: str) -> str:
    path = text.strip().rstrip("/")
    if path and (not path.startswith("/") or "//" in path or any(c in path for c in "?#% ")):
        raise ValueError(f"expected a path like /services/presence, got {text!r}")
    return path


def _opt(default: Any, parse: Callable[[str], Any], help: str, metavar: str = "") -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", str, "Interface to listen on.", "HOST")
    port: int = _opt(8000, port, "TCP port to listen on.", "PORT")
    workers: int = _opt(
        1,
        positive_int,
        "Worker processes; each is a replica, so more than one needs --redis-url.",
        "N",
    )
    redis_url: str = _opt(
        "",
        redis_url,
        "Redis to share presence with other replicas (redis://, rediss:// "
        "for TLS; user and password in the URL). Unset: in-memory, one process.",
        "URL",
    )
    redis_sharded: bool = _opt(
        False, boolean, "Use sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7).", "BOOL"
    )
    redis_cluster: bool = _opt(
        False, boolean, "The URL names a node of a Redis Cluster (implies sharded pub/sub).", "BOOL"
    )
    replica_timeout: float = _opt(
        5.0,
        positive_float,
        "A replica that dies without a goodbye (SIGKILL, a lost host) has its members removed "
        "everywhere within this many seconds (it heartbeats every fifth of it).",
        "SECONDS",
    )
    replica_permdown: float = _opt(
        300.0,
        positive_float,
        "A replica silent this long is forgotten: its members' records are deleted from "
        "the members hashes of rooms a live replica has open (others expire with their "
        "hash, a day after its last write). One silent for less (a stall) gets its "
        "members back when it speaks again.",
        "SECONDS",
    )
    secret: str = _opt(
        "",
        str,
        "Secret that signs identity tokens (and room tokens with --auth token): at least "
        "32 bytes, such as `presence secret` prints. All replicas must share it; if "
        "unset, a random one is made at start-up and tokens do not survive a restart.",
        "SECRET",
    )
    previous_secrets: str = _opt(
        "",
        str,
        "Secrets used before --secret, comma-separated: tokens they signed are still "
        "accepted (identity tokens come back signed with --secret at the next welcome), "
        "so that a secret can be rotated without logging anyone out. Drop them once the "
        "tokens they signed have expired.",
        "SECRETS",
    )
    token_max_age: float = _opt(
        TOKEN_MAX_AGE,
        positive_float,
        "Seconds an identity token is accepted after it was issued (30 days); an older "
        "one is refused like an invalid one and its client gets a new identity. Every "
        "welcome issues a fresh token, so a client that keeps it is limited by how "
        "long it stays away, not by its first visit.",
        "SECONDS",
    )
    auth: str = _opt(
        "none",
        choice("none", "token", "jupyterhub"),
        "Who may use a room: 'none' (whoever knows its name), 'token' (every WebSocket, "
        "REST and SSE request carries a room token signed with --secret; docs/protocol.md, "
        "Access) or 'jupyterhub' (a hub service: the owner of a hub server and those it is "
        "shared with; docs/jupyter.md). 'token' needs --secret.",
        "MODE",
    )
    allowed_origins: str = _opt(
        "",
        origins,
        "Origins (comma-separated, like https://example.com) whose pages may open "
        "WebSockets and SSE streams; others get 403. Requests without an Origin header "
        "are allowed. Unset: any origin, but with --auth jupyterhub only the hub's own.",
        "ORIGINS",
    )
    base_path: str = _opt(
        "",
        base_path,
        "Path under which every route is served (like /services/presence), for a proxy "
        "that does not strip it. With --auth jupyterhub: the hub's service prefix.",
        "PATH",
    )
    jupyterhub_recheck: float = _opt(
        10.0,
        positive_float,
        "With --auth jupyterhub: seconds the hub's answers (who a token is, what is shared "
        "with whom) are kept, and between checks of open connections; a revoked share "
        "closes its sockets within twice this.",
        "SECONDS",
    )
    jupyterhub_anonymous: bool = _opt(
        False,
        boolean,
        "With --auth jupyterhub: show hub users under anonymous names and colours (the "
        "same for a user every time; needs --secret) instead of their hub names.",
        "BOOL",
    )
    jupyterhub_allow_websocket_cookie: bool = _opt(
        False,
        boolean,
        "With --auth jupyterhub: accept the login cookie on WebSockets. Only where no other "
        "user's pages share this service's origin (per-user subdomains, "
        "JupyterHub.subdomain_host): any page of the origin could otherwise act as the "
        "browser's user. Off: WebSockets need a hub token (Authorization, ?access_token=).",
        "BOOL",
    )
    admin_token: str = _opt(
        "",
        str,
        "Bearer token for GET /rooms (every room, with member counts); unset: "
        "that listing is disabled.",
        "TOKEN",
    )
    name_style: str = _opt(
        "jupyter",
        choice(*NAME_STYLES),
        "Anonymous names: 'jupyter' (Anonymous Io), 'animal' (Brave Otter) or 'person' "
        "(a faker name in --locale).",
        "STYLE",
    )
    locale: str = _opt("en_US", locale, "Faker locale for the 'person' name style.", "LOCALE")
    seed: int | None = _opt(
        None,
        optional_int,
        "Seed for names, colours and ids (tests, demos); unset in production.",
        "N",
    )
    yjs_anonymous: bool = _opt(
        False,
        boolean,
        "Replace the 'user' of Yjs clients with server-made anonymous "
        "identities (by default a client's own 'user' is kept).",
        "BOOL",
    )
    yjs_id_grace: float = _opt(
        30.0,
        positive_float,
        "Seconds a Yjs client ID stays reserved after it left (its socket closed, its "
        "state went null or expired): only the same socket, or one with the same "
        "identity token, may take it back meanwhile.",
        "SECONDS",
    )
    idle_after: float = _opt(
        3.0,
        positive_float,
        "Seconds without an update before a member is 'idle' (its label fades).",
        "SECONDS",
    )
    expire_after: float = _opt(
        30.0,
        positive_float,
        "Seconds without an update or heartbeat before a member is removed.",
        "SECONDS",
    )
    flush_interval: float = _opt(
        0.002,
        positive_float,
        "Shortest time between two frames of one room (a room that sent nothing for "
        "that long sends at the end of the event-loop pass; busy replicas stretch it).",
        "SECONDS",
    )
    max_message_bytes: int = _opt(
        16 * 1024,
        positive_int,
        "Largest client message; larger ones are closed with 1009.",
        "BYTES",
    )
    max_state_bytes: int = _opt(
        16 * 1024, positive_int, "Largest member state, JSON-encoded.", "BYTES"
    )
    max_depth: int = _opt(16, positive_int, "Deepest JSON nesting accepted in a message.", "N")
    rate_limit: float = _opt(
        30.0,
        positive_float,
        "State updates per second per client; faster updates are "
        "merged (latest wins), never queued.",
        "PER_SECOND",
    )
    max_room_members: int = _opt(
        500, positive_int, "Members per room; one more is refused with close code 1013.", "N"
    )
    max_identities_per_scope: int = _opt(
        500,
        positive_int,
        "Live identities per scope of POST /identities (up to 676, the pairs of "
        "initials that keep them apart); a new one past it reclaims the one renewed "
        "longest ago.",
        "N",
    )
    identity_claim_rate: float = _opt(
        50.0,
        positive_float,
        "POST /identities claims per second of one scope per replica (bursts of ten "
        "times as many); past it, 429 with Retry-After.",
        "PER_SECOND",
    )
    max_room_state_bytes: int = _opt(
        512 * 1024,
        positive_int,
        "The states of a room's members together, JSON-encoded: a state that would "
        "grow them past it is refused (room_state_too_large). Bounds what a snapshot of "
        "the room (a welcome, GET /rooms/{room}) costs, beyond the members' identities.",
        "BYTES",
    )
    send_backlog: int = _opt(
        32, positive_int, "Batches queued for a client before its backlog is merged.", "N"
    )
    slow_client_timeout: float = _opt(
        10.0,
        positive_float,
        "Seconds a send may stall before the client is closed with 1013.",
        "SECONDS",
    )
    ping_interval: float = _opt(
        20.0,
        positive_float,
        "Seconds between WebSocket pings (finds half-open connections).",
        "SECONDS",
    )
    handshake_timeout: float = _opt(
        5.0,
        positive_float,
        "Seconds a connection may take to send a whole HTTP request (for a WebSocket, its "
        "upgrade request) from when it opens; slower ones are closed (slowloris).",
        "SECONDS",
    )
    max_connections: int | None = _opt(
        None,
        optional_positive_int,
        "Open TCP connections (HTTP and WebSocket) per replica; more are refused with 503. "
        "Unset: the process's soft limit of open files, less a tenth of it (at least 64) "
        "kept for Redis, logs and the refusals themselves.",
        "N",
    )
    max_connections_per_ip: int = _opt(
        1024,
        positive_int,
        "Open TCP connections per client IP per replica; more are refused with 503. A "
        "lecture hall behind one NAT address fits; one address cannot take a replica's "
        "--max-connections. The client IP is the peer's, or the X-Forwarded-For client "
        "when the peer is one of --forwarded-allow-ips.",
        "N",
    )
    connection_rate_per_ip: float = _opt(
        50.0,
        positive_float,
        "New TCP connections per second per client IP per replica, in bursts of what "
        "10 s would allow; faster ones are refused with 429 and Retry-After.",
        "PER_SECOND",
    )
    forwarded_allow_ips: str = _opt(
        "",
        str,
        "Proxies (comma-separated IPs or networks, or *) whose X-Forwarded-For header "
        "names the client (for the per-IP limits and the HTTP views). None by default: "
        "set it to the load balancer's address when there is one. With *, the last "
        "address of the header is the client: the proxy must set it, not append to the "
        "client's.",
        "IPS",
    )
    log_level: str = _opt(
        "info", choice("debug", "info", "warning", "error"), "Log level.", "LEVEL"
    )
    log_format: str = _opt(
        "json", choice("json", "text"), "'json' (one object per line) or 'text'.", "FORMAT"
    )
    access_log: bool = _opt(
        True,
        boolean,
        "Log a line (logger presence.access) when a WebSocket session opens and closes and "
        "when a connection is refused: protocol, room, client IP, member ids, close code and "
        "reason, duration; never tokens.",
        "BOOL",
    )

    def __post_init__(self) -> None:
        if self.idle_after >= self.expire_after:
            raise ConfigError(
                f"idle_after ({self.idle_after:g}s) must be shorter than expire_after "
                f"({self.expire_after:g}s): a member goes idle before it expires"
            )
        if self.workers > 1 and not self.redis_url:
            raise ConfigError(
                f"{self.workers} workers need a shared backplane: set --redis-url (or "
                "PRESENCE_REDIS_URL), or run one worker"
            )
        if (self.redis_sharded or self.redis_cluster) and not self.redis_url:
            raise ConfigError("--redis-sharded and --redis-cluster need --redis-url")
        if self.redis_cluster and _database(self.redis_url) != 0:
            raise ConfigError(
                f"--redis-url: a Redis Cluster has only database 0, got "
                f"{_database(self.redis_url)} (drop the /N from the URL)"
            )
        if self.replica_permdown <= self.replica_timeout:
            raise ConfigError(
                f"replica_permdown ({self.replica_permdown:g}s) must be longer than "
                f"replica_timeout ({self.replica_timeout:g}s)"
            )
        for name, secret in [("--secret", self.secret)] + [
            ("--previous-secrets", s) for s in self.previous_secret_list
        ]:
            if secret and len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{name} is {len(secret.encode())} bytes: use at least {MIN_SECRET_BYTES} "
                    "(a shorter one can be guessed from one token it signed); "
                    "`presence secret` prints a good one"
                )
        if self.max_identities_per_scope > MAX_SCOPE_IDENTITIES:
            raise ConfigError(
                f"--max-identities-per-scope is {self.max_identities_per_scope}: at most "
                f"{MAX_SCOPE_IDENTITIES} live identities of a scope can show distinct initials"
            )
        if self.previous_secrets and not self.secret:
            raise ConfigError("--previous-secrets needs --secret, the one that replaces them")
        if self.auth == "token" and not self.secret:
            raise ConfigError(
                "--auth token needs --secret (PRESENCE_SECRET): room tokens are signed with it"
            )
        if self.jupyterhub_anonymous and not self.secret:
            raise ConfigError(
                "--jupyterhub-anonymous needs --secret (PRESENCE_SECRET): a hub user's "
                "anonymous name comes from it, the same on every replica and after restarts"
            )
        if self.max_state_bytes < 64:
            raise ConfigError("max_state_bytes must be at least 64")

    @property
    def previous_secret_list(self) -> list[str]:
        return [s.strip() for s in self.previous_secrets.split(",") if s.strip()]

    def to_env(self) -> dict[str, str]:
        """These settings as PRESENCE_* variables (how worker processes receive them)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[ENV_PREFIX + f.name.upper()] = (
                    str(value).lower() if isinstance(value, bool) else str(value)
                )
        return env

    @property
    def heartbeat_interval(self) -> float:
        """What clients are told: three heartbeats fit in one expiry period."""
        return self.expire_after / 3

    @classmethod
    def options(cls) -> list[tuple[str, str, Callable[[str], Any], Any, str, str]]:
        """(name, env var, parser, default, help, metavar) for every setting."""
        return [
            (
                f.name,
                ENV_PREFIX + f.name.upper(),
                f.metadata["parse"],
                None if f.default is MISSING else f.default,
                f.metadata["help"],
                f.metadata["metavar"],
            )
            for f in fields(cls)
        ]

    @classmethod
    def load(
        cls, flags: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from raw flag values and an environment; raises :class:`ConfigError`."""
        flags = flags or {}
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var, parse, _default, _help, _metavar in cls.options():
            if name in flags:
                source, raw = "--" + name.replace("_", "-"), flags[name]
            elif var in env:
                source, raw = var, env[var]
            else:
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if values.get("auth") == "jupyterhub":
            _as_hub_service(values, env)
        return cls(**values)


# What a hub gives the services it starts (JupyterHub's Spawner.get_env).
HUB_API_URL, HUB_API_TOKEN = "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN"


def _as_hub_service(values: dict[str, Any], env: Mapping[str, str]) -> None:
    """``--auth jupyterhub``: where to listen, and the path, from the hub's variables
    unless set; refuses to start outside a hub."""
    missing = [var for var in (HUB_API_URL, HUB_API_TOKEN) if not env.get(var)]
    if missing:
        raise ConfigError(
            f"--auth jupyterhub: {' and '.join(missing)} not set. Run presence as a "
            "JupyterHub service (c.JupyterHub.services, docs/jupyter.md), or set them to "
            "the hub's API URL and the service's API token"
        )
    if "base_path" not in values and env.get("JUPYTERHUB_SERVICE_PREFIX"):
        values["base_path"] = base_path(env["JUPYTERHUB_SERVICE_PREFIX"])
    url = urlsplit(env.get("JUPYTERHUB_SERVICE_URL", ""))
    if "host" not in values and url.hostname:
        values["host"] = url.hostname
    if "port" not in values and url.port:
        values["port"] = url.port
