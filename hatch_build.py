"""The JupyterLab extension (labextension/) goes into the wheel, built.

- sdist and wheel: built with npm when missing or older than its sources (Node.js >= 20;
  `npm ci` first if labextension/node_modules is missing). The sdist carries the built
  extension, so a wheel built from it needs no Node.js.
- editable (`pip install -e .`): never builds, so the service installs without Node.js;
  the extension is installed (copied) if it was built before (`npm ci --prefix
  labextension && npm run build --prefix labextension`, as scripts/install-test-deps.sh
  does): after a rebuild, install again.
- PRESENCE_SKIP_LABEXTENSION=1: a wheel without it (the service's image, which serves no
  JupyterLab).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = "labextension"
BUILT = "presence/jupyter/labextension"
INSTALLED = "share/jupyter/labextensions/@presence-awareness/jupyterlab"
SKIP = "PRESENCE_SKIP_LABEXTENSION"


def _newest(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


class LabextensionHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        built = root / BUILT / "package.json"
        editable = self.target_name == "wheel" and version == "editable"
        if os.environ.get(SKIP, "").lower() in ("1", "true", "yes"):
            self.app.display_warning(f"{SKIP} is set: the JupyterLab extension is left out")
            return
        if not editable:
            self._build_if_needed(root, built)
        if self.target_name == "wheel" and built.exists():
            build_data["shared_data"][BUILT] = INSTALLED
            build_data["shared_data"][f"{SOURCE}/install.json"] = f"{INSTALLED}/install.json"

    def _build_if_needed(self, root: Path, built: Path) -> None:
        source = root / SOURCE
        if built.exists() and (root / "PKG-INFO").exists():
            return  # an unpacked sdist: it carries the build (its file times may lie)
        if not (source / "package.json").exists():
            if built.exists():
                return  # an sdist without the sources would still have it built
            raise RuntimeError(f"neither {SOURCE}/ nor {BUILT}/ is here: an incomplete sdist?")
        inputs = [
            *source.glob("src/*.ts"),
            *source.glob("style/*"),
            source / "package.json",
            source / "package-lock.json",
            source / "tsconfig.json",
        ]
        if built.exists() and built.stat().st_mtime >= _newest(inputs):
            return
        npm = shutil.which("npm")
        if npm is None:
            if built.exists():
                self.app.display_warning(
                    "the JupyterLab extension is older than its sources, and npm is not "
                    "installed to rebuild it: the wheel carries the old build"
                )
                return
            raise RuntimeError(
                "Building presence's wheel builds its JupyterLab extension, which needs "
                f"Node.js >= 20 with npm (not found). Install them, or set {SKIP}=1 for a "
                "wheel without it; `pip install -e .` needs neither."
            )
        if not (source / "node_modules").exists():
            self.app.display_info("npm ci (the JupyterLab extension's toolchain)…")
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=source, check=True)
        self.app.display_info("building the JupyterLab extension…")
        subprocess.run([npm, "run", "build"], cwd=source, check=True)
