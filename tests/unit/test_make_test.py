"""`make test` runs the suites in two groups (Makefile): every suite must be in one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _suites(makefile: str, name: str) -> list[str]:
    found = re.search(rf"^{name} := (.*)$", makefile, re.MULTILINE)
    assert found is not None, f"{name} is not in the Makefile"
    return found.group(1).split()


def test_every_suite_with_tests_runs_in_one_group_of_make_test() -> None:
    makefile = (ROOT / "Makefile").read_text()
    parallel, serial = _suites(makefile, "PARALLEL_SUITES"), _suites(makefile, "SERIAL_SUITES")
    assert not set(parallel) & set(serial), "a suite in both groups runs twice"
    with_tests = {
        f"tests/{path.relative_to(ROOT / 'tests').parts[0]}"
        for path in (ROOT / "tests").rglob("test_*.py")
        if len(path.relative_to(ROOT / "tests").parts) > 1
    }
    assert not list((ROOT / "tests").glob("test_*.py")), "a test file outside every suite"
    assert with_tests == set(parallel) | set(serial), (
        f"never run by make test: {sorted(with_tests - set(parallel) - set(serial))}; "
        f"no such suite: {sorted(set(parallel) | set(serial) - with_tests)}"
    )
