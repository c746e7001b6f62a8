"""A real JupyterHub for the tests: DummyAuthenticator, SimpleLocalProcessSpawner and
configurable-http-proxy (npm, tests/js), with presence as a managed hub service
(``--auth jupyterhub``), all on free ports in a temporary directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil

from harness.processes import ARTIFACTS, die_with_parent, free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "tests" / "js" / "node_modules" / ".bin" / "configurable-http-proxy"
PASSWORD = "hub-test-password"
SECRET = "hub-test-secret-that-is-long-enough-for-presence"

# The hub's configuration for presence is the one docs/jupyter.md shows, loaded as is;
# what follows it only fits the hub to a test (ports, a dummy login, a local spawner).
DEPLOYED = ROOT / "deploy" / "jupyterhub" / "jupyterhub_config.py"
CONFIG = """
c = get_config()  # noqa
settings = {settings}
load_subconfig(settings["deployed"])  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % settings["proxy_api_port"]
c.ConfigurableHTTPProxy.command = [settings["proxy"]]
c.JupyterHub.db_url = "sqlite:///" + settings["dir"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = settings["dir"] + "/cookie_secret"
c.JupyterHub.pid_file = settings["dir"] + "/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = settings["password"]
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = settings["dir"] + "/home/{{username}}"
c.Spawner.cmd = settings["singleuser"]
c.Spawner.args = ["--allow-root"]
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
# Tests stop the hub with its servers: no 10 s wait for each to answer SIGINT.
c.LocalProcessSpawner.interrupt_timeout = 1
c.LocalProcessSpawner.term_timeout = 2
c.JupyterHub.log_level = "INFO"
presence = c.JupyterHub.services[0]
presence["command"] = settings["presence_command"] + presence["command"][2:]
# The test's own client: creates users, groups, tokens and shares.
c.JupyterHub.services.append({{"name": "admin", "api_token": settings["admin_token"]}})
c.JupyterHub.load_roles.append(
    {{
        "name": "test-admin",
        "services": ["admin"],
        "scopes": ["admin:users", "admin:groups", "admin:servers", "shares", "tokens"],
    }}
)
"""


class JupyterHub:
    """``jupyterhub`` in a temporary directory; ``presence_args`` go to ``presence serve``.
    ``anonymous`` is the hub's switch (deploy/jupyterhub/jupyterhub_config.py); single-user
    servers run ``python -m jupyterhub.singleuser`` of ``python`` (default: this one);
    ``config`` is appended to the hub's configuration (a hub that differs from the one
    deployed)."""

    def __init__(
        self,
        *presence_args: str,
        anonymous: bool = False,
        python: str = sys.executable,
        config: str = "",
    ) -> None:
        self.anonymous = anonymous
        self.config = config
        self.python = python
        self.dir = Path(tempfile.mkdtemp(prefix="presence-hub-"))
        self.port, self.presence_port = free_port(), free_port()
        self.admin_token = os.urandom(16).hex()
        self.presence_args = list(presence_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = ARTIFACTS / f"jupyterhub-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def presence(self) -> str:
        """presence's address, as browsers reach it: through the hub's proxy."""
        return f"{self.url}/services/presence"

    def start(self, timeout: float = 60) -> JupyterHub:
        if not PROXY.exists():
            raise RuntimeError(
                f"{PROXY} is missing: run scripts/install-test-deps.sh (npm ci in tests/js)"
            )
        settings = {
            "port": self.port,
            "hub_port": free_port(),
            "proxy_api_port": free_port(),
            "proxy": str(PROXY),
            "dir": str(self.dir),
            "password": PASSWORD,
            "admin_token": self.admin_token,
            "presence_port": self.presence_port,
            "deployed": str(DEPLOYED),
            # presence serve --auth jupyterhub ... as deployed, from this Python
            "presence_command": [sys.executable, "-m", "presence", "serve", *self.presence_args],
            "singleuser": [self.python, "-m", "jupyterhub.singleuser"],
        }
        (self.dir / "jupyterhub_config.py").write_text(
            CONFIG.format(settings=json.dumps(settings)) + self.config
        )
        ARTIFACTS.mkdir(exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115
        bindir, path = str(Path(sys.executable).parent), os.environ.get("PATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.dir / "jupyterhub_config.py")],
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            # The proxy, and jupyterhub-singleuser beside this Python (the spawner's).
            env={
                **os.environ,
                "PATH": os.pathsep.join([str(PROXY.parent), bindir, path]),
                "PRESENCE_SECRET": SECRET,
                "PRESENCE_SERVICE_URL": f"http://127.0.0.1:{self.presence_port}",
                "PRESENCE_ANONYMOUS": "true" if self.anonymous else "false",
            },
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        # Through the proxy: the hub, the proxy's route and presence are all up.
        if wait_until_up(
            self.proc, self.presence + "/readyz", "jupyterhub", log.name, timeout, 0.2
        ):
            return self
        self.stop()
        raise RuntimeError(f"jupyterhub with presence not ready within {timeout}s; see {log.name}")

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """The hub's REST API, as the test's admin service."""
        response = httpx.request(
            method,
            f"{self.url}/hub/api{path}",
            headers={"Authorization": f"token {self.admin_token}"},
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )
        response.raise_for_status()
        return response

    def user_token(self, user: str) -> str:
        """A hub API token of ``user`` (with the user's scopes)."""
        token: str = self.api("POST", f"/users/{user}/tokens", json={"note": "test"}).json()[
            "token"
        ]
        return token

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (the hub stops its services and proxy), then whatever is left is killed."""
        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
