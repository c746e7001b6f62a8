"""A real Jupyter server with jupyter-collaboration, started on a free port, and
what its collaboration rooms need: notebooks, sessions, JupyterLab-like states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.processes import ARTIFACTS, free_port, wait_until_up

TOKEN = "jupyter-test-token"


@dataclass
class Jupyter:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _api(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.request(
            method,
            f"{self.http}{path}",
            json=body,
            headers={"Authorization": f"token {TOKEN}"},
            timeout=10,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def new_notebook(self) -> tuple[str, str]:
        """A new notebook's collaboration room id and its WebSocket URL."""
        path = f"{uuid.uuid4().hex[:8]}.ipynb"
        self._api("PUT", f"/api/contents/{path}", {"type": "notebook", "content": NOTEBOOK})
        return self.session(path)

    def session(self, path: str) -> tuple[str, str]:
        """The collaboration room id of a notebook, and its WebSocket URL."""
        session = self._api(
            "PUT", f"/api/collaboration/session/{path}", {"format": "json", "type": "notebook"}
        )
        room = f"json:notebook:{session['fileId']}"
        url = (
            f"ws://127.0.0.1:{self.port}/api/collaboration/room/{room}"
            f"?sessionId={session['sessionId']}&token={TOKEN}"
        )
        return room, url

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def start_jupyter(
    root: Path,
    *args: str,
    app: str = "jupyter_server",
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Jupyter:
    """``jupyter server`` (or another app: ``jupyterlab``) of ``python`` in ``root``, with
    none of the user's Jupyter configuration (``env`` adds variables)."""
    for sub in ("work", "config", "data", "runtime"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"{app}-{port}.log"
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env.update(extra)
    env.update(
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
    )
    proc = subprocess.Popen(
        [
            python,
            "-m",
            app,
            "--allow-root",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root / 'work'}",
            *args,
        ],
        env=env,
        cwd=root,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    jupyter = Jupyter(port, proc, log)
    if wait_until_up(proc, f"{jupyter.http}/api/status?token={TOKEN}", app, log, 60, 0.1):
        return jupyter
    jupyter.stop()
    raise RuntimeError(f"{app} did not start within 60 s; see {log}")


def lab_state(name: str, *, selection: bool = False) -> dict[str, Any]:
    cursor = {"anchor": {"type": None}, "head": {"type": None}, "primary": True}
    return {
        "user": {
            "username": f"u-{name.lower()}",
            "name": name,
            "display_name": name,
            "initials": name[:2].upper(),
            "color": "#0072B2",
            "avatar_url": None,
        },
        "cursors": [{**cursor, "empty": not selection}],
    }
