"""PresenceIdentityProvider in real ``jupyter server`` processes, driven over HTTP.

(jupyter_server's pytest plugin runs its app on pytest-jupyter's own event loop, which
pytest-asyncio's auto mode, used by this suite, does not drive: real processes instead.)
Each browser is an httpx client with its own cookie jar, logging in with the token.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from traitlets import TraitError
from traitlets.config import Config, Configurable

from harness.processes import ARTIFACTS, SECRET, Server, die_with_parent, free_port
from presence.core.colors import PALETTE
from presence.core.identity import Identity, IdentityFactory

pytestmark = pytest.mark.e2e

TOKEN = "identity-test-token"
PROVIDER = "--ServerApp.identity_provider_class=presence.jupyter.PresenceIdentityProvider"
IDENTITY_KEYS = {"username", "name", "display_name", "initials", "avatar_url", "color"}


@dataclass
class Jupyter:
    """One ``jupyter server`` process; its runtime directory (and so its cookie secret)
    lives under ``root`` and survives a restart."""

    root: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return ARTIFACTS / f"jupyter-{self.port}.log"

    def start(self, *args: str) -> Jupyter:
        ARTIFACTS.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PRESENCE_SECRET"}
        for name in ("config", "data", "runtime", "work"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        env |= {
            "JUPYTER_CONFIG_DIR": str(self.root / "config"),
            "JUPYTER_DATA_DIR": str(self.root / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"),
            **self.env,
        }
        command = [sys.executable, "-m", "jupyter", "server", "--allow-root", "--no-browser"]
        self.proc = subprocess.Popen(
            [
                *command,
                "--ip=127.0.0.1",
                f"--port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={self.root / 'work'}",
                *(args or self.args),
            ],
            env=env,
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"jupyter server exited; see {self.log}"
            try:
                # /api/status needs a login; the login page does not, and makes no user.
                if httpx.get(f"{self.http}/login", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"jupyter server did not start within 60 s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def jupyters(tmp_path: Path) -> Iterator[list[Jupyter]]:
    started: list[Jupyter] = []
    yield started
    for j in started:
        j.stop()


def jupyter(started: list[Jupyter], root: Path, *args: str, **env: str) -> Jupyter:
    j = Jupyter(root, [PROVIDER, *args], env).start()
    started.append(j)
    return j


def browser(j: Jupyter) -> httpx.Client:
    return httpx.Client(base_url=j.http, timeout=10)


def me(client: httpx.Client, *, token: bool = False) -> dict[str, Any]:
    """``/api/me``'s identity; with ``token=True`` as a login (``?token=``)."""
    response = client.get("/api/me", params={"token": TOKEN} if token else None)
    assert response.status_code == 200, response.text
    identity: dict[str, Any] = response.json()["identity"]
    assert set(identity) == IDENTITY_KEYS
    assert identity["color"] and identity["display_name"] == identity["name"]
    assert identity["avatar_url"] is None
    return identity


def login_cookie(client: httpx.Client) -> str:
    (value,) = [c.value for c in client.cookies.jar if c.name.startswith("username-")]
    return value


def presence_token(cookie: str) -> str:
    """The value inside a tornado signed cookie (``2|1:0|10:ts|len:name|len:b64|sig``)."""
    b64 = cookie.strip('"').split("|")[4].split(":", 1)[1]
    return base64.b64decode(b64).decode()


@pytest.fixture(scope="module")
def service() -> Iterator[Server]:
    """A presence service whose names are animals: Jupyter's own are moons."""
    server = Server(["--name-style", "animal"]).start()  # PRESENCE_SECRET: harness SECRET
    yield server
    server.stop()


def claim(service: Server, scope: str, wanted: Identity) -> dict[str, Any]:
    token = IdentityFactory(SECRET.encode()).token(wanted)
    key = IdentityFactory(SECRET.encode()).scope_key(scope)
    response = httpx.post(
        f"{service.http}/identities",
        json={"scope": scope, "token": token},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    identity: dict[str, Any] = response.json()["identity"]
    return identity


def test_the_scope_is_the_mirror_scope_unless_set_and_must_be_a_valid_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from presence.jupyter.identity import PresenceIdentityProvider

    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)

    class App(Configurable):
        port = 8888

    assert PresenceIdentityProvider(parent=App()).scope == f"{socket.gethostname()}-8888"
    monkeypatch.setenv("JUPYTERHUB_USER", "ada@example.org")
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", "gpu")
    assert PresenceIdentityProvider(parent=App()).scope == "ada_example.org~gpu"
    config = Config()
    config.PresenceJupyter.scope = "team-a"
    assert PresenceIdentityProvider(config=config).scope == "team-a"
    config.PresenceIdentityProvider.scope = "team-b"
    assert PresenceIdentityProvider(config=config).scope == "team-b"
    with pytest.raises(TraitError, match="letters, digits"):
        PresenceIdentityProvider(scope="team b")


