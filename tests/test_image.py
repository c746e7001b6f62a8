"""The Docker image's build, without a Docker daemon: the build context is laid out from
the Dockerfile's COPY lines (and .dockerignore), exactly as `docker build` would send
it, and the build stage's install runs there. A file the package needs that the
Dockerfile does not copy fails here, not in a user's `docker compose up --build`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

import presence
from harness.processes import free_port
from tests.test_deployment import healthcheck

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, dest)
    runs: list[str] = field(default_factory=list)


# Built from the repository's root too, with the same .dockerignore.
Z2JH_IMAGES = [
    ROOT / "deploy" / "z2jh" / "hub.Dockerfile",
    ROOT / "deploy" / "z2jh" / "singleuser.Dockerfile",
]


def stages(dockerfile: Path = ROOT / "Dockerfile") -> list[Stage]:
    """A Dockerfile's stages: WORKDIR, COPY from the context (not --from) and RUN."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found: list[Stage] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            found.append(Stage())
        elif word == "WORKDIR":
            found[-1].workdir = found[-1].workdir / rest.strip()
        elif word == "COPY" and not rest.startswith("--from"):
            *sources, dest = shlex.split(rest)
            found[-1].copies.append((sources, dest))
        elif word == "RUN":
            found[-1].runs.append(rest.strip())
    return found


def admitted() -> set[str]:
    """What .dockerignore lets into the context: it excludes everything (`*`) and then
    admits names (`!name`), the one form this project uses."""
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("#")]
    assert lines[0] == "*", "keep .dockerignore an allow-list: `*` first, then `!name`"
    return {ln[1:] for ln in lines if ln.startswith("!")}


def test_the_context_admits_exactly_what_the_dockerfile_copies() -> None:
    copied = {src.rstrip("/") for stage in stages() for srcs, _ in stage.copies for src in srcs}
    assert copied == admitted()
    for name in copied:
        assert (ROOT / name).exists(), f"the Dockerfile copies {name}, which is not there"
    for dockerfile in Z2JH_IMAGES:
        sources = {
            src.rstrip("/") for s in stages(dockerfile) for srcs, _ in s.copies for src in srcs
        }
        assert sources == copied, dockerfile  # the package alone, all of it


def lay_out(stage: Stage, root: Path) -> Path:
    """The stage's file system after its COPY lines, under ``root``; its WORKDIR."""
    workdir = root / stage.workdir.relative_to("/")
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for sources, dest in stage.copies:
        target = workdir / dest
        for src in sources:
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=ignore)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target / Path(src).name)
    return workdir


def test_the_build_stage_installs_from_that_context_and_the_result_serves(
    tmp_path: Path,
) -> None:
    build = next(s for s in stages() if s.copies)
    workdir = lay_out(build, tmp_path / "stage")
    (install,) = build.runs
    # The image's venv path becomes one under tmp_path; the command is otherwise the
    # Dockerfile's own, build isolation and dependencies from the package index included.
    venv = re.search(r"python -m venv (\S+)", install)
    assert venv, install
    here = tmp_path / "opt-presence"
    command = install.replace(venv.group(1), str(here))
    done = subprocess.run(
        ["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=540,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    version = subprocess.run(
        [here / "bin" / "presence", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.strip() == f"presence {presence.__version__}"
    config = here / "etc" / "jupyter" / "jupyter_server_config.d" / "presence.json"
    assert config.is_file()

    # The image's CMD with its environment, and its HEALTHCHECK, as the container runs them.
    port = free_port()
    env = {"PATH": f"{here / 'bin'}:{os.environ['PATH']}", "PRESENCE_PORT": str(port)}
    server = subprocess.Popen(
        ["presence", "serve"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        check = [str(here / "bin" / "python"), *healthcheck()[1:]]
        for _ in range(300):
            if subprocess.run(check, env=env, capture_output=True).returncode == 0:
                break
            assert server.poll() is None, "the server exited"
        else:
            pytest.fail("the healthcheck never passed")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_image_runs_what_the_build_stage_installed() -> None:
    build, final = stages()
    venv = re.search(r"python -m venv (\S+)", build.runs[0])
    assert venv
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"COPY --from=build {venv.group(1)} {venv.group(1)}" in dockerfile
    assert f"PATH={venv.group(1)}/bin:$PATH" in dockerfile
    assert not final.copies, "the image takes nothing else from the context"
