"""The docs say what the code and the recorded results say."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest

from load.tables import BENCHMARKS, load_results, update_doc
from presence.access.rules import CLOCK_SKEW
from presence.backplane.redis import GIVE_UP_AFTER, MAX_BACKOFF
from presence.config import Settings
from presence.core.room import ROOM_NAME_RULE
from presence.endpoints.json import MAX_CONSECUTIVE_ERRORS
from presence.jupyter.extension import PresenceJupyter
from presence.server.identities import BURST_SECONDS, DEFAULT_TTL, MAX_BODY, MAX_TTL
from presence.websocket.connection import FRAMES_PER_TURN
from presence.websocket.frames import MAX_FRAGMENTS
from presence.websocket.limits import RATE_BURST_SECONDS
from presence.yjs.client import MAX_CLIENT_IDS
from presence.yjs.endpoint import ECHO_OVERHEAD

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings()

# (doc, phrase as written there, setting whose default the phrase's number is). The
# README's configuration table is checked by tests/test_config.py.
QUOTED = [
    ("README.md", "goes *idle* after 3 s", "idle_after"),
    ("README.md", "stops heartbeating (30 s)", "expire_after"),
    ("README.md", '"idle_after": 3.0', "idle_after"),
    ("README.md", '"expire_after": 30.0', "expire_after"),
    ("README.md", '"heartbeat_interval": 10.0', "heartbeat_interval"),
    ("docs/protocol.md", '"idle_after": 3.0', "idle_after"),
    ("docs/protocol.md", '"expire_after": 30.0', "expire_after"),
    ("docs/protocol.md", '"heartbeat_interval": 10.0', "heartbeat_interval"),
    ("docs/protocol.md", "for `flush_interval` (2 ms)", "flush_interval"),
    ("docs/protocol.md", "`rate_limit` per second (30)", "rate_limit"),
    ("docs/protocol.md", "`max_depth` (16)", "max_depth"),
    ("docs/protocol.md", "`max_state_bytes` (16 KiB)", "max_state_bytes"),
    ("docs/protocol.md", "`max_room_state_bytes` (512 KiB)", "max_room_state_bytes"),
    ("docs/protocol.md", "`max_message_bytes` (16 KiB)", "max_message_bytes"),
    ("docs/protocol.md", "`slow_client_timeout` (10 s)", "slow_client_timeout"),
    ("docs/protocol.md", "`ping_interval` (20 s)", "ping_interval"),
    ("docs/protocol.md", "`expire_after` (30 s, as y-protocols)", "expire_after"),
    ("docs/protocol.md", "`yjs_id_grace` (30 s", "yjs_id_grace"),
    ("docs/benchmarks.md", "defaults (2 ms flush interval", "flush_interval"),
    ("README.md", "within `--replica-timeout` (5 s)", "replica_timeout"),
    ("docs/protocol.md", "`--max-identities-per-scope` (500)", "max_identities_per_scope"),
    ("docs/protocol.md", "`--identity-claim-rate` (50)", "identity_claim_rate"),
]
# Numbers the docs quote from constants in the code rather than from settings.
RECHECK = PresenceJupyter.recheck.default_value
PYTEST = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
CONSTANTS = [
    ("docs/protocol.md", "More than 10 invalid messages in a row", MAX_CONSECUTIVE_ERRORS),
    ("docs/protocol.md", "more than 10 invalid messages in a row", MAX_CONSECUTIVE_ERRORS),
    ("docs/protocol.md", "at most 8 client IDs", MAX_CLIENT_IDS),
    ("README.md", "retries slow down to one every 5 s", MAX_BACKOFF),
    ("README.md", "grows to one every 5 s", MAX_BACKOFF),
    ("README.md", "if Redis answers within 20 s", GIVE_UP_AFTER),
    ("README.md", "After 20 s without an answer", GIVE_UP_AFTER),
    ("README.md", "1 to 128 characters", ROOM_NAME_RULE),
    ("docs/protocol.md", "1 to 128 characters", ROOM_NAME_RULE),
    ("docs/protocol.md", "(default 3600 s", DEFAULT_TTL),
    ("docs/protocol.md", "at most 604800 s", MAX_TTL),
    ("docs/protocol.md", "at most 4096 bytes", MAX_BODY),
    ("docs/protocol.md", "what 10 s would allow", BURST_SECONDS),
    ("README.md", "(after a burst of 10 s worth)", RATE_BURST_SECONDS),
    ("docs/security.md", "after a burst of 10 s worth", RATE_BURST_SECONDS),
    ("README.md", "fails after 120 s", PYTEST["timeout"]),
    ("docs/protocol.md", "more than 1024 frames", MAX_FRAGMENTS),
    ("docs/protocol.md", "at most 128 frames of one connection", FRAMES_PER_TURN),
    ("README.md", "the extension's 10 s re-check", RECHECK),
    ("docs/protocol.md", "`nbf` with 60 s of leeway", CLOCK_SKEW),
    ("docs/protocol.md", "plus 128 bytes per `max_room_members`", ECHO_OVERHEAD),
]
# Numbers next to a unit or a setting's name that quote neither, with why.
UNRELATED = [
    ("docs/protocol.md", "(about 11 s"),  # a measured run time of scripts/autobahn.sh
    ("docs/protocol.md", "control frame over 125 bytes"),  # RFC 6455
    ("docs/protocol.md", "0.5 s doubling to 10 s"),  # advice to clients
    ("docs/protocol.md", "stays silent for 30 s"),  # y-websocket's reconnect timeout
    ("docs/protocol.md", "for ~17 s"),  # y-protocols' clock handling
    ("docs/protocol.md", "comment every 15 s"),  # a literal in presence/server/views.py
    ("docs/protocol.md", "every `expire_after / 2`"),  # a literal in presence/hub/hub.py
    ("docs/protocol.md", "401 without it, 403"),  # HTTP statuses
    ("docs/benchmarks.md", "flush interval 10 ms → 5 ms"),  # history of the default
    ("README.md", "redis.internal:6379/0 --port 8000"),  # an example command
    ("README.md", "redis://user:password@host:6379/0"),  # example URLs
    ("README.md", "rediss://host:6380"),
    ("README.md", "redis://any-node:6379"),
    ("README.md", "heartbeat every `replica_timeout / 5`"),  # formulas of the bound
    ("README.md", "check every `replica_timeout / 10`"),
    ("README.md", "(2.5 to 4 s by default"),  # 0.5 to 0.8 x replica_timeout, tested
    ("README.md", "measured: 0.15 s"),  # tests/test_jupyter_lab.py, docs/jupyter.md
    ("README.md", "jupyter-collaboration: 31 s"),  # the same, stock
    # The stall bound's formula (RedisBackplane: timeout, checked every half of it) and
    # tests/test_faults.py's measured partition
    ("README.md", "about 1.5 \u00d7 `max(1 s, 0.4 \u00d7 replica_timeout)`"),
    ("README.md", "timed; 3 s by default"),
    ("README.md", "unready 1.34 to 1.48 s"),
    ("README.md", "(`--replica-timeout 2`: bound 1.5 s)"),
    ("README.md", "within 0.08 s, nobody"),
    # tests/test_failover.py: its node timeout, the measured bound, Redis's default
    ("README.md", "a 2 s node timeout"),
    ("README.md", "again 6.4 s after"),
    ("README.md", "runs, 6.38 to 6.48 s"),
    ("README.md", "timeout, 15 s"),
    ("README.md", "about 20 s"),
]
# Sections another change is rewriting (the replica liveness bound, Redis outages):
# their numbers are not checked here yet.
SKIPPED_SECTIONS: tuple[str, ...] = ()
UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "KiB": 1024.0}


def test_benchmark_tables_are_generated_from_the_results() -> None:
    text = BENCHMARKS.read_text()
    assert update_doc(text, load_results()) == text, (
        "docs/benchmarks.md's tables differ from load/results/*.json: run `python -m load report`"
    )


def test_a_changed_result_changes_the_tables() -> None:
    text, results = BENCHMARKS.read_text(), copy.deepcopy(load_results())
    b = next(r for r in results if (r["scenario"], r.get("protocol")) == ("b", "json"))
    b["delivered_or_superseded"] = 0.99
    changed = update_doc(text, results)
    assert "| 99% |" in changed and "**not met**: (a) 100%, 0 errors; (b) 99%, 0 errors" in changed


def test_every_table_needs_its_markers() -> None:
    text = BENCHMARKS.read_text().replace("<!-- results:begin sweep -->", "")
    with pytest.raises(ValueError, match="sweep"):
        update_doc(text, load_results())


def doc_text(name: str) -> str:
    """A doc with whitespace runs as single spaces (phrases may wrap), without what is
    checked elsewhere: the README's configuration table, generated tables."""
    text = (ROOT / name).read_text()
    if name == "README.md":
        text = "\n".join(line for line in text.splitlines() if not line.startswith("| `--"))
        for title in SKIPPED_SECTIONS:
            text = re.sub(rf"{re.escape(title)}\n.*?(?=\n## |\Z)", "", text, flags=re.S)
    text = re.sub(r"<!-- results:begin (\S+) -->.*?<!-- results:end \1 -->", "", text, flags=re.S)
    return re.sub(r"\s+", " ", text)


