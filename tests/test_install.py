"""The Jupyter extension is on however presence was installed: from the checkout in
editable mode (how the README installs it, and how this suite runs), and from a wheel
built from the checkout. Both lay down etc/jupyter/jupyter_server_config.d/presence.json,
so `jupyter server extension list` shows it and a server loads it with no setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

import presence
from tests.jupyter_helpers import start_jupyter

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
LOADED = "presence.jupyter: a collaboration socket's awareness states now leave with it"


def extension_list(python: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [python, "-m", "jupyter", "server", "extension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # not the checkout: its presence/ would be imported
        env={**os.environ, **(env or {})},
    )
    return done.stdout + done.stderr


def assert_enabled(listing: str) -> None:
    listing = re.sub(r"\x1b\[[0-9;]*m", "", listing)  # its colours
    lines = [ln for ln in listing.splitlines() if "presence.jupyter" in ln]
    assert any("enabled" in ln for ln in lines), listing
    assert any(ln.strip().endswith("OK") for ln in lines), listing


def loads_extension(tmp: Path, python: str, env: dict[str, str] | None = None) -> None:
    server = start_jupyter(tmp, python=python, env=env)
    try:
        assert LOADED in server.output(), server.output()[-3000:]
    finally:
        server.stop()


def test_an_editable_install_enables_the_extension(tmp_path: Path) -> None:
    assert Path(presence.__file__).resolve().is_relative_to(ROOT)  # this checkout, editable
    config = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "presence.json"
    assert config.is_file()
    assert_enabled(extension_list(sys.executable))
    loads_extension(tmp_path, sys.executable)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel built from this checkout; the rest of what it needs
    (jupyter_server, jupyter-collaboration, ...) comes from this suite's environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("presence-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # Dependencies from here, after the venv's own site-packages (the wheel's presence
    # comes first; this environment's editable presence is not on a plain path).
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield venv


def test_a_wheel_enables_the_extension(wheel_venv: Path, tmp_path: Path) -> None:
    python = str(wheel_venv / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import presence; print(presence.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert Path(where.strip()).resolve().is_relative_to(wheel_venv.resolve()), where
    config = wheel_venv / "etc" / "jupyter" / "jupyter_server_config.d" / "presence.json"
    assert config.is_file()
    # Only the wheel's config enables presence.jupyter; the suite's environment adds
    # jupyter-collaboration's (its own config files are in this prefix, not the venv's).
    env = {"JUPYTER_CONFIG_PATH": str(Path(sys.prefix) / "etc" / "jupyter")}
    assert_enabled(extension_list(python))
    loads_extension(tmp_path, python, env)
