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


def _dockerignore() -> list[str]:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("#")]


def admitted() -> set[str]:
    """What .dockerignore lets into the context: it excludes everything (`*`) and then
    admits names (`!name`), the one form this project uses."""
    lines = _dockerignore()
    assert lines[0] == "*", "keep .dockerignore an allow-list: `*` first, then `!name`"
    return {ln[1:] for ln in lines if ln.startswith("!")}


def left_out(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: what .dockerignore excludes inside admitted folders."""
    excluded = [ln for ln in _dockerignore()[1:] if not ln.startswith("!")]
    here = PurePosixPath(Path(directory).relative_to(ROOT).as_posix())
    return {n for n in names if any((here / n).match(pattern) for pattern in excluded)}


def sources_of(dockerfile: Path) -> set[str]:
    return {src.rstrip("/") for s in stages(dockerfile) for srcs, _ in s.copies for src in srcs}


def test_the_context_admits_exactly_what_the_dockerfiles_copy() -> None:
    copied = sources_of(ROOT / "Dockerfile")
    for name in copied:
        assert (ROOT / name).exists(), f"the Dockerfile copies {name}, which is not there"
    # The service's image and the hub's: the package alone, all of it; the single-user
    # image also builds the JupyterLab extension from its sources.
    hub, singleuser = Z2JH_IMAGES
    assert sources_of(hub) == copied
    assert sources_of(singleuser) == copied | {"labextension"}
    assert admitted() == copied | {"labextension"}


def lay_out(stage: Stage, root: Path) -> Path:
    """The stage's file system after its COPY lines, under ``root``; its WORKDIR."""
    workdir = root / stage.workdir.relative_to("/")
    workdir.mkdir(parents=True)
    for sources, dest in stage.copies:
        target = workdir / dest
        for src in sources:
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=left_out)
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


def test_the_single_user_image_builds_the_jupyterlab_extension_from_its_context(
    tmp_path: Path,
) -> None:
    """The single-user image's Node.js stage, run where its context is laid out: it
    builds the extension where the next stage copies it from."""
    dockerfile = ROOT / "deploy" / "z2jh" / "singleuser.Dockerfile"
    node, _ = (s for s in stages(dockerfile) if s.copies)
    workdir = lay_out(node, tmp_path / "stage")
    assert not (workdir / "labextension" / "node_modules").exists()  # not in the context
    for run in node.runs:
        done = subprocess.run(
            ["bash", "-c", run], cwd=workdir, capture_output=True, text=True, timeout=540
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    taken = re.search(r"COPY --from=labextension (\S+) ", dockerfile.read_text())
    assert taken, "the image's last stage takes the built extension"
    built = workdir / PurePosixPath(taken.group(1)).relative_to(node.workdir)
    assert (built / "package.json").is_file()
    assert list((built / "static").glob("remoteEntry.*.js"))