def test_every_anonymous_user_gets_a_distinct_identity_stable_with_its_cookie(
    jupyters: list[Jupyter], tmp_path: Path
) -> None:
    j = jupyter(jupyters, tmp_path, PRESENCE_SECRET="jupyter-test-secret")
    clients = [browser(j) for _ in range(20)]
    identities = [me(c, token=True) for c in clients]
    assert len({i["username"] for i in identities}) == 20
    assert len({i["name"] for i in identities}) == 20
    assert len({i["initials"] for i in identities}) == 20
    assert {i["color"] for i in identities[:16]} == set(PALETTE)
    assert all(i["name"].startswith("Anonymous ") for i in identities)
    for client, identity in zip(clients, identities, strict=True):
        assert me(client) == identity  # the cookie alone: the same identity
        assert me(client) == identity
        # The cookie holds a presence token signed with PRESENCE_SECRET.
        token = presence_token(login_cookie(client))
        held = IdentityFactory(b"jupyter-test-secret").verify(token)
        assert (held.username, held.name, held.color) == (
            identity["username"],
            identity["name"],
            identity["color"],
        )
    # Users cannot change their assigned identity by default.
    auth = {"Authorization": f"token {TOKEN}"}  # with the cookie: no XSRF check
    patched = clients[0].patch("/api/me", json={"color": "#000000"}, headers=auth)
    assert patched.status_code == 400 and "not updatable" in patched.text
    assert me(clients[0]) == identities[0]
    # Token login still works without a cookie, and a wrong token does not.
    assert browser(j).get("/api/me", params={"token": "wrong"}).status_code == 403


def test_identity_survives_restarts_and_old_jupyter_cookies_are_read(
    jupyters: list[Jupyter], tmp_path: Path
) -> None:
    # A browser logged in while the server ran jupyter_server's default provider.
    stock = Jupyter(tmp_path, []).start()
    jupyters.append(stock)
    client = browser(stock)
    old = client.get("/api/me", params={"token": TOKEN}).json()["identity"]
    assert old["color"] is None
    assert presence_token(login_cookie(client)).startswith("{")  # jupyter's JSON
    stock.stop()
    # The provider is enabled (no secret configured: derived from the cookie secret). The
    # same port: the cookie's name carries host and port.
    j = Jupyter(tmp_path, [PROVIDER], port=stock.port).start()
    jupyters.append(j)
    client = httpx.Client(base_url=j.http, timeout=10, cookies=client.cookies)
    first = me(client)
    assert (first["username"], first["name"]) == (old["username"], old["name"])
    assert first["color"] in PALETTE
    # ... and the cookie now holds a presence token.
    assert presence_token(login_cookie(client)).count(".") == 1
    assert me(client) == first
    # A restart keeps the identity: the secret is derived from jupyter's cookie secret.
    j.stop()
    j.start()
    assert me(client) == first
    # A new user after the restart does not get the returning user's name or colour.
    other = me(browser(j), token=True)
    assert other["name"] != first["name"] and other["color"] != first["color"]
    # A secret set later makes the old tokens unreadable: a new identity, still logged in.
    j.env["PRESENCE_SECRET"] = "set-later"
    j.stop()
    j.start()
    renewed = me(client)
    assert renewed["username"] != first["username"]
    assert me(client) == renewed  # the cookie was rewritten with a token of the new secret
    # With that secret kept, restarts keep the identity.
    j.stop()
    j.start()
    assert me(client) == renewed


def test_when_allowed_users_choose_a_name_and_colour_and_still_look_distinct(
    jupyters: list[Jupyter], tmp_path: Path
) -> None:
    fields = "--PresenceIdentityProvider.updatable_fields="
    j = jupyter(jupyters, tmp_path, fields + "name", fields + "color", PRESENCE_SECRET="s")
    auth = {"Authorization": f"token {TOKEN}"}
    a, b = browser(j), browser(j)
    me(a, token=True), me(b, token=True)
    wish = {"name": "Ada", "color": PALETTE[5]}
    assert a.patch("/api/me", json=wish, headers=auth).status_code == 200
    assert (me(a)["name"], me(a)["initials"], me(a)["color"]) == ("Ada", "A", PALETTE[5])
    assert IdentityFactory(b"s").verify(presence_token(login_cookie(a))).name == "Ada"
    # B wants the same: B shows the smallest change, and its own colour.
    assert b.patch("/api/me", json=wish, headers=auth).status_code == 200
    shown = me(b)
    assert shown["name"] == "Ada 2" and shown["color"] != PALETTE[5]
    assert shown["initials"] != "A"
    bad = a.patch("/api/me", json={"color": "red"}, headers=auth)
    assert bad.status_code == 400 and "#1A2B3C" in bad.text


