"""A small saved index, and copies of folders written by older versions, shared by the
tests of the index's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.index.gallery import GalleryIndex


@pytest.fixture()
def saved_index(tmp_path):
    """``(folder, index)``: 50 random 8-d vectors of classes a, b, saved, ids 0-49."""
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(50, 8)).astype(np.float32)
    index = GalleryIndex.build(
        xb, [f"/img/{i}.png" for i in range(50)], np.arange(50) % 2, ["a", "b"]
    )
    folder = tmp_path / "index"
    index.save(folder)
    return folder, index


#: Index folders written by older versions (format 2: ``metadata.json``), each with a journal.
LEGACY = Path(__file__).parent / "data"


@pytest.fixture()
def legacy_folder(tmp_path):
    """A function giving a fresh copy (under ``tmp_path``) of a folder of :data:`LEGACY`."""

    def copy(name: str) -> Path:
        dest = tmp_path / "legacy" / name
        shutil.copytree(LEGACY / name, dest)
        return dest

    return copy
