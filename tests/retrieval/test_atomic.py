"""Atomic writes: the old file survives a failed write, and files get the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from retrieval.atomic import atomic_dir, atomic_path, write_json, write_text


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
        with atomic_dir(tmp_path / "d") as tmp:
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