def test_without_the_service_users_log_in_and_once_it_is_back_their_identities_join_it(
    jupyters: list[Jupyter], tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there, yet
    j = jupyter(
        jupyters,
        tmp_path,
        f"--PresenceIdentityProvider.url=http://127.0.0.1:{closed}",
        "--PresenceIdentityProvider.scope=lab:outage",
        "--PresenceIdentityProvider.retry_after=1",
        PRESENCE_SECRET=SECRET,  # the service's (harness.processes.Server)
    )
    clients = [browser(j) for _ in range(5)]
    identities = [me(c, token=True) for c in clients]
    assert len({i["name"] for i in identities}) == 5
    assert len({i["color"] for i in identities}) == 5
    assert all(i["name"].startswith("Anonymous ") for i in identities)  # made here
    warnings = [line for line in j.output().splitlines() if "presence service" in line]
    assert len(warnings) == 1, warnings  # once per outage, not once per user
    assert "[W" in warnings[0] and "ConnectError" in warnings[0]
    # The service starts; a second later new users get its identities (animal names).
    service = Server(["--name-style", "animal"], port=closed).start()
    try:
        deadline = time.monotonic() + 15  # retry_after is 1 s: generous on a busy machine
        while me(browser(j), token=True)["name"].startswith("Anonymous "):
            assert time.monotonic() < deadline, "new users never got the service's identities"
            time.sleep(0.2)
        back = [line for line in j.output().splitlines() if "presence service" in line]
        assert len(back) == 2 and "is back" in back[1], back
        # The users who logged in meanwhile keep their identities; their next request
        # renews them with the service, in the background: now they are held in the scope.
        a = identities[0]
        assert me(clients[0]) == a
        time.sleep(2)  # the renewal runs in the background
        twin = Identity("someone-else", a["name"], a["initials"], a["color"])
        assert claim(service, "lab:outage", twin)["name"] == a["name"] + " 2"
    finally:
        service.stop()


def test_a_service_that_does_not_answer_is_not_asked_again_for_a_while(
    jupyters: list[Jupyter], tmp_path: Path
) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        j = jupyter(
            jupyters,
            tmp_path,
            f"--PresenceIdentityProvider.url={url}",
            "--PresenceIdentityProvider.timeout=1",
        )
        started = time.monotonic()
        first = me(browser(j), token=True)
        assert time.monotonic() - started >= 0.9  # waited for the service once
        started = time.monotonic()
        more = [me(browser(j), token=True) for _ in range(5)]
        assert time.monotonic() - started < 4  # the breaker is open: nobody waits 1 s
        assert len({i["name"] for i in [first, *more]}) == 6
        warnings = [line for line in j.output().splitlines() if "presence service" in line]
        assert len(warnings) == 1 and "Timeout" in warnings[0], warnings


def test_identities_come_from_the_service_and_stay_live_there_while_used(
    jupyters: list[Jupyter], tmp_path: Path, service: Server
) -> None:
    j = jupyter(
        jupyters,
        tmp_path,
        f"--PresenceIdentityProvider.url={service.http}",
        "--PresenceIdentityProvider.scope=lab:team",
        "--PresenceIdentityProvider.live_seconds=3",  # renewed at least every second
        PRESENCE_SECRET=SECRET,
    )
    clients = [browser(j) for _ in range(4)]
    identities = [me(c, token=True) for c in clients]
    assert not any(i["name"].startswith("Anonymous ") for i in identities)  # the service's
    assert len({i["name"] for i in identities}) == 4
    assert len({i["color"] for i in identities}) == 4
    # While its browser keeps making requests, the first user's identity is live in the
    # service's scope, past the 3 s of one claim: someone else wanting that name and
    # colour gets others.
    a = identities[0]
    twin = Identity("someone-else", a["name"], a["initials"], a["color"])
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        assert me(clients[0]) == a
        time.sleep(0.3)
    other = claim(service, "lab:team", twin)
    assert other["name"] == a["name"] + " 2" and other["color"] != a["color"]
    # Another scope is not this server's.
    assert claim(service, "lab:elsewhere", twin)["name"] == a["name"]
    # Once the browser stops, the identity expires from the scope: its name is free
    # (3 s after its last renewal, made at most 1 s before the browser stopped).
    time.sleep(5)
    assert claim(service, "lab:team", twin)["name"] == a["name"]


def test_a_service_with_another_secret_is_reported_and_users_still_log_in(
    jupyters: list[Jupyter], tmp_path: Path, service: Server
) -> None:
    j = jupyter(
        jupyters,
        tmp_path,
        f"--PresenceIdentityProvider.url={service.http}",
        PRESENCE_SECRET="not-the-service-secret",
    )
    client = browser(j)
    identity = me(client, token=True)
    assert identity["name"].startswith("Anonymous ")  # made here
    assert me(client) == identity
    warnings = [line for line in j.output().splitlines() if "presence service" in line]
    assert len(warnings) == 1 and "PRESENCE_SECRET" in warnings[0], warnings
