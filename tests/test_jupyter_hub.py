"""The JupyterHub post_auth_hook: hub users get presence colours and initials."""

from presence.core.colors import PALETTE
from presence.jupyter.hub import post_auth_hook


def test_hub_users_get_a_palette_colour_and_initials_the_same_at_every_login() -> None:
    first = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    again = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    assert first["user_info"] == again["user_info"]
    assert first["user_info"]["color"] in PALETTE
    assert first["user_info"]["initials"] == "A"


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


def test_colours_spread_over_the_palette() -> None:
    colours = {
        post_auth_hook(None, None, {"name": f"user{i}"})["user_info"]["color"] for i in range(200)
    }
    assert colours == set(PALETTE)
