"""A training process killed with SIGKILL mid-epoch resumes to the same end as one never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrieval.model.checkpoint import load_checkpoint

EPOCHS = 4


def _command(digits_folder: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "retrieval",
        "train",
        "--data",
        str(digits_folder),
        "--classes",
        "",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "40",
        "--m-per-class",
        "4",
        "--image-size",
        "16",
        "--val-fraction",
        "0.2",
        "--schedule",
        "cosine",
        "--warmup-epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_resume_finishes_the_same_run(digits_folder, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(digits_folder, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists():  # the first epoch's checkpoint
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # now in epoch 2
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    state = load_checkpoint(killed / "last.pt")  # readable: written atomically
    assert 1 <= state["epoch"] < EPOCHS
    _run([sys.executable, "-m", "retrieval", "train", "--resume", str(killed)])

    whole = tmp_path / "whole"
    _run(_command(digits_folder, whole))
    a = load_checkpoint(killed / "last.pt")
    b = load_checkpoint(whole / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key in b["model"]:  # the same weights as the run that was never interrupted
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(0, EPOCHS + 1))  # 0: the untrained network
    for name in ("best.pt", "last.pt"):
        load_checkpoint(killed / name)
