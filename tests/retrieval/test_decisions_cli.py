"""Match or no match, and near-duplicates, through the command line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from retrieval.index.gallery import GalleryIndex
from tests.conftest import build_index, run_cli


@pytest.fixture()
def seen_index(trained_run, digits_folder, tmp_path):
    """An index of digits 0-4 (the gallery) and a folder of all digits (labelled queries)."""
    gallery = tmp_path / "seen"
    for c in range(5):
        shutil.copytree(digits_folder / f"digit{c}", gallery / f"digit{c}")
    return build_index(gallery, trained_run / "best.pt", tmp_path / "idx")


def test_calibrate_then_match_or_no_match(seen_index, digits_folder, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "calibrate",
            seen_index,
            digits_folder,
            "--target-precision",
            "0.9",
            "--plot",
            tmp_path / "cal.png",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    cal = json.loads((seen_index / "calibration.json").read_text())
    assert cal["queries"] == 300 and cal["open_set_queries"] == 150
    assert (tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"
    assert len(GalleryIndex.load(seen_index)) == 150  # the index is untouched and loads
    inside = sorted((digits_folder / "digit2").iterdir())[0]  # in the gallery
    outside = sorted((digits_folder / "digit7").iterdir())[0]  # a class the gallery lacks
    code, out, err = run_cli(
        [
            "search",
            seen_index,
            inside,
            outside,
            "--k",
            "3",
            "--match",
            "--cutpoint",
            "0.0001",
            "--json",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    decisions = [q["decision"] for q in json.loads(out)["queries"]]
    assert decisions == ["digit2", "no match"]
    code, out, err = run_cli(
        ["search", seen_index, inside, "--match", "--device", "cpu"], capsys
    )  # the calibrated best-F1 cut-point
    assert code == 0 and "->" in out, err


def test_match_needs_a_calibration_or_a_distance(seen_index, digits_folder, capsys):
    query = sorted((digits_folder / "digit2").iterdir())[0]
    code, _, err = run_cli(["search", seen_index, query, "--match"], capsys)
    assert code == 2 and "retrieval calibrate" in err


def test_duplicates_of_an_index_and_of_a_folder(trained_run, digits_folder, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(digits_folder / "digit3", folder / "digit3")
    original = sorted((folder / "digit3").iterdir())[0]
    Image.open(original).save(folder / "digit3" / "copy-of-first.png")  # re-encoded copy
    before = sorted(os.listdir(folder / "digit3"))
    idx = build_index(folder, trained_run / "best.pt", tmp_path / "idx")
    for target, extra in ((idx, []), (folder, ["--model", trained_run / "best.pt"])):
        out = tmp_path / f"dups-{target.name}"
        code, text, err = run_cli(
            ["duplicates", target, "--threshold", "1e-5", "--out", out, "--device", "cpu", *extra],
            capsys,
        )
        assert code == 0, err
        report = json.loads((out / "duplicates.json").read_text())
        groups = [
            sorted([g["keep"]["ref"]] + [d["ref"] for d in g["duplicates"]])
            for g in report["groups"]
        ]
        assert groups == [sorted([str(original), str(folder / "digit3" / "copy-of-first.png")])]
        assert (out / "duplicates.csv").is_file() and "Nothing was deleted" in text
    assert sorted(os.listdir(folder / "digit3")) == before  # nothing deleted
    code, _, err = run_cli(["duplicates", folder, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--threshold" in err


def test_evaluate_reports_decisions_at_a_cutpoint(trained_run, digits_folder, capsys):
    code, out, err = run_cli(
        [
            "evaluate",
            digits_folder,
            "--model",
            trained_run / "best.pt",
            "--cutpoint",
            "0.5",
            "--json",
            "--no-clustering",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    decision = json.loads(out)["decision"]
    assert decision["threshold"] == 0.5 and decision["queries"] == 300
    assert 0 <= decision["precision"] <= 1 and 0 <= decision["recall"] <= 1


def test_the_server_answers_match_or_no_match_once_calibrated(seen_index, digits_folder, tmp_path):
    import numpy as np
    from fastapi.testclient import TestClient

    from retrieval.evaluation.calibration import calibrate
    from retrieval.serving.server import create_app
    from retrieval.serving.service import SearchService

    service = SearchService(seen_index, device="cpu")
    client = TestClient(create_app(service, tmp_path / "uploads"))
    outside = sorted((digits_folder / "digit7").iterdir())[0]
    inside = sorted((digits_folder / "digit2").iterdir())[0]

    def ask(path):
        with open(path, "rb") as fh:
            return client.post("/search", files={"file": (path.name, fh, "image/png")}).json()

    assert "decision" not in ask(inside)  # not calibrated: rankings only
    # a calibration whose best-F1 cut-point lies between an exact match and everything else
    cal = calibrate(np.array([0.0, 0.0, 0.5, 0.6]), np.array([True, True, False, False]), "cosine")
    cal.save(seen_index)
    assert ask(inside)["decision"] == "digit2"
    body = ask(outside)
    assert body["decision"] == "no match" and body["results"]  # the ranking is still there
