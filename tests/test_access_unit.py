"""Room tokens' claims to decisions (presence.core.access), with the time given; the
server side's PyJWT checks with an injected clock; origins; the CLI's durations."""

from __future__ import annotations

import argparse
import gc
import time
import weakref
from typing import Any

import jwt
import pytest
from starlette.requests import Request

from presence.access.rules import Access
from presence.cli import duration, mint
from presence.config import ConfigError, Settings
from presence.core.access import AccessError, decide, origin_allowed, parse_origins
from presence.core.identity import Identity

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0
SECRET = "unit-test-secret-of-thirty-two-bytes!"
BASE = Identity("u-1", "Anonymous Io", "AI", "#1f77b4")


def refusal(claims: dict[str, Any], room: str = "r1", want: str = "join") -> AccessError:
    with pytest.raises(AccessError) as info:
        decide(claims, room, want, NOW)  # type: ignore[arg-type]
    return info.value


def test_exact_room_member_may_join_and_view() -> None:
    claims = {"room": "r1", "exp": NOW + 60}
    for want in ("join", "view"):
        grant = decide(claims, "r1", want, NOW)  # type: ignore[arg-type]
        assert grant.role == "member" and grant.expires == NOW + 60


def test_expiry_is_decided_by_the_given_clock() -> None:
    claims = {"room": "r1", "exp": NOW + 60}
    assert decide(claims, "r1", "join", NOW + 59.9)
    for now in (NOW + 60, NOW + 61):
        with pytest.raises(AccessError) as info:
            decide(claims, "r1", "join", now)
        assert (info.value.status, info.value.code, info.value.close_code) == (
            401,
            "token_expired",
            4401,
        )


def test_other_room_is_403() -> None:
    exc = refusal({"room": "r1", "exp": NOW + 60}, room="r2")
    assert (exc.status, exc.code, exc.close_code) == (403, "other_room", 4403)


def test_prefix_matches_rooms_that_start_with_it() -> None:
    claims = {"room_prefix": "team-7.", "exp": NOW + 60}
    assert decide(claims, "team-7.doc", "join", NOW)
    assert refusal(claims, room="team-70.doc").code == "other_room"
    assert refusal(claims, room="team-7").code == "other_room"


def test_viewer_may_view_but_not_join() -> None:
    claims = {"room": "r1", "exp": NOW + 60, "role": "viewer"}
    assert decide(claims, "r1", "view", NOW).role == "viewer"
    exc = refusal(claims, want="join")
    assert (exc.status, exc.code, exc.close_code) == (403, "read_only", 4403)


@pytest.mark.parametrize(
    "claims",
    [
        {"room": "r1"},
        {"room": "r1", "exp": "tomorrow"},
        {"room": "r1", "exp": True},
        {"room": "r1", "exp": float("inf")},
        {"exp": NOW + 60},
        {"room": "r1", "room_prefix": "r", "exp": NOW + 60},
        {"room": "", "exp": NOW + 60},
        {"room_prefix": "", "exp": NOW + 60},
        {"room": 7, "exp": NOW + 60},
        {"room": "r1", "exp": NOW + 60, "role": "admin"},
        {"room": "r1", "exp": NOW + 60, "name": ""},
        {"room": "r1", "exp": NOW + 60, "name": "x" * 101},
        {"room": "r1", "exp": NOW + 60, "color": "red"},
        {"room": "r1", "exp": NOW + 60, "username": 42},
    ],
)
def test_malformed_claims_are_an_invalid_token(claims: dict[str, Any]) -> None:
    exc = refusal(claims)
    assert (exc.status, exc.code) == (401, "invalid_token"), exc.message


def test_claimed_identity_replaces_the_parts_it_names() -> None:
    grant = decide({"room": "r1", "exp": NOW + 60, "name": "Ada Lovelace"}, "r1", "join", NOW)
    assert grant.identity(lambda: BASE) == Identity("u-1", "Ada Lovelace", "AL", "#1f77b4")
    grant = decide(
        {"room": "r1", "exp": NOW + 60, "color": "#AABBCC", "username": "ada"}, "r1", "join", NOW
    )
    assert grant.identity(lambda: BASE) == Identity("ada", "Anonymous Io", "AI", "#aabbcc")
    plain = decide({"room": "r1", "exp": NOW + 60}, "r1", "join", NOW)
    assert plain.identity(lambda: pytest.fail("not needed")) is None


