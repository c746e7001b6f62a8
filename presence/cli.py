"""``presence serve``: flags and PRESENCE_* variables to settings, settings to uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from presence import __version__
from presence.config import ConfigError, Settings


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
    return parser


def _shown(default: object) -> str:
    return "unset" if default in ("", None) else str(default)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.load(flags)
    except ConfigError as exc:
        parser.exit(2, f"presence: error: {exc}\n")
    serve(settings)


def serve(settings: Settings) -> None:
    import uvicorn

    from presence import logs
    from presence.server.app import create_app, random_secret
    from presence.server.connection import Connection, HttpProtocol

    logs.configure(settings.log_level, settings.log_format)
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