def quoted_number(phrase: str) -> float:
    """The first number of a phrase, in seconds or bytes if a unit follows it."""
    m = re.search(r"(\d+(?:\.\d+)?)(?: ?(ms|s|KiB)\b)?", phrase)
    assert m, phrase
    return float(m.group(1)) * UNITS[m.group(2)]


@pytest.mark.parametrize("doc,phrase,setting", QUOTED)
def test_quoted_defaults_match_the_settings(doc: str, phrase: str, setting: str) -> None:
    assert phrase in doc_text(doc), f"{doc} no longer says {phrase!r}: update QUOTED"
    assert quoted_number(phrase) == pytest.approx(getattr(DEFAULTS, setting)), (
        f"{doc} says {phrase!r}, but the default {setting} is {getattr(DEFAULTS, setting)}"
    )


@pytest.mark.parametrize("doc,phrase,value", CONSTANTS)
def test_quoted_constants_match_the_code(doc: str, phrase: str, value: int | str) -> None:
    assert phrase in doc_text(doc)
    assert phrase in value if isinstance(value, str) else quoted_number(phrase) == value


def test_every_number_next_to_a_unit_or_a_setting_is_checked() -> None:
    """Numbers with a unit (README, protocol) or within a few words of a setting's name
    must be in QUOTED, CONSTANTS or UNRELATED, so that no quoted default goes unchecked."""
    names = [name for name, *_ in Settings.options()] + ["heartbeat_interval"]
    forms = {f for n in names for f in (n, n.replace("_", " "), "--" + n.replace("_", "-"))}
    name = re.compile("|".join(rf"(?<![\w-]){re.escape(f)}(?!\w)" for f in forms), re.I)
    number = re.compile(r"(?<![\w.#-])(?<!close )\d+(?:\.\d+)?(?:,\d{3})*( ?(?:ms|s|KiB|bytes)\b)?")
    unchecked = []
    for doc in ("README.md", "docs/protocol.md", "docs/benchmarks.md"):
        text = doc_text(doc)
        phrases = [p for d, p, *_ in QUOTED + CONSTANTS + UNRELATED if d == doc]
        unchecked += [f"{doc}: listed but gone: {p!r}" for p in phrases if p not in text]
        covered = [
            range(m.start(), m.end()) for p in phrases for m in re.finditer(re.escape(p), text)
        ]
        for m in number.finditer(text):
            # A name shortly before the number in the same clause or cell, or right after it.
            before = re.split(r"[|;]|\. ", text[max(0, m.start() - 40) : m.start()])[-1]
            named = name.search(before) or name.match(text, m.end() + 1)
            if not (named or (m.group(1) and doc != "docs/benchmarks.md")):
                continue
            if not any(m.start() in span for span in covered):
                unchecked.append(f"{doc}: …{text[max(0, m.start() - 40) : m.end() + 25]}…")
    assert not unchecked, "numbers that may quote a default:\n" + "\n".join(unchecked)


