"""``presence serve``: flags and PRESENCE_* variables to settings, settings to uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from presence import __version__
from presence.config import MIN_SECRET_BYTES, ConfigError, Settings
from presence.core.access import ROLES
from presence.core.identity import IdentityFactory

# The open files presence takes at most (connection.default_max_connections counts on it).
MAX_OPEN_FILES = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presence", description="Awareness/presence service with anonymous identities."
    )
    parser.add_argument("--version", action="version", version=f"presence {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Run the service. Every option can also be set with the environment "
        "variable shown; a flag wins over the variable.",
    )
    for name, var, _parse, default, help_, metavar in Settings.options():
        # Values stay strings here: Settings.load parses flags and variables alike.
        switch = metavar == "BOOL"  # "--redis-sharded" alone means true
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=metavar,
            default=argparse.SUPPRESS,
            nargs="?" if switch else None,
            const="true" if switch else None,
            help=f"{help_} [{var}] (default: {_shown(default)})",
        )
    token = commands.add_parser(
        "token",
        help="print a room token (for --auth token)",
        description="Print a room token signed with the service's secret (--secret or "
        "PRESENCE_SECRET), for operators and tests; applications mint their own "
        "(docs/protocol.md, Access).",
    )
    token.add_argument("--room", required=True, help="the room (or, with --prefix, prefix)")
    token.add_argument(
        "--prefix", action="store_true", help="good for every room whose name starts with --room"
    )
    token.add_argument(
        "--ttl", default="1h", type=duration, help="lifetime: 90s, 30m, 1h, 7d (default: 1h)"
    )
    token.add_argument("--role", choices=ROLES, default="member")
    token.add_argument("--name", help="name to show for the member")
    token.add_argument("--color", help="colour to show for the member (#rrggbb)")
    token.add_argument("--username", help="stable id of the person")
    token.add_argument("--secret", help="default: PRESENCE_SECRET")
    scope_key = commands.add_parser(
        "scope-key",
        help="print the key of an identity scope (for POST /identities)",
        description="Print the key that POST /identities asks for a scope (Authorization: "
        "Bearer KEY). The Jupyter identity provider makes its own from the same secret.",
    )
    scope_key.add_argument("scope", help="the scope (a Jupyter server's, like lab1-8888)")
    scope_key.add_argument("--secret", help="default: PRESENCE_SECRET")
    commands.add_parser(
        "secret",
        help="print a new secret (for PRESENCE_SECRET)",
        description="Print a new random secret: 32 random bytes, URL-safe (43 characters).",
    )
    return parser


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d`` in seconds."""
    unit = UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 30m, 1h, 7d: {text!r}"
        ) from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def mint(args: argparse.Namespace, now: float) -> str:
    import jwt

    claims: dict[str, Any] = {
        "room_prefix" if args.prefix else "room": args.room,
        "exp": int(now + args.ttl),
        "role": args.role,
    }
    for key in ("name", "color", "username"):
        if getattr(args, key) is not None:
            claims[key] = getattr(args, key)
    return jwt.encode(claims, args.secret, algorithm="HS256")


def _shown(default: object) -> str:
    return "unset" if default in ("", None) else str(default)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "secret":
        print(secrets.token_urlsafe(MIN_SECRET_BYTES))
        return
    if args.command in ("token", "scope-key"):
        args.secret = args.secret or os.environ.get("PRESENCE_SECRET", "")
        if not args.secret:
            parser.exit(2, "presence: error: set PRESENCE_SECRET (or --secret) to sign tokens\n")
        if args.command == "token":
            print(mint(args, time.time()))
        else:
            print(IdentityFactory(args.secret.encode()).scope_key(args.scope))
        return
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.load(flags)
    except ConfigError as exc:
        parser.exit(2, f"presence: error: {exc}\n")
    serve(settings)


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor, and containers often start with a soft
    limit of 1024 under a far higher hard one: take what the hard limit allows (as Go's
    runtime does), before --max-connections' default is read from it. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(settings: Settings) -> None:
    import uvicorn

    from presence import logs
    from presence.server.app import create_app, random_secret
    from presence.websocket.connection import Connection
    from presence.websocket.guard import HttpProtocol

    logs.configure(settings.log_level, settings.log_format)
    raise_open_files_limit()
    options: dict[str, Any] = {}
    if settings.workers > 1:
        # Workers are separate processes: they read the settings from the environment,
        # with one secret for all (a random one is made, and warned about, here once).
        if not settings.secret:
            settings = replace(settings, secret=random_secret())
        os.environ.update(settings.to_env())
        app: Any = "presence.server.app:app_from_env"
        options = {"factory": True, "workers": settings.workers}
    else:
        app = create_app(settings)
    uvicorn.run(
        app,
        **options,
        host=settings.host,
        port=settings.port,
        # The WebSocket endpoints are served by presence's own protocol class (why: its
        # docstring); it reads its limits and ping interval from the settings.
        ws=Connection,
        http=HttpProtocol,  # hands the upgrade over as it came (its docstring)
        # The views see the client that --forwarded-allow-ips proxies name, as the
        # connection limits do (HttpProtocol).
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
