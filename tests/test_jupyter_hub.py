"""For hub admins: the JupyterHub post_auth_hook (hub users get presence colours and
initials) and the server extension being on once the package is installed."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from presence.core.colors import PALETTE
from presence.jupyter.hub import post_auth_hook

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_hub_users_get_a_palette_colour_and_initials_the_same_at_every_login() -> None:
    first = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    again = post_auth_hook(None, None, {"name": "ada", "user_info": None})
    assert first["user_info"] == again["user_info"]
    assert first["user_info"]["color"] in PALETTE
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
    assert colours == set(PALETTE)


@pytest.mark.e2e
def test_the_package_enables_its_jupyter_server_extension(tmp_path: Path) -> None:
    # What pip installs from the wheel: the extension is on wherever presence is installed,
    # the way Jupyter packages ship it (editable installs do not copy data files).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("presence-*.whl")
    with zipfile.ZipFile(wheel) as z:
        [config] = [n for n in z.namelist() if n.endswith("jupyter_server_config.d/presence.json")]
        assert json.loads(z.read(config)) == {
            "ServerApp": {"jpserver_extensions": {"presence.jupyter": True}}
        }
