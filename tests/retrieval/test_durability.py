"""What a careless user or a crash must never cost: files that are not ours, an index half
swapped, two writers through two names of one folder (all through the command line)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.index.gallery import GalleryIndex
from retrieval.index.lock import index_lock
from tests.conftest import REPO, build_index, run_cli


def _tree(folder):
    return sorted(
        (p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    )


@pytest.fixture()
def gallery(digits_folder, tmp_path):
    """A copy of two digit classes (a user's folder of images)."""
    out = tmp_path / "imgs"
    for name in ("digit0", "digit1"):
        shutil.copytree(digits_folder / name, out / name)
    return out


def test_index_build_never_deletes_what_is_at_out(trained_run, gallery, tmp_path, capsys):
    ckpt = trained_run / "best.pt"
    user = tmp_path / "d"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    plain = tmp_path / "notes.txt"
    plain.write_text("y")
    source_before = _tree(gallery)
    for out in (user, gallery, plain):
        code, _, err = run_cli(
            ["index", "build", gallery, "--model", ckpt, "--out", out, "--device", "cpu"], capsys
        )
        assert code == 2, err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert (user / "thesis.txt").read_text() == "x" and os.listdir(user) == ["thesis.txt"]
    assert plain.read_text() == "y"
    assert _tree(gallery) == source_before
    assert sorted(os.listdir(tmp_path)) == ["d", "imgs", "notes.txt"]  # nothing left beside


def test_an_index_is_replaced_only_with_overwrite(trained_run, gallery, tmp_path, capsys):
    ckpt, idx = trained_run / "best.pt", tmp_path / "idx"
    build_index(gallery, ckpt, idx)
    before = _tree(idx)
    one = tmp_path / "one"
    shutil.copytree(gallery / "digit0", one / "digit0")
    code, _, err = run_cli(
        ["index", "build", one, "--model", ckpt, "--out", idx, "--device", "cpu"], capsys
    )
    assert code == 2 and "--overwrite" in err
    assert _tree(idx) == before
    build_index(one, ckpt, idx, "--overwrite")
    assert len(GalleryIndex.load(idx)) == len(os.listdir(one / "digit0"))
    (tmp_path / "empty").mkdir()  # an empty folder is fine: nothing is lost
    build_index(gallery, ckpt, tmp_path / "empty")
    assert len(GalleryIndex.load(tmp_path / "empty")) == 2 * len(os.listdir(gallery / "digit0"))


def test_reports_never_replace_a_users_folder(trained_run, gallery, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("z")
    code, _, err = run_cli(
        [
            "evaluate",
            gallery,
            "--model",
            trained_run / "best.pt",
            "--report",
            user,
            "--device",
            "cpu",
            "--no-clustering",
        ],
        capsys,
    )
    assert code == 2 and "left untouched" in err
    assert os.listdir(user) == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize(
    "syscall,when", [("rename", 1), ("rename", 2), ("rename", 3), ("renameat2", 1)]
)
def test_compact_killed_in_its_swap_leaves_an_index(
    trained_run, gallery, tmp_path, capsys, syscall, when
):
    """kill -9 at the swap of `index compact` (strace fault injection): the index still loads,
    with every item, and the next writer cleans up."""
    idx = build_index(gallery, trained_run / "best.pt", tmp_path / "idx")
    code, _, err = run_cli(["index", "remove", idx, "0"], capsys)  # a journal to fold in
    assert code == 0, err
    env = os.environ | {"PYTHONPATH": str(REPO)}
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            f"trace={syscall}",
            "-e",
            f"inject={syscall}:signal=KILL:when={when}",
            sys.executable,
            "-m",
            "retrieval",
            "index",
            "compact",
            str(idx),
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    index = GalleryIndex.load(idx)
    assert len(index) == 2 * len(os.listdir(gallery / "digit0")) - 1 and 0 not in index.items
    code, _, err = run_cli(["index", "compact", idx], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", "idx", "imgs"]


def test_writers_through_a_link_or_dotdot_exclude_each_other(
    trained_run, gallery, tmp_path, capsys
):
    idx = build_index(gallery, trained_run / "best.pt", tmp_path / "idx")
    (tmp_path / "link").symlink_to(idx)
    (tmp_path / "a").mkdir()
    n = len(GalleryIndex.load(idx))
    with index_lock(idx):  # a running server holds it
        for alias in (tmp_path / "link", tmp_path / "a" / ".." / "idx"):
            code, _, err = run_cli(
                [
                    "index",
                    "add",
                    alias,
                    gallery / "digit0" / sorted(os.listdir(gallery / "digit0"))[0],
                    "--device",
                    "cpu",
                ],
                capsys,
            )
            assert code == 2 and "another process" in err, err
            code, _, err = run_cli(["index", "remove", alias, "1"], capsys)
            assert code == 2 and "another process" in err, err
    assert len(GalleryIndex.load(idx)) == n


def test_saving_through_a_link_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    GalleryIndex.build(np.eye(4, 8, dtype=np.float32), list("abcd"), np.zeros(4), ["x"]).save(real)
    (tmp_path / "link").symlink_to(real)
    index = GalleryIndex.load(tmp_path / "link")
    index.remove([0])
    index.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert len(GalleryIndex.load(real)) == 3


#: Runs of `index add` killed at a random moment by the kill -9 test.
KILL_TRIALS = 6


@pytest.mark.slow
def test_index_add_killed_at_random_moments_loses_no_acknowledged_add(
    trained_run, gallery, tmp_path
):
    """kill -9 of `retrieval index add` at random moments: every add it acknowledged (printed
    "added ...") survives, once; nothing else appears; the index loads and takes more."""
    idx = build_index(gallery, trained_run / "best.pt", tmp_path / "idx")
    before = len(GalleryIndex.load(idx))
    image = sorted((gallery / "digit0").iterdir())[0]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    rng = random.Random(0)

    def add(n: int, seconds: float | None) -> tuple[Path, bool]:
        new = tmp_path / f"new-{n}.png"
        shutil.copy(image, new)
        cmd = [sys.executable, "-m", "retrieval", "index", "add", idx, new, "--device", "cpu"]
        proc = subprocess.Popen(
            [str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL
            out, _ = proc.communicate()
        return new, proc.returncode == 0 and b"added 1 images" in out

    started = time.monotonic()
    new, ok = add(0, 300)
    duration = time.monotonic() - started
    assert ok
    acknowledged, tried = [new], [new]
    for n in range(1, KILL_TRIALS + 1):
        new, ok = add(n, rng.uniform(0.6, 1.05) * duration)  # mostly late: embedding, commit
        tried.append(new)
        if ok:
            acknowledged.append(new)
    index = GalleryIndex.load(idx)
    refs = index.refs
    for new in acknowledged:
        assert refs.count(str(new.resolve())) == 1, new
    added = refs[before:]
    assert set(added) <= {str(p.resolve()) for p in tried} and len(added) == len(set(added))
    assert len(index) == before + len(added)
    new, ok = add(99, 300)  # a torn last line, if any, does not stop the next writer
    assert ok and GalleryIndex.load(idx).refs.count(str(new.resolve())) == 1


def test_a_garbage_tail_is_repaired_on_request_only(trained_run, gallery, tmp_path, capsys):
    idx = build_index(gallery, trained_run / "best.pt", tmp_path / "idx")
    n = len(GalleryIndex.load(idx))
    for item in ("0", "1"):
        code, _, err = run_cli(["index", "remove", idx, item], capsys)
        assert code == 0, err
    with open(idx / "journal.jsonl", "ab") as fh:
        fh.write(os.urandom(5000).replace(b"\n", b"x") + b"\n" + os.urandom(300))
    code, _, err = run_cli(["index", "info", idx], capsys)
    assert code == 2 and "retrieval index repair" in err, err
    code, out, err = run_cli(["index", "repair", idx], capsys)
    text = " ".join(out.split())
    assert code == 0 and "kept 2 changes" in text and "dropped 5,301" in text, (out, err)
    index = GalleryIndex.load(idx)
    assert len(index) == n - 2 and 0 not in index.items and 1 not in index.items


def test_a_calibration_stays_with_its_index(trained_run, gallery, tmp_path, capsys):
    from retrieval.evaluation.calibration import Calibration

    idx = build_index(gallery, trained_run / "best.pt", tmp_path / "idx")
    code, _, err = run_cli(["calibrate", idx, gallery, "--device", "cpu"], capsys)
    assert code == 0, err
    before = Calibration.load(idx).cutpoint().distance
    for args in (["index", "remove", idx, "0"], ["index", "compact", idx]):
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    assert Calibration.load(idx).cutpoint().distance == before