def test_origins() -> None:
    allowed = parse_origins(" https://App.example.com, http://localhost:3000 ,")
    assert allowed == {"https://app.example.com", "http://localhost:3000"}
    assert origin_allowed(None, allowed)  # not a browser
    assert origin_allowed("https://app.example.com", allowed)
    assert not origin_allowed("https://evil.example", allowed)
    assert not origin_allowed("null", allowed)
    assert origin_allowed("https://anything.example", None)  # unset: any
    # The service's own pages (their origin is the Host they ask), whatever the list.
    assert origin_allowed("http://presence.example:8000", frozenset(), "presence.example:8000")
    assert not origin_allowed("http://evil.example", frozenset(), "presence.example:8000")
    assert not origin_allowed("null", frozenset(), "null")
    for bad in ("example.com", "https://example.com/", "ftp://x", "https://a.com/path"):
        with pytest.raises(ValueError):
            parse_origins(bad)


def test_settings() -> None:
    assert (Settings().auth, Settings().allowed_origins) == ("none", "")
    with pytest.raises(ConfigError, match="--auth token needs --secret"):
        Settings(auth="token")
    with pytest.raises(ConfigError, match="--allowed-origins"):
        Settings.load({"allowed_origins": "example.com"}, env={})


def server_side(now: float) -> Access:
    return Access("token", SECRET, frozenset(), clock=lambda: now)


def test_pyjwt_checks_signature_algorithm_and_exp() -> None:
    access = server_side(NOW)
    good = jwt.encode({"room": "r1", "exp": 4_000_000_000}, SECRET, algorithm="HS256")
    grant = access.check_token(good, "r1", "join")
    assert grant is not None and access.until_expiry(grant) == 4_000_000_000 - NOW
    assert Access("none", "", frozenset()).check_token(None, "r1", "join") is None

    def code(token: str | None) -> str:
        with pytest.raises(AccessError) as info:
            access.check_token(token, "r1", "join")
        assert info.value.status == 401
        return info.value.code

    assert code(None) == "missing_token"
    assert code("") == "missing_token"
    assert code("not.a.jwt") == "invalid_token"
    foreign = jwt.encode({"room": "r1", "exp": 4_000_000_000}, "x" * 32, algorithm="HS256")
    assert code(foreign) == "invalid_token"
    assert code(jwt.encode({"room": "r1"}, SECRET, algorithm="HS256")) == "invalid_token"
    unsigned = jwt.encode({"room": "r1", "exp": 4_000_000_000}, None, algorithm="none")
    assert code(unsigned) == "invalid_token"
    hs512 = jwt.encode({"room": "r1", "exp": 4_000_000_000}, SECRET * 2, algorithm="HS512")
    assert code(hs512) == "invalid_token"
    past = jwt.encode({"room": "r1", "exp": 1_000_000_000}, SECRET, algorithm="HS256")
    assert code(past) == "token_expired"
    # PyJWT checks exp against the real time; the decision against the injected clock.
    soon = jwt.encode({"room": "r1", "exp": 4_000_000_000}, SECRET, algorithm="HS256")
    with pytest.raises(AccessError, match="expired"):
        server_side(4_000_000_000).check_token(soon, "r1", "join")


def test_an_iat_in_the_future_is_no_refusal() -> None:
    """A backend whose clock runs a few seconds ahead mints an ``iat`` "from the
    future": PyJWT (leeway 0) would refuse it; the service does not check ``iat``."""
    access = Access("token", SECRET, frozenset())
    ahead = jwt.encode(
        {"room": "r1", "iat": int(time.time()) + 5, "exp": int(time.time()) + 60},
        SECRET,
        algorithm="HS256",
    )
    assert access.check_token(ahead, "r1", "join") is not None
    with pytest.raises(jwt.ImmatureSignatureError):  # what PyJWT's default would do
        jwt.decode(ahead, SECRET, algorithms=["HS256"])


