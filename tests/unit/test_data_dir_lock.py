"""The data-dir lock on its own: one holder at a time, named when refused, never stale."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from mesh.state.lock import LOCK_NAME, DataDirError, DataDirInUse, lock_data_dir


def test_one_holder_at_a_time_and_the_refusal_names_it(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"  # made, as the agent makes it
    held = lock_data_dir(data)
    assert (data / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    # flock is per open file: a second open in this same process is refused too.
    with pytest.raises(DataDirInUse) as refused:
        lock_data_dir(data)
    assert str(refused.value) == (
        f"data dir {data} is in use by PID {os.getpid()} (lock {data / LOCK_NAME})"
    )
    held.release()
    lock_data_dir(data).release()


def test_a_stale_file_does_not_block(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("999999\n")  # left by an agent killed with -9
    held = lock_data_dir(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    held.release()


def test_a_holder_that_has_not_written_its_pid_yet_is_found_in_proc_locks(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirInUse) as refused:
            lock_data_dir(tmp_path)
        assert refused.value.holder == os.getpid()
    finally:
        os.close(fd)


def test_the_descriptor_is_not_inherited(tmp_path: Path) -> None:
    held = lock_data_dir(tmp_path)
    fd = held._fd
    assert fd is not None
    assert not os.get_inheritable(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    held.release()


def test_an_unusable_data_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataDirError, match=f"cannot use data dir {blocker / 'data'}"):
        lock_data_dir(blocker / "data")
