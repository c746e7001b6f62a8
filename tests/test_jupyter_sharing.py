"""The sharing endpoint's talk with the hub (presence/jupyter/sharing.py), and the
JupyterLab extension's TypeScript.

tests/test_jupyterhub_story.py runs both on a real JupyterHub 6 in Chromium. Here: the
answers that hub cannot give (an older JupyterHub, a hub that went away, a link revoked
meanwhile), from a small HTTP server that answers as those hubs do; and `tsc`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tornado import httpserver, web

from harness.processes import free_port
from presence.jupyter.sharing import HubSharing, SharingError, hub_version

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_hub_versions_are_read_as_released() -> None:
    assert hub_version("4.1.6") == (4, 1, 6) < (5, 0)
    assert hub_version("5.0.0b1") == (5, 0, 0) >= (5, 0)
    assert hub_version("6.1.1.dev") == (6, 1, 1)
    assert hub_version("unknown") == ()


@pytest.mark.unit
def test_only_a_scope_that_shares_this_server_counts() -> None:
    named = HubSharing("http://hub/hub/api", "alice", "gpu", "/user/alice/gpu/")
    assert named.may_share(["shares!server=alice/gpu"])
    assert named.may_share(["shares!user=alice"]) and named.may_share(["shares"])
    assert not named.may_share(["shares!server=alice/", "read:shares!server=alice/gpu"])
    assert not named.may_share(["shares!user=bob", "access:servers!server=alice/gpu"])


class FakeHub:
    """Answers GET /hub/api/ with ``version`` and every other request with ``answers``
    ((method, path) -> (status, body)); records the requests."""

    def __init__(self, version: str) -> None:
        self.version = version
        # A (status, body), or a function of the request's query arguments giving one.
        self.answers: dict[tuple[str, str], Any] = {}
        self.seen: list[tuple[str, str, str]] = []
        fake = self

        class Handler(web.RequestHandler):
            def _answer(self) -> None:
                path = self.request.path.removeprefix("/hub/api")
                fake.seen.append(
                    (self.request.method or "", path, self.request.headers.get("Authorization", ""))
                )
                if path == "/":
                    status, body = 200, {"version": fake.version}
                else:
                    answer = fake.answers.get((self.request.method or "", path), (404, {}))
                    if callable(answer):
                        answer = answer({k: self.get_argument(k) for k in self.request.arguments})
                    status, body = answer
                self.set_status(status)
                self.finish(json.dumps(body))

            get = post = patch = delete = _answer  # type: ignore[assignment]

        self.app = web.Application([(r"/hub/api.*", Handler)])


@pytest.fixture
async def fake_hub() -> AsyncIterator[tuple[FakeHub, HubSharing]]:
    hub = FakeHub("6.1.1")
    port = free_port()
    server = httpserver.HTTPServer(hub.app)
    server.listen(port, "127.0.0.1")
    try:
        yield hub, HubSharing(f"http://127.0.0.1:{port}/hub/api", "alice", "", "/user/alice/")
    finally:
        server.stop()


def refusal(excinfo: pytest.ExceptionInfo[SharingError]) -> tuple[int, str, str]:
    error = excinfo.value
    return error.status_code, str(error.reason), error.message


@pytest.mark.e2e
async def test_an_older_hub_is_named_with_what_to_ask_for(
    fake_hub: tuple[FakeHub, HubSharing],
) -> None:
    hub, sharing = fake_hub
    hub.version = "4.1.6"
    with pytest.raises(SharingError) as excinfo:
        await sharing.access("alices-token")
    status, reason, message = refusal(excinfo)
    assert (status, reason) == (501, "hub_too_old")
    assert message == (
        "This hub runs JupyterHub 4.1.6; sharing needs JupyterHub 5 or later. Ask your "
        "hub admin to upgrade."
    )
    assert [s[:2] for s in hub.seen] == [("GET", "/")]  # nothing asked of an old hub


@pytest.mark.e2e
async def test_the_hubs_refusals_become_what_to_do(
    fake_hub: tuple[FakeHub, HubSharing],
) -> None:
    hub, sharing = fake_hub
    hub.answers[("GET", "/user")] = (200, {"name": "alice", "scopes": ["self"]})
    with pytest.raises(SharingError) as excinfo:
        await sharing.access("alices-token")
    status, reason, message = refusal(excinfo)
    assert (status, reason) == (403, "sharing_not_allowed")
    assert "shares!user" in message and "oauth_client_allowed_scopes" in message
    assert hub.seen[-1] == ("GET", "/user", "token alices-token")  # her own token

    forbidden = "Action is not authorized with 100% of the scopes; requires any of [shares]"
    hub.answers[("POST", "/share-codes/alice/")] = (403, {"status": 403, "message": forbidden})
    with pytest.raises(SharingError) as excinfo:
        await sharing.create("alices-token", 86400, "a b/n.ipynb")
    assert refusal(excinfo)[1] == "sharing_not_allowed" and forbidden in excinfo.value.message

    # A 404 means "that link is gone" only where a link was named.
    hub.answers[("GET", "/user")] = (200, {"name": "alice", "scopes": ["shares!user=alice"]})
    hub.answers[("GET", "/shares/alice/")] = (404, {"message": "No such server: codey/"})
    with pytest.raises(SharingError) as excinfo:
        await sharing.access("alices-token")
    assert refusal(excinfo)[:2] == (502, "hub_error")
    gone = "No code found matching id=sc_7"
    hub.answers[("DELETE", "/share-codes/alice/")] = (404, {"status": 404, "message": gone})
    with pytest.raises(SharingError) as excinfo:
        await sharing.revoke_code("alices-token", "sc_7")
    assert refusal(excinfo)[:2] == (404, "code_gone")


@pytest.mark.e2e
async def test_a_link_lands_on_the_open_file(fake_hub: tuple[FakeHub, HubSharing]) -> None:
    hub, sharing = fake_hub
    hub.answers[("POST", "/share-codes/alice/")] = (
        200,
        {"id": "sc_1", "accept_url": "/hub/accept-share?code=xyz", "expires_at": "…"},
    )
    made = await sharing.create("alices-token", 3600, "a b/n#1.ipynb")
    assert made["next"] == "/user/alice/lab/tree/a%20b/n%231.ipynb"
    assert made["accept_url"] == (
        "/hub/accept-share?code=xyz&next=%2Fuser%2Falice%2Flab%2Ftree%2Fa%2520b%2Fn%25231.ipynb"
    )
    assert (await sharing.create("alices-token", 3600, None))["next"] == "/user/alice/"
    for climbing in ("../bob/secret.ipynb", "a/./b.ipynb", "a//b.ipynb"):
        with pytest.raises(SharingError) as excinfo:
            await sharing.create("alices-token", 3600, climbing)
        assert refusal(excinfo)[:2] == (400, "bad_path")


@pytest.mark.e2e
async def test_every_page_of_the_hubs_lists_is_read(
    fake_hub: tuple[FakeHub, HubSharing],
) -> None:
    hub, sharing = fake_hub
    hub.answers[("GET", "/user")] = (200, {"name": "alice", "scopes": ["shares!user=alice"]})

    def page(arguments: dict[str, str]) -> tuple[int, dict[str, Any]]:
        offset = int(arguments.get("offset", "0"))
        rows = [
            {"user": {"name": f"user{i}"}, "scopes": [], "created_at": None}
            for i in range(offset, min(offset + 200, 450))
        ]
        following = {"offset": offset + 200} if offset + 200 < 450 else None
        return 200, {"items": rows, "_pagination": {"next": following}}

    hub.answers[("GET", "/shares/alice/")] = page
    hub.answers[("GET", "/share-codes/alice/")] = (200, {"items": [], "_pagination": {}})
    listed = await sharing.access("alices-token")
    assert [s["name"] for s in listed["shares"]] == [f"user{i}" for i in range(450)]


@pytest.mark.e2e
async def test_a_hub_that_went_away_is_said_so() -> None:
    sharing = HubSharing(f"http://127.0.0.1:{free_port()}/hub/api", "alice", "", "/user/alice/")
    with pytest.raises(SharingError) as excinfo:
        await sharing.access("alices-token")
    assert refusal(excinfo)[:2] == (502, "hub_unreachable")


@pytest.mark.e2e
def test_the_jupyterlab_extension_type_checks() -> None:
    """tsc over labextension/src (strict; scripts/install-test-deps.sh installed it)."""
    done = subprocess.run(
        ["npm", "run", "--silent", "check"],
        cwd=ROOT / "labextension",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
