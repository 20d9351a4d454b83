"""The C extensions of the compiled build (everything else is in pyproject.toml).

Pure Python unless MESH_MYPYC=1 and a compiler is present: buildtools/mypyc_build.py.
"""

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from buildtools.mypyc_build import build_ext_class, extensions  # noqa: E402

setup(ext_modules=extensions(ROOT), cmdclass={"build_ext": build_ext_class()})
