from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from retrieval.errors import UserError
from retrieval.evaluation.duplicates import (
    CSV_COLUMNS,
    duplicate_pairs,
    file_sizes,
    find_duplicates,
    group_pairs,
    keep_report,
    write_csv,
    write_json,
)


def distinct_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A smooth random colour pattern: low-frequency noise upsampled (no two alike)."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def vector(path) -> np.ndarray:
    """A tiny content vector: 16x16 grey thumbnail minus its mean (brightness-robust)."""
    with Image.open(path) as im:
        x = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR), np.float32)
    return (x - x.mean()).reshape(-1)


@pytest.fixture()
def gallery(tmp_path):
    """20 distinct PNGs; originals 0-5 get a resized JPEG copy, 0-2 also a brighter copy."""
    rng = np.random.default_rng(0)
    paths, truth = [], {}
    for n in range(20):
        img = distinct_image(rng)
        p = tmp_path / f"img{n:02d}.png"
        img.save(p)
        truth[n] = [len(paths)]
        paths.append(str(p))
        if n < 6:
            c = tmp_path / f"img{n:02d}_small.jpg"
            img.resize((64, 64), Image.Resampling.LANCZOS).save(c, quality=60)
            truth[n].append(len(paths))
            paths.append(str(c))
        if n < 3:
            c = tmp_path / f"img{n:02d}_bright.png"
            ImageEnhance.Brightness(img).enhance(1.15).save(c)
            truth[n].append(len(paths))
            paths.append(str(c))
    x = np.stack([vector(p) for p in paths])
    groups = sorted(tuple(m) for m in truth.values() if len(m) > 1)
    return paths, x, groups


def test_groups_equal_the_known_copies(gallery):
    paths, x, truth = gallery
    groups = find_duplicates(x, threshold=0.1, metric="cosine")
    assert sorted(g.members for g in groups) == truth
    assert [len(g.members) for g in groups] == sorted((len(t) for t in truth), reverse=True)
    assert all(g.max_distance <= 0.1 for g in groups)


def brute_pairs(x: np.ndarray, t: float, metric: str) -> set[tuple[int, int]]:
    x = x.astype(np.float64)
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1 - u @ u.T
    else:
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
    n = len(x)
    return {(i, j) for i in range(n) for j in range(i + 1, n) if d[i, j] <= t}


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_pairs_equal_brute_force_across_blocks(metric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 8)).astype(np.float32)
    x[100:] = x[:50] + 0.05 * rng.normal(size=(50, 8)).astype(np.float32)
    t = 0.02 if metric == "cosine" else 0.3
    pairs, d = duplicate_pairs(x, t, metric, block=32)  # several blocks
    found = {tuple(p) for p in pairs.tolist()}
    assert found == brute_pairs(x, t, metric)
    assert len(found) >= 40  # the planted copies are there
    assert np.all(pairs[:, 0] < pairs[:, 1]) and np.all(d <= t + 1e-6)


def test_threshold_is_inclusive():
    x = np.array([[0, 0], [3, 4], [6, 8.0001]], np.float32)  # 5 apart, then 5.00008
    assert duplicate_pairs(x, 5.0, "l2")[0].tolist() == [[0, 1]]
    u = np.array([[1, 0], [0, 1]], np.float32)  # cosine distance exactly 1
    assert duplicate_pairs(u, 1.0, "cosine")[0].tolist() == [[0, 1]]
    assert duplicate_pairs(u, 0.999, "cosine")[0].tolist() == []


def test_groups_are_connected_components():
    # a-b and b-c are within the threshold, a-c is not: one group through b (single linkage)
    x = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    groups = find_duplicates(x, 1.0, "l2")
    assert [g.members for g in groups] == [(0, 1, 2)]
    assert group_pairs(4, np.zeros((0, 2), np.int64)) == []


def test_too_large_threshold_is_a_user_error():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(UserError, match="smaller threshold"):
        duplicate_pairs(x, 2.0, "cosine", max_pairs=100)
    with pytest.raises(UserError, match=">= 0"):
        duplicate_pairs(x, -0.1, "cosine")


def test_keep_report_largest_and_first_deletes_nothing(gallery, tmp_path):
    paths, x, truth = gallery
    before = sorted(p.name for p in tmp_path.iterdir())
    groups = find_duplicates(x, 0.1, "cosine")
    sizes = file_sizes(paths)
    largest = keep_report(groups, paths, "largest", vectors=x)
    for g, rep in zip(groups, largest["groups"], strict=True):
        biggest = max(g.members, key=lambda m: sizes[m])
        assert rep["keep"]["ref"] == paths[biggest]
        assert {d["ref"] for d in rep["duplicates"]} == {paths[m] for m in g.members} - {
            paths[biggest]
        }
        assert all(0 <= d["distance_to_kept"] < 0.2 for d in rep["duplicates"])
    first = keep_report(groups, paths, "first")
    assert [r["keep"]["ref"] for r in first["groups"]] == [paths[g.members[0]] for g in groups]
    assert first["would_remove"] == sum(len(t) - 1 for t in truth)
    assert largest["bytes_freed"] == sum(
        d["size_bytes"] for r in largest["groups"] for d in r["duplicates"]
    )

    write_json(tmp_path / "out" / "duplicates.json", largest, threshold=0.1, metric="cosine")
    write_csv(tmp_path / "out" / "duplicates.csv", largest)
    doc = json.loads((tmp_path / "out" / "duplicates.json").read_text())
    assert doc["threshold"] == 0.1 and len(doc["groups"]) == len(truth)
    with open(tmp_path / "out" / "duplicates.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == sum(len(t) for t in truth)
    assert sum(r["keep"] == "yes" for r in rows) == len(truth)
    assert all(Path(p).exists() for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])


def test_keep_largest_with_unknown_sizes_falls_back_to_first():
    from retrieval.evaluation.duplicates import Group

    rep = keep_report([Group((1, 2), 0.0)], ["a", "fashion-mnist:test:1", "x"], "largest")
    assert rep["groups"][0]["keep"]["ref"] == "fashion-mnist:test:1"
    with pytest.raises(UserError, match="largest, first"):
        keep_report([], [], "smallest")
