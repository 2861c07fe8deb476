"""Reports and comparisons: files, self-contained HTML, the evaluate and compare commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.errors import UserError
from retrieval.evaluation.evaluate import evaluate
from retrieval.evaluation.report import (
    comparison_table,
    load_run,
    project_2d,
    worst_queries,
    write_comparison,
    write_report,
)
from tests.conftest import run_cli


def _data(seed=0, n=120, classes=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = (rng.normal(size=(classes, 8))[y] + rng.normal(size=(n, 8))).astype(np.float32)
    return x, y


def _image(i: int) -> torch.Tensor:
    return torch.full((3, 8, 8), (i * 37) % 256, dtype=torch.uint8)


def _assert_self_contained(page: str) -> None:
    sources = re.findall(r"""src=["']([^"']+)["']""", page)
    assert sources, "no picture in the page"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page


def test_write_report_files(tmp_path):
    x, y = _data()
    names = ["ant", "bee", "cat", "dog"]
    ev = evaluate(x, y, ks=(1, 4), class_names=names)
    out = write_report(
        tmp_path / "rep",
        ev,
        x,
        y,
        x,
        y,
        names,
        {"name": "toy"},
        query_image=_image,
        gallery_image=_image,
        examples=3,
        neighbours=4,
    )
    files = {p.name for p in out.iterdir()}
    assert files == {
        "metrics.json",
        "report.md",
        "report.html",
        "recall.png",
        "map.png",
        "examples.png",
        "worst.png",
    }
    for png in out.glob("*.png"):
        assert Image.open(png).size[0] > 100
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["format"] == "metric-retrieval/metrics" and doc["version"] == 1
    assert doc["metrics"]["map@r"] == pytest.approx(ev.metrics["map@r"])
    assert [row["class"] for row in doc["per_class"]] == names
    assert len(doc["worst_queries"]) == 3
    assert doc["worst_queries"][0]["map@r"] == min(ev.per_query["map@r"])
    page = (out / "report.html").read_text()
    _assert_self_contained(page)
    for heading in ("Recall@k", "Per class", "Embedding map", "Example queries", "Worst"):
        assert heading in page
    assert "![recall@k](recall.png)" in (out / "report.md").read_text()


def test_report_without_images_has_no_grids(tmp_path):
    x, y = _data(1)
    ev = evaluate(x, y, ks=(1,))
    out = write_report(tmp_path / "rep", ev, x, y, x, y, list("abcd"), {"name": "t"})
    assert not (out / "examples.png").exists()
    assert "Example queries" not in (out / "report.html").read_text()


def test_worst_queries_are_the_lowest_ap():
    x, y = _data(2)
    ev = evaluate(x, y, ks=(1,), clustering=False)
    rows = worst_queries(ev, 5)
    assert ev.per_query["map@r"][rows].max() <= np.sort(ev.per_query["map@r"])[4]


def test_project_2d_subsamples_and_checks_method():
    x, _ = _data(3, n=50)
    pts, pos = project_2d(x, "pca", max_points=20)
    assert pts.shape == (20, 2) and len(set(pos.tolist())) == 20
    with pytest.raises(UserError, match="unknown map"):
        project_2d(x, "umap")


@pytest.mark.slow
def test_project_2d_tsne_separates_classes():
    x, y = _data(3, n=120, classes=3)
    x[:, 0] += 20 * y  # far apart classes stay apart in t-SNE
    pts, pos = project_2d(x, "tsne", max_points=90)
    assert pts.shape == (90, 2) and np.isfinite(pts).all()
    centres = np.array([pts[y[pos] == c].mean(axis=0) for c in range(3)])
    spread = max(pts[y[pos] == c].std(axis=0).max() for c in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread


def test_load_run_and_compare(tmp_path):
    x, y = _data(4)
    ev = evaluate(x, y, ks=(1, 2))
    write_report(tmp_path / "a", ev, x, y, x, y, list("abcd"), {"name": "a"})
    flat = tmp_path / "b.json"  # the shape of `retrieval evaluate --json`
    flat.write_text(
        json.dumps({"model": "m", "recall@1": 0.5, "recall@2": 0.75, "map@r": 0.25, "queries": 10})
    )
    runs = [load_run(tmp_path / "a"), load_run(flat)]
    assert runs[0].curve and runs[1].curve is None and runs[1].ks == [1, 2]
    head, body = comparison_table(runs)
    assert head[:3] == ["run", "R@1", "R@2"] and body[1][:3] == ["b", "0.5000", "0.7500"]
    assert body[1][head.index("NMI")] == "-"  # a metric one run lacks
    out = write_comparison(tmp_path / "cmp", runs)
    _assert_self_contained((out / "compare.html").read_text())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_run(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"loss": 1}')
    with pytest.raises(UserError, match="no retrieval metrics"):
        load_run(tmp_path / "other.json")
    with pytest.raises(UserError, match="neither"):
        load_run(tmp_path / "missing")


# ------------------------------------------------------------------------- command line


def test_cli_evaluate_report_and_compare(digits_folder, tmp_path, capsys):
    rep = tmp_path / "pixels"
    code, out, err = run_cli(
        [
            "evaluate",
            digits_folder,
            "--pixels",
            "--ks",
            "1,5",
            "--report",
            rep,
            "--examples",
            "2",
            "--per-class",
        ],
        capsys,
    )
    assert code == 0, err
    assert "leave-one-out" in out and "MAP@R" in out and "per class" in out
    assert (rep / "report.html").is_file()
    code, out, err = run_cli(
        ["evaluate", digits_folder, "--pixels", "--metric", "l2", "--json", "--no-clustering"],
        capsys,
    )
    assert code == 0, err
    flat = json.loads(out)
    assert flat["protocol"] == "leave-one-out" and "nmi" not in flat and "recall@8" in flat
    (tmp_path / "l2.json").write_text(out)
    code, out, err = run_cli(
        ["compare", rep, tmp_path / "l2.json", "--out", tmp_path / "cmp"], capsys
    )
    assert code == 0, err
    assert "pixels" in out and "l2" in out and "MAP@R" in out
    assert (tmp_path / "cmp" / "compare.html").is_file()


def _manifest(digits_folder: Path, tmp_path: Path) -> Path:
    files = sorted(digits_folder.rglob("*.png"))[::3]
    lines = ["path,label,is_query,is_gallery"]
    for n, f in enumerate(files):
        lines.append(f"{f},{f.parent.name},{int(n % 2 == 0)},1")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_query_gallery_and_cross_domain(digits_folder, tmp_path, capsys):
    csv = _manifest(digits_folder, tmp_path)
    code, out, err = run_cli(["evaluate", csv, "--pixels", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    n = len(csv.read_text().splitlines()) - 1
    assert doc["protocol"] == "query-gallery" and doc["gallery"] == n
    assert doc["queries"] + doc["skipped_queries"] == (n + 1) // 2
    code, out, err = run_cli(
        ["evaluate", csv, "--pixels", "--json", "--protocol", "leave-one-out"], capsys
    )
    assert json.loads(out)["queries"] == n
    code, out, err = run_cli(
        [
            "evaluate",
            csv,
            "--pixels",
            "--gallery",
            digits_folder,
            "--json",
            "--report",
            tmp_path / "x",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["protocol"] == "cross-domain" and doc["gallery"] == 300 and doc["recall@1"] == 1.0
    assert (tmp_path / "x" / "examples.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pixels", "--protocol", "sideways"], "unknown protocol"),
        (["--pixels", "--protocol", "cross-domain"], "needs --gallery"),
        (["--pixels", "--protocol", "query-gallery"], "is_query"),
        (["--pixels", "--map", "umap"], "unknown --map"),
        (["--pixels", "--ks", "1,5000"], "recall@5000"),
        ([], "--model CHECKPOINT or --pixels"),
    ],
)
def test_cli_evaluate_errors(digits_folder, capsys, args, message, tmp_path):
    src = digits_folder
    if "query-gallery" in args:  # a CSV without the two columns
        src = tmp_path / "plain.csv"
        files = sorted(digits_folder.rglob("*.png"))[:20]
        src.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    code, _, err = run_cli(["evaluate", src, *args], capsys)
    assert code == 2 and message in err, err


def test_cli_compare_refuses_a_non_run(tmp_path, capsys):
    code, _, err = run_cli(["compare", tmp_path / "nothing"], capsys)
    assert code == 2 and "neither" in err
