"""presence installs as its users get it: from the checkout in editable mode (how the
README installs it, and how this suite runs), and from the wheel that `python -m build`
makes from the sdist (what the package index serves). Both serve, and both lay down
etc/jupyter/jupyter_server_config.d/presence.json, so `jupyter server extension list`
shows the extension and a server loads it with no setting, and the JupyterLab extension
("Share with collaborators…"), so `jupyter labextension list` shows it. A wheel built
from a clean checkout builds that extension itself (hatch_build.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import presence
from harness.processes import free_port
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


LABEXTENSION = "@presence-awareness/jupyterlab"
INSTALLED = f"share/jupyter/labextensions/{LABEXTENSION}"


def labextension_list(python: str) -> str:
    done = subprocess.run(
        # `jupyter labextension list` (a wheel's venv has no jupyter-labextension script)
        [python, "-m", "jupyterlab.labextensions", "list"],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


def assert_lab_enabled(listing: str) -> None:
    lines = [ln.split() for ln in listing.splitlines() if LABEXTENSION in ln]
    assert [ln[2:4] for ln in lines] == [["enabled", "OK"]], listing
    assert "(python, presence-awareness)" in listing, listing


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
    assert_lab_enabled(labextension_list(sys.executable))
    loads_extension(tmp_path, sys.executable)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`: the sdist, then the wheel built from that sdist (not from the
    checkout), so a file the sdist leaves out fails here."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def test_the_sdist_and_wheel_carry_the_distribution_name_and_version(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert sdist.name == f"presence_awareness-{presence.__version__}.tar.gz"
    assert wheel.name == f"presence_awareness-{presence.__version__}-py3-none-any.whl"
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(sdist.name.removesuffix(".tar.gz")) for n in tar.getnames()}
    assert {Path("CHANGELOG.md"), Path("jupyter-config/presence.json")} <= names
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(f"presence_awareness-{presence.__version__}.dist-info/METADATA")
        files = whl.namelist()
        (config,) = [
            f for f in files if f.endswith("etc/jupyter/jupyter_server_config.d/presence.json")
        ]
        enabled = json.loads(whl.read(config))
    assert b"\nName: presence-awareness\n" in metadata
    assert enabled == {"ServerApp": {"jpserver_extensions": {"presence.jupyter": True}}}
    assert not any(f.startswith(("tests/", "harness/", "load/")) for f in files)
    # The JupyterLab extension, built, where JupyterLab looks; its sources stay in the sdist.
    data = f"presence_awareness-{presence.__version__}.data/data/{INSTALLED}"
    assert {f"{data}/package.json", f"{data}/install.json"} <= set(files)
    assert any(re.fullmatch(rf"{data}/static/remoteEntry\.\w+\.js", f) for f in files)
    assert not any(f.startswith(("presence/jupyter/labextension", "labextension/")) for f in files)
    assert {Path("labextension/src/index.ts"), Path("labextension/package-lock.json")} <= names
    assert Path("presence/jupyter/labextension/package.json") in names
    assert not any(n.parts[:2] == ("labextension", "node_modules") for n in names)


@pytest.fixture(scope="module")
def wheel_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel built from the sdist; the rest of what it needs
    (starlette, jupyter_server, jupyter-collaboration, ...) comes from this suite's
    environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    (wheel,) = dist.glob("*.whl")
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
    assert_lab_enabled(labextension_list(python))
    loads_extension(tmp_path, python, env)


def test_a_wheel_built_from_a_clean_checkout_builds_the_jupyterlab_extension(
    tmp_path: Path,
) -> None:
    """No built extension in a fresh clone: the wheel's build runs npm (the toolchain
    is this checkout's, so that npm ci is not run again here)."""
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)],
        check=True, timeout=120,
    )  # fmt: skip
    assert not (clone / "presence" / "jupyter" / "labextension").exists()
    (clone / "labextension" / "node_modules").symlink_to(ROOT / "labextension" / "node_modules")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
         str(tmp_path / "dist"), str(clone)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "building the JupyterLab extension" in done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
    assert any(f.endswith(f"{INSTALLED}/package.json") for f in files), files


def test_the_wheel_serves_and_says_its_version(wheel_venv: Path, tmp_path: Path) -> None:
    presence_command = str(wheel_venv / "bin" / "presence")
    version = subprocess.run(
        [presence_command, "--version"], check=True, capture_output=True, text=True
    ).stdout
    assert version.strip() == f"presence {presence.__version__}"
    port = free_port()
    server = subprocess.Popen(
        [presence_command, "serve", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr
                time.sleep(0.1)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert f'presence_build_info{{version="{presence.__version__}"' in metrics
    finally:
        server.terminate()
        server.wait(timeout=30)
