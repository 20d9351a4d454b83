"""The build of the router's hot modules: pure Python, or compiled by mypyc (MESH_MYPYC=1).

CI runs the tests twice, once on each build, and says which it expects with
MESH_BUILD=pure or MESH_BUILD=compiled: a compiled build that silently fell back
to Python (or stale extensions left in a pure run) fails here, not in a
benchmark. Without MESH_BUILD the test only prints which build it found.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from pathlib import Path

import pytest

from buildtools import mypyc_build

ROOT = Path(__file__).resolve().parents[2]


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _compiled(name: str) -> bool:
    origin = importlib.import_module(name).__file__ or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_expected_build_is_the_one_imported() -> None:
    found = {_module(path): _compiled(_module(path)) for path in mypyc_build.COMPILED}
    print("compiled:", sorted(m for m, c in found.items() if c) or "none")
    expected = os.environ.get("MESH_BUILD", "")
    if expected == "compiled":
        assert all(found.values()), f"not compiled: {[m for m, c in found.items() if not c]}"
    elif expected == "pure":
        assert not any(found.values()), f"compiled: {[m for m, c in found.items() if c]}"
    else:
        # half a set cannot happen: the modules share one library and are built together
        assert all(found.values()) or not any(found.values()), found


def test_the_compiled_modules_are_files_of_the_tree() -> None:
    for path in mypyc_build.COMPILED:
        assert (ROOT / path).is_file(), path


def test_the_build_is_pure_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mypyc_build.ENV, raising=False)
    assert mypyc_build.extensions(ROOT) == []
    monkeypatch.setenv(mypyc_build.ENV, "0")
    assert mypyc_build.extensions(ROOT) == []


def test_no_compiler_falls_back_to_pure_python(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(mypyc_build.ENV, "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    # as setuptools runs it (a pytest-xdist worker's own argv names no command)
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    assert mypyc_build.extensions(ROOT) == []
    assert "pure Python: no C compiler (/nonexistent/cc)" in capsys.readouterr().err


def test_the_backend_asks_for_mypy_only_for_the_compiled_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import setuptools.build_meta

    from buildtools import backend

    monkeypatch.setattr(setuptools.build_meta, "get_requires_for_build_wheel", lambda _=None: [])
    monkeypatch.delenv(mypyc_build.ENV, raising=False)
    assert backend.get_requires_for_build_wheel() == []
    monkeypatch.setenv(mypyc_build.ENV, "1")
    assert backend.get_requires_for_build_wheel() == ["mypy>=1.10"]


def test_no_compiled_module_is_older_than_its_source() -> None:
    """An extension shadows its .py: one edited since `make mypyc` would run the old code."""
    stale = []
    for path in mypyc_build.COMPILED:
        name = _module(path)
        if _compiled(name):
            built = Path(importlib.import_module(name).__file__ or "")
            if (ROOT / path).stat().st_mtime > built.stat().st_mtime:
                stale.append(path)
    assert not stale, f"edited since compiled (make mypyc, or make pure): {stale}"
