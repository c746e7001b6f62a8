"""The layout the README describes, and the import rules of pyproject.toml
([tool.importlinter]): checked here so that a new import circle or an upward import fails
the suite, not only `lint-imports` run by hand."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the contracts of ``cwd``'s pyproject.toml, on the ``presence``
    package found there (its own process: the package is imported from ``cwd``)."""
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "", "COLUMNS": "400"},  # no wrapped lines
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_import_rules_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The pure model reaching up to the app.
        ("core/colors.py", "import presence.server.app", "imports only the layers below"),
        # A circle inside a package: the hub's outbox importing the hub.
        ("hub/outbox.py", "import presence.hub.hub", "No import circles"),
        # The frame codec, sans-I/O, taking an event loop.
        ("websocket/frames.py", "import asyncio", "sans-I/O"),
        # The JupyterLab side reaching into the service.
        ("jupyter/hub.py", "import presence.hub.hub", "JupyterLab side"),
    ],
)
def test_a_broken_rule_fails(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(ROOT / "presence", tmp_path / "presence", ignore=_built)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "presence" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = re.findall(r"^(.*?) BROKEN$", result.stdout, re.M)
    assert any(contract in name for name in broken), result.stdout


def _built(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", "labextension", "static")]


def test_the_readme_lists_every_package_with_its_job() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^  (\w+)/ ", layout, re.M))
    packages = {p.parent.name for p in (ROOT / "presence").glob("*/__init__.py")}
    assert packages <= listed, f"not in the README's layout: {sorted(packages - listed)}"
    assert "lint-imports" in layout  # and the rules are stated there
