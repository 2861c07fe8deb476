"""Atomic writes: the old file survives a failed write, and files get the usual permissions."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from retrieval.atomic import (
    FolderBusyError,
    atomic_dir,
    atomic_path,
    ensure_present,
    folder_lock,
    recover_dir,
    write_json,
    write_text,
)
from retrieval.errors import UserError
from tests.conftest import REPO


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("crash in the middle of a write")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d", owned=lambda p: True) as tmp:
            (tmp / "x").write_text("new")
            raise RuntimeError("crash")
    assert (tmp_path / "d" / "x").read_text() == "old"
    assert os.listdir(tmp_path) == ["d"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


# ------------------------------------------------------------------ never replace what is not ours


def _ours(folder):
    return (folder / "ours.marker").is_file()


def test_a_folder_that_is_not_ours_is_refused_and_left_untouched(tmp_path):
    user = tmp_path / "d"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    with pytest.raises(UserError, match="left untouched"):
        with atomic_dir(user, owned=_ours) as tmp:
            (tmp / "ours.marker").write_text("")
    assert (user / "thesis.txt").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folder left either


def test_a_file_is_refused_and_left_untouched(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        with atomic_dir(target, owned=_ours) as tmp:
            (tmp / "ours.marker").write_text("")
    assert target.read_text() == "keep me"


def test_an_empty_folder_or_one_of_ours_is_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", owned=_ours) as tmp:
        (tmp / "ours.marker").write_text("1")
    with atomic_dir(tmp_path / "empty", owned=_ours) as tmp:
        (tmp / "ours.marker").write_text("2")
    assert (tmp_path / "empty" / "ours.marker").read_text() == "2"
    assert os.listdir(tmp_path) == ["empty"]


def test_a_link_is_followed_not_replaced(tmp_path):
    with atomic_dir(tmp_path / "real") as tmp:
        (tmp / "x").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_dir(tmp_path / "link", owned=lambda p: True) as tmp:
        (tmp / "x").write_text("new")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "x").read_text() == "new"


# ------------------------------------------------------------------ a crash in the middle of a swap

_CRASH = """
import os, signal, sys
from pathlib import Path
import retrieval.atomic as atomic

target, n_rename, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if not exchange:
    atomic._exchange = lambda a, b: False
calls = {"rename": 0}
real_rename = os.rename

def rename(a, b):
    calls["rename"] += 1
    if calls["rename"] == n_rename:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 before this rename happens
    real_rename(a, b)

os.rename = rename
with atomic.atomic_dir(target, owned=lambda p: True) as tmp:
    (tmp / "x").write_text("new")
    (tmp / "y").write_text("new")
"""


@pytest.mark.parametrize("exchange", [False, True])
@pytest.mark.parametrize("n_rename", [1, 2, 3, 4])
def test_a_swap_killed_at_any_rename_leaves_the_old_or_the_new_folder(tmp_path, exchange, n_rename):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("old")
        (tmp / "y").write_text("old")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(target), str(n_rename), str(int(exchange))],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    ensure_present(target)  # what a reader does first
    contents = {(target / "x").read_text(), (target / "y").read_text()}
    assert contents in ({"old"}, {"new"})  # never one of each, never missing
    with folder_lock(target):
        recover_dir(target, clean=True)  # what a writer does first: leftovers go
    assert set(os.listdir(tmp_path)) - {".d.lock"} == {"d"}


def test_the_lock_is_the_folders_whatever_its_name(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "idx")
    (tmp_path / "a").mkdir()
    with folder_lock(tmp_path / "idx"):
        for alias in (tmp_path / "link", tmp_path / "a" / ".." / "idx"):
            with pytest.raises(FolderBusyError):
                with folder_lock(alias):
                    pass
    with folder_lock(tmp_path / "link"):  # free again
        pass
