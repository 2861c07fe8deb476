"""Shared fixtures: small image sets made from scikit-learn's bundled 8x8 digits.

- ``digits_folder``: an image folder (one sub-folder per digit), 16 px PNGs;
- ``fake_fmnist``: a stand-in for Fashion-MNIST in IDX format (digits upscaled to 28 px), so the
  built-in code path runs fast without the real 30 MB set;
- ``trained_run``: a run folder trained for one epoch through the command line.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from retrieval.cli import main

#: The repository's root (for subprocesses).
REPO = Path(__file__).resolve().parents[1]
#: Images per digit class in the test folders.
PER_CLASS = 30


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the ``retrieval`` command in-process: ``(exit_code, stdout, stderr)``."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


class NoCapture:
    """Stands in for capsys where a fixture cannot have it and needs no output."""

    @staticmethod
    def readouterr() -> tuple[str, str]:
        return "", ""


def run_torchrun(
    args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m retrieval ARGS`` in a clean environment
    (one thread per process, none of the variables of an enclosing torchrun)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "retrieval",
        *[str(a) for a in args],
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_index(folder: Path, checkpoint: Path, out: Path, *extra: str) -> Path:
    """Build an index folder through the command line; fail the test when it does not."""
    code, _, err = run_cli(
        ["index", "build", folder, "--model", checkpoint, "--out", out, "--device", "cpu", *extra],
        NoCapture(),
    )
    if code != 0:
        pytest.fail(f"retrieval index build failed ({code}): {err}")
    return out


def _digit_images(size: int, per_class: int | None = PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    rows, labels = [], []
    for c in range(10):
        pos = np.flatnonzero(d.target == c)[:per_class]
        for i in pos:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8))
            rows.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
            labels.append(c)
    return np.stack(rows), np.array(labels, dtype=np.int64)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "images"
    images, labels = _digit_images(16)
    for n, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"digit{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{n:04d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    """IDX files shaped like Fashion-MNIST: all 1,797 digits at 28x28, train and test halves."""
    root = tmp_path_factory.mktemp("fake-fmnist")
    images, labels = _digit_images(28, per_class=None)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    images, labels = images[order], labels[order]
    half = len(labels) // 2
    write_idx(root / "train-images-idx3-ubyte.gz", images[:half])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:half])
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[half:])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[half:])
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_folder) -> Path:
    """A run folder trained for one epoch on the digits folder through the CLI."""
    run = tmp_path_factory.mktemp("run") / "run"
    args = [
        "train",
        "--data",
        digits_folder,
        "--classes",
        "",
        "--epochs",
        "1",
        "--batch-size",
        "40",
        "--m-per-class",
        "4",
        "--image-size",
        "16",
        "--device",
        "cpu",
        "--out",
        run,
    ]
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"training failed with exit code {exc.code}"
    return run