def test_the_hub_configuration_in_the_docs_is_the_one_the_tests_run() -> None:
    """docs/jupyter.md shows deploy/jupyterhub/jupyterhub_config.py whole, and
    harness/jupyterhub.py (tests/test_jupyterhub_story.py) loads that file."""
    config = (ROOT / "deploy" / "jupyterhub" / "jupyterhub_config.py").read_text()
    doc = (ROOT / "docs" / "jupyter.md").read_text()
    assert f"```python\n{config}```\n" in doc
    from harness.jupyterhub import DEPLOYED

    assert DEPLOYED == ROOT / "deploy" / "jupyterhub" / "jupyterhub_config.py"
    lines = [ln for ln in config.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert f"It is {len(lines)} lines" in doc


def test_every_install_names_the_distribution_not_the_import_name() -> None:
    """On the package index, `presence` is an unrelated project: an install by that name
    gets someone else's code. Every install the docs and files show uses ours."""
    distribution = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert distribution == "presence-awareness"
    installs = re.compile(r"pip3? install[^\n`&;|]*")
    files = [ROOT / "README.md", ROOT / "Dockerfile", *ROOT.glob("docs/*.md")]
    files += [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    wrong = []
    for path in files:
        for command in installs.findall(path.read_text()):
            names = re.findall(r"(?<![\w./-])'?(presence[\w.-]*(?:\[[\w,]+\])?)", command)
            wrong += [f"{path.relative_to(ROOT)}: {command}" for n in names
                      if not n.lstrip("'").startswith(distribution)]  # fmt: skip
    assert not wrong, "\n".join(wrong)
    for path in files:  # `presence[jupyter]` in prose, as a thing to install
        assert "`presence[" not in path.read_text(), path


def test_links_between_the_docs_and_to_files_resolve() -> None:
    broken = []
    for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("deploy/**/*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"\w+:", path):  # an anchor here, or a URL
                continue
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
