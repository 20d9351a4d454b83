"""Compiling the hot modules with mypyc, where that can be done (the build's side).

`MESH_MYPYC=1 pip install .` (or `-e .`, or `make mypyc`) compiles `COMPILED`
to C extensions that sit next to their `.py` files and are imported instead of
them; without the variable, without mypyc, without a C compiler or Python's
headers, or when the compiler fails, the build is the pure-Python one and says
why on stderr. Either way the `.py` files ship: a compiled module is the same
source, and `rm lb/http/*.so` (`make pure`) is the way back in a checkout.

The modules are typed (mypy --strict) and run once or more per HTTP request: the
exchange (llhttp's callbacks, routing, relaying), the heads, the decision, the
balancer, the counters, the descriptor budget and the task connections; and the DNS
server's UDP fast path, once per query answered from the reply cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

#: the hot modules, compiled together (one shared library, one small module each)
COMPILED = (
    "dns/fastpath.py",
    "lb/http/balance.py",
    "lb/http/budget.py",
    "lb/http/decision.py",
    "lb/http/exchange.py",
    "lb/http/heads.py",
    "lb/http/stats.py",
    "lb/http/upstream.py",
)

ENV = "MESH_MYPYC"
#: setup.py commands that read the metadata only: no extension is made (nor mypy run) for them
_NO_EXTENSIONS = frozenset({"egg_info", "dist_info", "sdist", "--version", "--name"})


def wanted() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "no", "false")


def why_not() -> str | None:
    """Why the compiled build cannot be made here (None: it can be tried)."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (pip install mypy)"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths().get("include", "")
    if not (Path(include) / "Python.h").exists():
        return f"no Python headers ({include}/Python.h)"
    return None


def say(message: str) -> None:
    print(f"meshplane build: {message}", file=sys.stderr)


def extensions(root: Path) -> list[Any]:
    """The mypyc extensions to build, or [] for the pure-Python build."""
    if not wanted() or set(sys.argv[1:]) <= _NO_EXTENSIONS:
        return []
    reason = why_not()
    if reason is not None:
        say(f"pure Python: {reason}")
        return []
    from mypyc.build import mypycify

    # Relative paths: mypyc names the modules after them (run from the project root).
    previous = Path.cwd()
    os.chdir(root)
    try:
        args = [*COMPILED, "--config-file", str(Path(__file__).with_name("mypyc.ini"))]
        built: list[Any] = mypycify(args, opt_level="3", debug_level="0")
    except BaseException as error:  # mypy's own errors exit; a failed build falls back
        say(f"pure Python: mypyc failed: {error!r}")
        return []
    finally:
        os.chdir(previous)
    say(f"compiling {len(COMPILED)} modules with mypyc")
    return built


def build_ext_class() -> type:
    """build_ext that falls back to pure Python when the compiler fails."""
    from setuptools.command.build_ext import build_ext

    class FallbackBuildExt(build_ext):  # type: ignore[misc]
        def run(self) -> None:
            try:
                super().run()
            except Exception as error:  # CompileError, LinkError, a missing header...
                say(f"pure Python: the C build failed: {error}")
                self._remove_built()
                return
            # Dated now even when the C was unchanged and not relinked: an extension older
            # than its .py is one built from other source (tests/unit/test_compiled_build.py).
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.utime(path)

        def _remove_built(self) -> None:
            # Half a compiled set would not import (the modules share one library).
            for ext in self.extensions:
                for path in (self.get_ext_fullpath(ext.name),):
                    if os.path.exists(path):
                        os.remove(path)
            self.extensions = []

        def get_outputs(self) -> list[str]:
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return FallbackBuildExt
