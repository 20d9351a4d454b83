"""The build backend: setuptools', asking for mypy too when the compiled build is wanted.

`MESH_MYPYC=1 pip install .` builds in an isolated environment: mypyc must be
one of the build's requirements there, and only then (the pure build needs
nothing but setuptools).
"""

from __future__ import annotations

from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the backend's hooks, unchanged)

from buildtools.mypyc_build import wanted

_MYPYC = ["mypy>=1.10"]


def _extra() -> list[str]:
    return list(_MYPYC) if wanted() else []


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return list(_setuptools.get_requires_for_build_wheel(config_settings)) + _extra()


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return list(_setuptools.get_requires_for_build_editable(config_settings)) + _extra()
