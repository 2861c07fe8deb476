"""Index folders of the digits, built once per session through the command line, per type."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import build_index


@pytest.fixture(scope="session")
def typed_index(tmp_path_factory, trained_run, digits_folder):
    """``typed_index("HNSW16")``: an index folder of the 300 digits of that FAISS type."""
    built: dict[str, Path] = {}

    def make(spec: str) -> Path:
        if spec not in built:
            out = tmp_path_factory.mktemp("typed") / "index"
            built[spec] = build_index(digits_folder, trained_run / "best.pt", out, "--index", spec)
        return built[spec]

    return make


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, trained_run, digits_folder) -> Path:
    """An index of the digits folder of the default type, built once through the command
    line; tests that change an index take :func:`index_dir`."""
    out = tmp_path_factory.mktemp("served") / "index"
    return build_index(digits_folder, trained_run / "best.pt", out)


@pytest.fixture
def index_dir(built_index, tmp_path) -> Path:
    """A private copy of :func:`built_index` per test (tests add and remove)."""
    return Path(shutil.copytree(built_index, tmp_path / "index"))
