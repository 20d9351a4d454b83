"""The data dir's format version: new dirs marked, older ones migrated step by step
(resuming after a crash), newer ones refused naming both versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.state import dataformat
from mesh.state.dataformat import CURRENT_FORMAT, FORMAT_NAME, FormatError, Migration


def version_file(data_dir: Path) -> str:
    return (data_dir / FORMAT_NAME).read_text()


def test_a_new_dir_gets_the_current_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "agent.lock").write_text("123\n")  # the lock is taken first
    outcome = dataformat.ensure(data)
    assert (outcome.found, outcome.version, outcome.migrated) == (None, CURRENT_FORMAT, ())
    assert version_file(data) == f"{CURRENT_FORMAT}\n"
    assert not (data / f".{FORMAT_NAME}.tmp").exists()


def test_an_unversioned_dir_is_version_0_and_migrates_to_1(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"SQLite format 3\0")
    (tmp_path / "agent.lock").write_text("1\n")
    assert dataformat.read(tmp_path) == 0
    steps: list[int] = []
    outcome = dataformat.ensure(tmp_path, on_step=lambda s: steps.append(s.source))
    assert outcome.found == 0 and outcome.version == 1 == CURRENT_FORMAT
    assert outcome.migrated == ("mark the unversioned layout as version 1",)
    assert steps == [0]
    assert version_file(tmp_path) == "1\n"
    assert (tmp_path / "state.db").read_bytes() == b"SQLite format 3\0"  # untouched
    # The next start finds it current: nothing runs.
    assert dataformat.ensure(tmp_path).migrated == ()


def test_a_newer_dir_is_refused_naming_both_versions_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"x")
    (tmp_path / FORMAT_NAME).write_text("7\n")
    with pytest.raises(FormatError) as caught:
        dataformat.ensure(tmp_path)
    message = str(caught.value)
    print(message)
    assert "format version 7 is newer than this agent's version 1" in message
    assert version_file(tmp_path) == "7\n"
    assert (tmp_path / "state.db").read_bytes() == b"x"


@pytest.mark.parametrize("text", ["", "one\n", "-1\n", "1.5"])
def test_an_unreadable_version_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / FORMAT_NAME).write_text(text)
    with pytest.raises(FormatError, match="format version"):
        dataformat.ensure(tmp_path)


def test_steps_run_in_order_and_a_crash_resumes_at_the_step_that_failed(tmp_path: Path) -> None:
    """A made-up version 3: 1 -> 2 renames a file, 2 -> 3 fails once (a crash)."""
    calls: list[int] = []
    crash = {"armed": True}

    def rename(data_dir: Path) -> None:
        calls.append(1)
        old, new = data_dir / "records.json", data_dir / "records-v2.json"
        if old.exists():  # safe to run again on a half-changed dir
            old.rename(new)

    def add_index(data_dir: Path) -> None:
        calls.append(2)
        if crash.pop("armed", False):
            raise OSError("power lost")
        (data_dir / "index").write_text("built\n")

    migrations = {
        0: dataformat.MIGRATIONS[0],
        1: Migration(1, "rename records", rename),
        2: Migration(2, "add the index", add_index),
    }
    (tmp_path / "records.json").write_text("[]")
    with pytest.raises(OSError, match="power lost"):
        dataformat.ensure(tmp_path, current=3, migrations=migrations)
    assert version_file(tmp_path) == "2\n"  # the steps before the crash are recorded
    outcome = dataformat.ensure(tmp_path, current=3, migrations=migrations)
    assert outcome.found == 2 and outcome.migrated == ("add the index",)
    assert calls == [1, 2, 2]  # 1 -> 2 did not run again
    assert version_file(tmp_path) == "3\n"
    assert (tmp_path / "records-v2.json").exists() and (tmp_path / "index").exists()


def test_a_missing_step_is_refused_before_anything_runs() -> None:
    with pytest.raises(FormatError, match="no migration from data dir format version 1"):
        dataformat.plan(0, 3, {0: dataformat.MIGRATIONS[0]})
    assert dataformat.plan(2, 2, {}) == []
