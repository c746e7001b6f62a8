"""For hub admins: the JupyterHub post_auth_hooks (hub users get presence colours and
initials, or anonymous faces) and the server extension being on once the package is
installed."""

from pathlib import Path

import pytest

from presence.core.colors import JUPYTER_PALETTE
from presence.core.identity import HUB_NAMES, hub_face, initials_of
from presence.jupyter.hub import ANONYMOUS_MARK, make_post_auth_hook, post_auth_hook

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_hub_users_get_a_palette_colour_and_initials_the_same_at_every_login() -> None:
    first = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    again = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    assert first["user_info"] == again["user_info"]
    assert first["user_info"]["color"] in JUPYTER_PALETTE
    assert first["user_info"]["initials"] == "A"


@pytest.mark.unit
def test_what_the_authenticator_set_is_kept() -> None:
    model = {
        "name": "grace",
        "user_info": {"display_name": "Grace Hopper", "color": "#123456", "email": "g@x"},
    }
    info = post_auth_hook(None, None, model)["user_info"]
    assert info == {
        "display_name": "Grace Hopper",
        "color": "#123456",
        "email": "g@x",
        "initials": "GH",
    }


@pytest.mark.unit
def test_colours_spread_over_the_palette() -> None:
    colours = {
        post_auth_hook(None, None, {"name": f"user{i}"})["user_info"]["color"] for i in range(200)
    }
    assert colours == set(JUPYTER_PALETTE)


@pytest.mark.unit
def test_the_hook_under_hub_names_is_post_auth_hook() -> None:
    assert make_post_auth_hook(anonymous=False) is post_auth_hook
    assert make_post_auth_hook(anonymous=False, secret="s") is post_auth_hook


SECRET = "hub-secret"
ANONYMOUS_FIELDS = ("name", "display_name", "initials", "color")


@pytest.mark.unit
def test_anonymous_hook_gives_every_user_their_face_at_every_login() -> None:
    hook = make_post_auth_hook(anonymous=True, secret=SECRET)
    first = hook(None, None, {"name": "ada", "user_info": None})
    again = hook(None, None, {"name": "ada", "user_info": None})
    assert first == again
    info = first["user_info"]
    face = hub_face(SECRET, "ada")  # what the presence service shows for ada
    assert info == {
        "name": face.name,
        "display_name": face.name,
        "initials": face.initials,
        "color": face.color,
        ANONYMOUS_MARK: True,
    }
    assert info["name"] in HUB_NAMES and info["color"] in JUPYTER_PALETTE
    assert info["initials"] == initials_of(info["name"])
    assert first["name"] == "ada"  # the hub's own user name stays the hub's


@pytest.mark.unit
def test_anonymous_hook_replaces_what_names_the_user() -> None:
    hook = make_post_auth_hook(anonymous=True, secret=SECRET)
    model = {
        "name": "grace",
        "user_info": {
            "name": "grace",
            "display_name": "Grace Hopper",
            "initials": "GH",
            "color": "#123456",
            "avatar_url": "https://example.org/grace.png",
            "email": "g@x",
        },
    }
    info = hook(None, None, model)["user_info"]
    assert "avatar_url" not in info  # JupyterLab would draw the person's picture
    shown = " ".join(str(info[k]) for k in ANONYMOUS_FIELDS).lower()
    assert "grace" not in shown and "hopper" not in shown and info["initials"] != "GH"
    assert info["email"] == "g@x"  # not copied into /api/me; the authenticator's to keep


@pytest.mark.unit
def test_faces_depend_on_the_secret_and_spread() -> None:
    hook = make_post_auth_hook(anonymous=True, secret=SECRET)
    other = make_post_auth_hook(anonymous=True, secret="another-secret")
    infos = [hook(None, None, {"name": f"user{i}"})["user_info"] for i in range(300)]
    assert {i["color"] for i in infos} == set(JUPYTER_PALETTE)
    assert len({i["name"] for i in infos}) > 200
    assert any(
        other(None, None, {"name": f"user{i}"})["user_info"]["name"] != infos[i]["name"]
        for i in range(5)
    )


@pytest.mark.unit
def test_anonymous_hook_needs_the_secret() -> None:
    for secret in (None, ""):
        with pytest.raises(ValueError, match="PRESENCE_SECRET"):
            make_post_auth_hook(anonymous=True, secret=secret)
