"""``--auth jupyterhub`` without a hub: who may enter which room, and what is done with
the hub's answers (kept, re-checked, held while the hub is away), with a stand-in for
the hub's API and an injected clock. tests/test_access_jupyterhub.py runs a real hub."""

from __future__ import annotations

import math
from typing import Any

import pytest

from presence.access.jupyterhub import MAX_CACHED, HubService, JupyterHubAuth, unavailable
from presence.core.access import AccessError, may_enter, server_of

pytestmark = pytest.mark.unit

ACCESS = ["access:services!service=presence"]


def share(owner: str, server: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "server": {"user": {"name": owner}, "name": server},
        "scopes": [f"access:servers!server={owner}/{server}"],
        **extra,
    }


def test_rooms_belong_to_a_server() -> None:
    assert server_of("alice/:doc") == ("alice", "")
    assert server_of("alice/gpu:json:notebook:1") == ("alice", "gpu")
    assert server_of("a@b.org/:x/y") == ("a@b.org", "")
    for name in ("lobby", "alice/doc", "/x:doc", "alice/:", "alice/a/b:doc", "alice:doc"):
        with pytest.raises(AccessError) as info:
            server_of(name)
        assert (info.value.status, info.value.code) == (403, "other_room")


def test_the_owner_and_those_it_is_shared_with_may_enter() -> None:
    shares = [share("alice"), share("erin", "gpu", kind="group")]
    assert may_enter("alice", "alice/:doc", [])  # the owner
    assert may_enter("bob", "alice/:doc", shares)
    assert may_enter("bob", "erin/gpu:doc", shares)  # a group's share reaches its members
    assert not may_enter("bob", "alice/gpu:doc", shares)  # another server of alice's
    assert not may_enter("bob", "erin/:doc", shares)
    assert not may_enter("bob", "carol/:doc", shares)
    assert not may_enter("bob", "Alice/:doc", shares)  # hub names are exact
    no_access = {**share("alice"), "scopes": ["read:users:name!user=alice"]}
    assert not may_enter("bob", "alice/:doc", [no_access])