def request_token(request: Request) -> str | None:
    return Access("token", SECRET, None).token_of(request.headers, request.query_params)


def test_a_not_before_a_little_ahead_passes_and_exp_has_no_leeway() -> None:
    access = Access("token", SECRET, None)
    now = time.time()
    ahead = jwt.encode({"room": "r1", "nbf": now + 20, "exp": now + 60}, SECRET, algorithm="HS256")
    assert access.check_token(ahead, "r1", "join") is not None
    later = jwt.encode(
        {"room": "r1", "nbf": now + 600, "exp": now + 900}, SECRET, algorithm="HS256"
    )
    with pytest.raises(AccessError, match="not yet valid"):
        access.check_token(later, "r1", "join")
    gone = jwt.encode({"room": "r1", "exp": now - 5}, SECRET, algorithm="HS256")
    with pytest.raises(AccessError, match="expired"):
        access.check_token(gone, "r1", "join")


def http_request(authorization: str | None, query: str = "") -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "headers": headers, "query_string": query.encode()})


def test_request_token_bearer_header_else_the_query_parameter() -> None:
    assert request_token(http_request("Bearer h.e.ader", "access_token=q.u.ery")) == "h.e.ader"
    assert request_token(http_request("bearer h.e.ader")) == "h.e.ader"
    assert request_token(http_request(None, "access_token=q.u.ery")) == "q.u.ery"
    assert request_token(http_request(None)) is None
    # Another scheme (an auth proxy's Basic) is not ours: the query parameter applies.
    for header in ("Basic dXNlcjpwYXNz", "Negotiate abc", "Bearer", "garbage"):
        assert request_token(http_request(header, "access_token=q.u.ery")) == "q.u.ery"
        assert request_token(http_request(header)) is None


def test_durations_and_minting() -> None:
    assert [duration(t) for t in ("90", "90s", "30m", "1h", "7d")] == [
        90,
        90,
        1800,
        3600,
        604800,
    ]
    for bad in ("", "h", "-1h", "0", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)
    args = argparse.Namespace(
        room="team.", prefix=True, ttl=60.0, role="viewer", name="Ann", color=None,
        username=None, secret=SECRET,
    )  # fmt: skip
    claims = jwt.decode(
        mint(args, NOW), SECRET, algorithms=["HS256"], options={"verify_exp": False}
    )
    assert claims == {"room_prefix": "team.", "exp": NOW + 60, "role": "viewer", "name": "Ann"}


def test_each_app_has_its_own_access_rules_object() -> None:
    # In hub mode the rules hold an HTTP client and a recheck task: two apps with equal
    # settings must not share them (nor keep them alive after their app is gone).
    from presence.server.app import create_app

    settings = Settings(auth="token", secret="s" * 32)
    one, two = create_app(settings), create_app(settings)
    assert one.state.access is not two.state.access
    assert one.state.access.mode == "token"
    gone = weakref.ref(one.state.access)
    del one
    gc.collect()
    assert gone() is None and two.state.access.mode == "token"


def test_room_tokens_of_a_secret_being_rotated_out_still_pass() -> None:
    old = "old-secret-being-rotated-out-of-32-bytes"
    claims = {"room": "r1", "exp": 4_000_000_000}
    signed_before = jwt.encode(claims, old, algorithm="HS256")
    with pytest.raises(AccessError, match="bad signature"):
        Access("token", SECRET, None).check_token(signed_before, "r1", "join")
    rotating = Access("token", SECRET, None, previous_secrets=(old,))
    assert rotating.check_token(signed_before, "r1", "join") is not None
    assert rotating.check_token(jwt.encode(claims, SECRET, algorithm="HS256"), "r1", "join")
    expired = jwt.encode({"room": "r1", "exp": 1}, old, algorithm="HS256")
    with pytest.raises(AccessError, match="expired"):
        rotating.check_token(expired, "r1", "join")
