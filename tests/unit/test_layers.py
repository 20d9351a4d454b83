"""The import-linter contracts of pyproject.toml hold, cover every module, and can fail.

`lint-imports` itself runs in `make lint`; here each contract is broken on
purpose, in a copy of the packages, to show that it would catch the import it
forbids (a contract that cannot fail proves nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mesh", "gossip", "dns", "lb")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_every_module_of_mesh_has_a_layer() -> None:
    layered = {
        name.strip()
        for layer in contracts()["layers"]["layers"]  # type: ignore[attr-defined]
        for name in layer.replace("|", ":").split(":")
    }
    modules = {f"mesh.{p.stem}" for p in (REPO / "mesh").glob("*.py") if p.stem != "__init__"}
    modules |= {f"mesh.{p.name}" for p in (REPO / "mesh").iterdir() if (p / "__init__.py").exists()}
    assert modules - layered == set(), "add these modules to a layer in pyproject.toml"


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )


def test_the_contracts_hold_on_the_tree(copy: Path) -> None:
    result = lint(copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the ground imports nothing above it
        ("mesh/core/model.py", "import dns.table", "The agent on top"),
        # gossip, dns and lb do not import each other
        ("dns/table.py", "import lb.table", "The agent on top"),
        # nor anything of the agent
        ("lb/view.py", "import mesh.state.store", "The agent on top"),
        ("gossip/membership.py", "import mesh.api.app", "The agent on top"),
        # sans-IO cores import no asyncio or socket, directly or through another module
        ("gossip/membership.py", "import asyncio", "Sans-IO cores"),
        ("mesh/state/store.py", "import mesh.core.workers", "Sans-IO cores"),
    ],
)
def test_each_contract_catches_a_forbidden_import(
    copy: Path, module: str, line: str, broken: str
) -> None:
    path = copy / module
    original = path.read_text()
    path.write_text(f"{original}\n{line}  # noqa\n")
    try:
        result = lint(copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, "the contract did not catch: " + line
    broken_section = result.stdout.partition("Broken contracts")[2]
    assert broken_section.lstrip("- \n").startswith(broken), result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} ->" in broken_section, result.stdout