class FakeHub:
    """The hub's API as JupyterHubAuth sees it (``_get``): tokens, shares, and a switch
    that makes it unreachable; counts the requests."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.shares: dict[str, list[dict[str, Any]]] = {}
        self.down = False
        self.asked: list[str] = []

    async def get(self, path: str, token: str, params: dict[str, Any] | None = None) -> Any:
        self.asked.append(path)
        if self.down:
            raise unavailable("ConnectError")
        if path == "/user":
            return self.tokens.get(token)
        user = path.split("/")[2]
        items = self.shares.get(user, [])
        offset = (params or {}).get("offset", 0)
        page = items[offset : offset + 2]  # pages of two: the pagination is followed
        following = {"offset": offset + 2} if offset + 2 < len(items) else None
        return {"items": page, "_pagination": {"next": following}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def auth_with_fake(**kw: Any) -> tuple[JupyterHubAuth, FakeHub, Clock]:
    clock, hub = Clock(), FakeHub()
    service = HubService("http://hub/hub/api", "service-token")
    auth = JupyterHubAuth(service, recheck=10, clock=clock, **kw)
    auth._get = hub.get  # type: ignore[method-assign]
    hub.tokens["tb"] = {"kind": "user", "name": "bob", "scopes": ACCESS}
    return auth, hub, clock


async def test_a_grant_names_the_hub_user_and_cannot_be_claimed_otherwise() -> None:
    auth, hub, _ = auth_with_fake()
    hub.shares["bob"] = [share("carol"), share("dave"), share("alice")]  # on the 2nd page
    grant = await auth.check("tb", "alice/:doc", "join")
    assert (grant.name, grant.username, grant.role) == ("bob", "bob", "member")
    assert grant.color is not None and grant.has_identity

    async def refusal(token: str | None, room: str = "alice/:doc") -> tuple[int, str]:
        with pytest.raises(AccessError) as info:
            await auth.check(token, room, "join")
        return info.value.status, info.value.code

    assert await refusal(None) == (401, "missing_token")
    assert await refusal("unknown") == (401, "invalid_token")
    hub.tokens["no-scope"] = {"kind": "user", "name": "bob", "scopes": ["read:users!user=bob"]}
    assert await refusal("no-scope") == (403, "no_access")
    hub.tokens["svc"] = {"kind": "service", "name": "alice", "scopes": ["access:services"]}
    assert await refusal("svc") == (403, "not_a_user")  # a service named like a user
    assert await refusal("tb", "erin/:doc") == (403, "not_shared")
    assert await refusal("tb", "lobby") == (403, "other_room")


async def test_anonymous_faces_replace_hub_names() -> None:
    from presence.core.identity import IdentityFactory

    faces = IdentityFactory(b"secret").derived
    auth, _, _ = auth_with_fake(anonymous=faces)
    grant = await auth.check("tb", "bob/:doc", "join")
    face = faces("bob")
    assert (grant.name, grant.color, grant.username) == (face.name, face.color, face.username)
    assert "bob" not in (grant.username or "")


MIRROR = "custom:presence:mirror"


def server_token(owner: str, server: str = "") -> dict[str, Any]:
    """The hub's model of a single-user server's own token (its 'server' role, with the
    mirror scope the hub expanded to !server=<owner>/<server>)."""
    return {
        "kind": "user",
        "name": owner,
        "scopes": [
            *ACCESS,
            f"access:servers!server={owner}/{server}",
            f"{MIRROR}!server={owner}/{server}",
            f"users:activity!user={owner}",
        ],
    }


@pytest.mark.parametrize("anonymous", [False, True])
async def test_a_servers_token_mirrors_its_own_rooms_and_no_other(anonymous: bool) -> None:
    from presence.core.identity import IdentityFactory

    faces = IdentityFactory(b"secret").derived if anonymous else None
    auth, hub, _ = auth_with_fake(anonymous=faces)
    hub.tokens["gpu"] = server_token("alice", "gpu")
    hub.tokens["default"] = server_token("alice")
    hub.shares["alice"] = [share("erin")]  # alice may enter erin's rooms, her mirror not
    # A mirror's grant has no identity: the collaborators it declares keep their own
    # (each Yjs client ID its own user), with or without --jupyterhub-anonymous.
    for token, room in (("gpu", "alice/gpu:JupyterLab:globalAwareness"), ("default", "alice/:x")):
        for want in ("join", "view"):
            grant = await auth.check(token, room, want)  # type: ignore[arg-type]
            assert (grant.role, grant.expires) == ("member", math.inf)
            assert not grant.has_identity
            assert grant.identity(lambda: IdentityFactory(b"k").derived("x")) is None

    async def refusal(token: str, room: str) -> tuple[int, int, str, str]:
        with pytest.raises(AccessError) as info:
            await auth.check(token, room, "join")
        exc = info.value
        return exc.status, exc.close_code, exc.code, exc.message

    # Rooms of another server, even the owner's own other server or one shared with her.
    for token, room in (
        ("gpu", "alice/:doc"),
        ("gpu", "alice/gpu2:doc"),
        ("gpu", "bob/gpu:doc"),
        ("gpu", "erin/:doc"),
        ("default", "alice/gpu:doc"),
    ):
        status, close, code, message = await refusal(token, room)
        assert (status, close, code) == (403, 4403, "other_room"), (token, room)
        assert "mirrors" in message and len(message) <= 120
    assert "/users/alice/shared" not in hub.asked  # a mirror's rooms need no shares
    # The scope does not replace access to the service.
    no_access = server_token("alice")
    no_access["scopes"] = [s for s in no_access["scopes"] if s not in ACCESS]
    hub.tokens["no-access"] = no_access
    assert (await refusal("no-access", "alice/:doc"))[2] == "no_access"
    # Unfiltered, or filtered to the user (a user's own token once her role holds the
    # scope): no mirror; the hub user's identity is forced, as for any token of hers.
    for scope in (MIRROR, f"{MIRROR}!user=alice"):
        hub.tokens[scope] = {"kind": "user", "name": "alice", "scopes": [*ACCESS, scope]}
        grant = await auth.check(scope, "alice/:doc", "join")
        assert grant.has_identity
        if faces is None:
            assert (grant.name, grant.username) == ("alice", "alice")
        else:
            assert (grant.name, grant.username) == (faces("alice").name, faces("alice").username)


async def test_a_mirror_is_rechecked_like_any_token() -> None:
    auth, hub, clock = auth_with_fake()
    hub.tokens["srv"] = server_token("alice")
    revoked: list[str] = []
    await auth.check("srv", "alice/:doc", "join")
    auth.watch("srv", "alice/:doc", lambda exc: revoked.append(exc.code))
    clock.now += 10
    assert await auth.recheck_all() == 0
    del hub.tokens["srv"]  # the server stopped: the hub deleted its token
    clock.now += 10
    assert await auth.recheck_all() == 1 and revoked == ["invalid_token"]


async def test_answers_are_kept_for_the_recheck_period_then_asked_again() -> None:
    auth, hub, clock = auth_with_fake()
    hub.shares["bob"] = [share("alice")]
    for _ in range(5):
        await auth.check("tb", "alice/:doc", "join")
    assert hub.asked == ["/user", "/users/bob/shared"]
    clock.now += 10
    await auth.check("tb", "alice/:doc", "join")
    assert len(hub.asked) == 4


async def test_one_request_per_question_however_many_ask_at_once() -> None:
    import asyncio

    auth, hub, _ = auth_with_fake()
    hub.shares["bob"] = [share("alice")]
    await asyncio.gather(*(auth.check("tb", "alice/:doc", "join") for _ in range(20)))
    assert hub.asked == ["/user", "/users/bob/shared"]


async def test_a_revoked_share_or_token_revokes_open_connections_at_the_next_check() -> None:
    auth, hub, clock = auth_with_fake()
    hub.shares["bob"] = [share("alice")]
    hub.tokens["ta"] = {"kind": "user", "name": "alice", "scopes": ACCESS}
    revoked: list[tuple[str, str]] = []
    await auth.check("tb", "alice/:doc", "join")
    auth.watch("tb", "alice/:doc", lambda exc: revoked.append(("bob", exc.code)))
    auth.watch("ta", "alice/:doc", lambda exc: revoked.append(("alice", exc.code)))
    unwatch = auth.watch("tb", "alice/:doc", lambda exc: revoked.append(("closed", exc.code)))
    unwatch()  # a connection that closed is no longer checked

    hub.shares["bob"] = []
    assert await auth.recheck_all() == 0 and revoked == []  # the answer is still kept
    clock.now += 10
    assert await auth.recheck_all() == 1
    assert revoked == [("bob", "not_shared")]
    assert await auth.recheck_all() == 0  # revoked once

    del hub.tokens["ta"]  # alice's token revoked (logged out, deleted)
    clock.now += 10
    await auth.recheck_all()
    assert revoked[-1] == ("alice", "invalid_token")


async def test_while_the_hub_is_away_what_it_said_holds_and_new_questions_get_503() -> None:
    auth, hub, clock = auth_with_fake()
    hub.shares["bob"] = [share("alice")]
    revoked: list[str] = []
    await auth.check("tb", "alice/:doc", "join")
    auth.watch("tb", "alice/:doc", lambda exc: revoked.append(exc.code))
    hub.down = True
    clock.now += 60
    assert await auth.recheck_all() == 0 and revoked == []  # nobody can revoke meanwhile
    await auth.check("tb", "alice/:doc", "join")  # the last answers stand in
    hub.tokens["tc"] = {"kind": "user", "name": "carol", "scopes": ACCESS}
    with pytest.raises(AccessError) as info:
        await auth.check("tc", "alice/:doc", "join")
    assert (info.value.status, info.value.close_code) == (503, 1013)
    hub.down = False
    with pytest.raises(AccessError, match="not shared"):
        await auth.check("tc", "alice/:doc", "join")  # 503s were not kept


async def test_a_flood_of_unknown_tokens_keeps_a_bounded_cache() -> None:
    auth, _, _ = auth_with_fake()
    for i in range(MAX_CACHED + 50):
        with pytest.raises(AccessError):
            await auth.user(f"junk-{i}")
    assert len(auth._users._answers) == MAX_CACHED


def test_the_hub_environment_of_a_service() -> None:
    service = HubService.from_env(
        {
            "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api/",
            "JUPYTERHUB_API_TOKEN": "t",
            "JUPYTERHUB_SERVICE_NAME": "awareness",
            "JUPYTERHUB_CLIENT_ID": "service-awareness",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": "/services/awareness/oauth_callback",
            "JUPYTERHUB_BASE_URL": "/",
            "JUPYTERHUB_PUBLIC_HUB_URL": "https://Hub.example.org/hub/",
        }
    )
    assert service.api_url == "http://127.0.0.1:8081/hub/api"
    assert service.public_origin == "https://hub.example.org"
    assert service.access_scopes == {"access:services", "access:services!service=awareness"}


def test_a_service_the_hub_does_not_start_takes_its_callback_under_the_base_url() -> None:
    # JupyterHub registers an external service's OAuth callback as
    # <base_url>services/<name>/oauth_callback, and tells only the services it starts.
    env = {"JUPYTERHUB_API_URL": "http://hub:8081/jupyter/hub/api", "JUPYTERHUB_API_TOKEN": "t"}
    for base, callback in (
        (None, "/services/presence/oauth_callback"),
        ("/jupyter/", "/jupyter/services/presence/oauth_callback"),
        ("/jupyter", "/jupyter/services/presence/oauth_callback"),
    ):
        service = HubService.from_env(env | ({"JUPYTERHUB_BASE_URL": base} if base else {}))
        assert service.callback_url == callback


def test_settings_outside_and_inside_a_hub() -> None:
    from presence.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN not set"):
        Settings.load({"auth": "jupyterhub"}, env={})
    env = {
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JUPYTERHUB_API_TOKEN": "t",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/presence/",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:10101",
    }
    settings = Settings.load({"auth": "jupyterhub"}, env=env)
    assert (settings.base_path, settings.host, settings.port) == (
        "/services/presence",
        "127.0.0.1",
        10101,
    )
    mine = Settings.load({"auth": "jupyterhub", "port": "9000", "base_path": ""}, env=env)
    assert (mine.port, mine.base_path) == (9000, "")  # what is set wins
    with pytest.raises(ConfigError, match="--jupyterhub-anonymous needs --secret"):
        Settings.load({"auth": "jupyterhub", "jupyterhub_anonymous": "true"}, env=env)
    with pytest.raises(ConfigError, match="--base-path"):
        Settings.load({"base_path": "services/x"}, env={})


def test_where_a_request_carries_its_hub_token() -> None:
    auth, _, _ = auth_with_fake()
    cookie = {"cookie": 'a={"x": 1}; other=b c; service-presence=from-cookie'}
    assert auth.token_of({"authorization": "token t1", **cookie}, {}) == "t1"
    assert auth.token_of({"authorization": "Bearer t2"}, {"access_token": "q"}) == "t2"
    assert auth.token_of({"authorization": "Basic x"}, {"access_token": "q"}) == "q"
    # Another app's odd cookies on the hub's domain do not hide ours.
    assert auth.token_of(cookie, {}) == "from-cookie"
    # The HTTP views take the cookie only from a person navigating there, not from a
    # script of another user's server on the hub's origin.
    assert auth.token_of(cookie, {}, via="http") is None
    assert auth.token_of({**cookie, "sec-fetch-mode": "cors"}, {}, via="http") is None
    navigating = {**cookie, "sec-fetch-mode": "navigate"}
    assert auth.token_of(navigating, {}, via="http") == "from-cookie"


def test_websockets_take_the_login_cookie_only_where_the_origin_is_not_shared() -> None:
    """Before: a page of another user's server (same origin, no per-user subdomains)
    opened WebSockets with the browser's cookie and joined the user's rooms as them."""
    from presence.core.access import AccessError

    cookie = {"cookie": "service-presence=from-cookie"}
    auth, _, _ = auth_with_fake()
    with pytest.raises(AccessError) as refused:
        auth.token_of(cookie, {}, via="websocket")
    assert (refused.value.close_code, refused.value.code) == (4403, "cookie_refused")
    # A hub token sent by the page (or JupyterLab's mirror) is what a socket needs.
    assert auth.token_of({**cookie, "authorization": "Bearer t"}, {}, via="websocket") == "t"
    assert auth.token_of(cookie, {"access_token": "q"}, via="websocket") == "q"
    assert auth.token_of({}, {}, via="websocket") is None
    # Per-user subdomains (--jupyterhub-allow-websocket-cookie): the cookie will do.
    subdomains, _, _ = auth_with_fake(websocket_cookie=True)
    assert subdomains.token_of(cookie, {}, via="websocket") == "from-cookie"


def test_two_login_cookies_are_refused_not_the_last_taken() -> None:
    """A page of the hub's origin (another user's server) can set a cookie of the same
    name at path /, which browsers send after the real one: last-wins ran the victim's
    sockets as the attacker."""
    from presence.core.access import AccessError

    auth, _, _ = auth_with_fake()
    planted = {"cookie": "service-presence=victims; x=1; service-presence=attackers"}
    for via in ("page", "http"):
        with pytest.raises(AccessError) as refused:
            auth.token_of({**planted, "sec-fetch-mode": "navigate"}, {}, via=via)  # type: ignore[arg-type]
        assert refused.value.status == 401 and "two cookies" in refused.value.message
    # A token sent explicitly is not ambiguous.
    assert auth.token_of({**planted, "authorization": "Bearer t"}, {}) == "t"
    assert auth.token_of({"cookie": "service-presence="}, {}) is None


def test_only_a_hub_service_counts_its_own_host_as_an_allowed_origin() -> None:
    from presence.access.rules import Access

    auth, _, _ = auth_with_fake()
    host, same = "hub.example:8000", "http://hub.example:8000"
    assert Access("jupyterhub", "", frozenset(), jupyterhub=auth).origin_allowed(same, host)
    # Elsewhere Origin == Host is also what a DNS-rebinding page sends: not enough.
    assert not Access("token", "", frozenset(["https://app.example"])).origin_allowed(same, host)


async def test_the_login_never_sends_a_browser_elsewhere() -> None:
    import base64

    import orjson
    from starlette.requests import Request

    auth, _, _ = auth_with_fake()

    def request(query: str, cookie: str = "") -> Request:
        headers = [(b"cookie", cookie.encode())] if cookie else []
        scope = {"type": "http", "headers": headers, "query_string": query.encode()}
        return Request({**scope, "scheme": "http", "server": ("hub", 80), "path": "/login"})

    for wanted in ("https://evil.example/", "//evil.example", "/\\evil.example", "evil"):
        response = auth.login(request(f"next={wanted}"), "/services/presence")
        state = response.headers["location"].split("state=")[1]
        padded = state + "=" * (-len(state) % 4)
        assert orjson.loads(base64.urlsafe_b64decode(padded))["next"] == "/services/presence/"

    # A state cookie planted by a page of the same origin, with its own "next": the
    # callback checks that too (it answers before asking the hub when the code is bad).
    planted = base64.urlsafe_b64encode(orjson.dumps({"next": "https://evil.example"}))
    state = planted.decode().rstrip("=")
    from presence.access.jupyterhub import _local

    assert _local("https://evil.example", "/p") == "/p/"
    assert _local("/p/?room=alice/:x", "/p") == "/p/?room=alice/:x"
    mismatch = await auth.callback(
        request(f"code=c&state={state}", "service-presence-oauth-state=other"), "/p"
    )
    assert mismatch.status_code == 400
