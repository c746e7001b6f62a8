import os
import resource
import subprocess
import sys

import pytest

from presence.cli import build_parser, raise_open_files_limit
from presence.config import ConfigError, Settings
from presence.core.identity import IdentityFactory


@pytest.mark.unit
def test_defaults() -> None:
    s = Settings.load({}, env={})
    assert (s.idle_after, s.expire_after, s.max_message_bytes) == (3.0, 30.0, 16384)
    assert s.heartbeat_interval == 10.0


@pytest.mark.unit
def test_flags_win_over_environment() -> None:
    s = Settings.load(
        {"idle_after": "2"}, env={"PRESENCE_IDLE_AFTER": "5", "PRESENCE_PORT": "9000"}
    )
    assert s.idle_after == 2.0 and s.port == 9000


@pytest.mark.parametrize(
    "flags,env,message",
    [
        ({"idle_after": "abc"}, {}, "--idle-after: expected a number"),
        ({}, {"PRESENCE_PORT": "70000"}, "PRESENCE_PORT: must be a port number"),
        ({}, {"PRESENCE_NAME_STYLE": "pirate"}, "PRESENCE_NAME_STYLE: expected one of"),
        ({"locale": "xx_YY"}, {}, "--locale: unknown locale"),
        ({"idle_after": "40"}, {}, "must be shorter than expire_after"),
        ({"rate_limit": "-1"}, {}, "--rate-limit: must be a positive number"),
        ({"flush_interval": "nan"}, {}, "--flush-interval: must be a positive number"),
    ],
)
@pytest.mark.unit
def test_bad_values_name_the_setting(
    flags: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(flags, env=env)


@pytest.mark.unit
def test_every_setting_has_a_flag_and_a_variable() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name, var, *_ in Settings.options():
        assert "--" + name.replace("_", "-") in help_text
        assert var in help_text.replace("\n", " ").replace("  ", "")


@pytest.mark.e2e
def test_bad_value_exits_with_one_line_and_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "presence", "serve", "--expire-after", "-3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "presence: error: --expire-after: must be a positive number, got '-3'"
    ]


@pytest.mark.unit
def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, var, _parse, default, _help, _metavar in Settings.options():
        shown = "unset" if default in ("", None) else f"`{default}`"
        row = f"| `--{name.replace('_', '-')}` | `{var}` | {shown} |"
        assert row in readme, f"README's configuration table lacks or misstates: {row}"


@pytest.mark.unit
def test_serve_takes_the_open_files_the_hard_limit_allows() -> None:
    """A container's soft limit of 1024 would cap a replica near 900 connections."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    _soft, hard = before
    assert hard == resource.RLIM_INFINITY or hard > 256, "this test needs a hard limit above 256"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == (1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.mark.e2e
def test_a_weak_secret_is_refused_and_presence_secret_prints_a_good_one() -> None:
    """A 3-byte secret was brute-forced from one room token it signed in 0.04 s, and a
    forged token joined another room as "Admin": the service no longer starts with one."""

    def serve(secret: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "presence", "serve", "--auth", "token", "--port", "1"],
            env={**os.environ, "PRESENCE_SECRET": secret},
            capture_output=True,
            text=True,
            timeout=30,
        )

    refused = serve("abc")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "presence: error: --secret is 3 bytes: use at least 32 (a shorter one can be guessed "
        "from one token it signed); `presence secret` prints a good one"
    ]
    made = subprocess.run(
        [sys.executable, "-m", "presence", "secret"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(made) == 43 and made != subprocess.getoutput(f"{sys.executable} -m presence secret")
    assert Settings.load({}, {"PRESENCE_SECRET": made}).secret == made


@pytest.mark.unit
def test_secrets_being_rotated_out_must_be_strong_too() -> None:
    strong = "n" * 32
    settings = Settings.load({}, {"PRESENCE_SECRET": strong, "PRESENCE_PREVIOUS_SECRETS": "o" * 40})
    assert settings.previous_secret_list == ["o" * 40]
    with pytest.raises(ConfigError, match="--previous-secrets is 4 bytes"):
        Settings.load(
            {}, {"PRESENCE_SECRET": strong, "PRESENCE_PREVIOUS_SECRETS": "o" * 40 + ",weak"}
        )
    with pytest.raises(ConfigError, match="needs --secret"):
        Settings.load({}, {"PRESENCE_PREVIOUS_SECRETS": "o" * 40})


@pytest.mark.unit
def test_a_scope_keeps_at_most_as_many_identities_as_there_are_pairs_of_initials() -> None:
    assert Settings.load({}, {}).max_identities_per_scope == 500
    assert Settings.load({"max_identities_per_scope": "676"}).max_identities_per_scope == 676
    with pytest.raises(ConfigError, match="at most 676"):
        Settings.load({"max_identities_per_scope": "677"})


@pytest.mark.e2e
def test_presence_scope_key_prints_the_key_the_service_asks_for() -> None:
    secret = "k" * 32
    printed = subprocess.run(
        [sys.executable, "-m", "presence", "scope-key", "lab1-8888", "--secret", secret],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert IdentityFactory(secret.encode()).is_scope_key("lab1-8888", printed)
