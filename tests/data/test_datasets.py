"""Data sources: built-in lookup order, IDX reading, image folders, CSV manifests, bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import fashion_mnist
from data.datasets import (
    LABEL_MODES,
    UNLABELLED,
    expand_image_paths,
    list_image_files,
    load_csv,
    load_files,
    load_folder,
    open_source,
    parse_classes,
    read_ref,
)
from data.errors import DataError, DatasetNotFoundError
from tests.conftest import PER_CLASS, write_idx


def test_idx_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "bad")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX"):
        fashion_mnist.read_idx(tmp_path / "text")


def test_lookup_order(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(fashion_mnist, "_download", lambda target: False)
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.find_fashion_mnist()
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(fake_fmnist))
    assert fashion_mnist.find_fashion_mnist() == fake_fmnist
    # an explicit root wins, and a wrong explicit root is an error, not a silent fallback
    with pytest.raises(DatasetNotFoundError, match="does not hold"):
        fashion_mnist.find_fashion_mnist(tmp_path)
    monkeypatch.delenv(fashion_mnist.ENV_VAR)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", fake_fmnist)
    assert fashion_mnist.find_fashion_mnist() == fake_fmnist


def test_builtin_source(fake_fmnist):
    train = open_source("fashion-mnist", root=fake_fmnist)
    test = open_source("fashion-mnist:test", root=fake_fmnist)
    assert len(train) + len(test) == 1797  # all of scikit-learn's digits
    img, label = test[3]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8
    assert label == test.labels[3]
    assert test.refs[3] == "fashion-mnist:test:3"
    assert np.array_equal(read_ref(test.refs[3], fake_fmnist).numpy(), test.image(3).numpy())
    unseen = test.filter_classes([5, 6, 7, 8, 9])
    assert set(unseen.labels.tolist()) == {5, 6, 7, 8, 9}
    assert unseen.class_names == fashion_mnist.CLASS_NAMES
    with pytest.raises(DataError, match="splits"):
        open_source("fashion-mnist:valid", root=fake_fmnist)


def test_folder_source(digits_folder):
    ds = open_source(str(digits_folder))
    assert len(ds) == 10 * PER_CLASS
    assert ds.class_names == [f"digit{i}" for i in range(10)]
    assert np.bincount(ds.labels).tolist() == [PER_CLASS] * 10
    img, _ = ds[0]
    assert img.shape == (3, 16, 16)
    sub = ds.subset([5, 0])
    assert sub.refs == [ds.refs[5], ds.refs[0]]


def test_corrupt_images_are_skipped_with_one_warning(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "broken.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "fake.jpg").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        ds = load_folder(tmp_path)
    assert len(ds) == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken.png" in warnings[0].getMessage() and "fake.jpg" in warnings[0].getMessage()


def test_csv_manifest(tmp_path, digits_folder):
    ds = load_folder(digits_folder)
    lines = ["path,label,split"]
    for i, (ref, y) in enumerate(zip(ds.refs, ds.labels, strict=True)):
        rel = ref.replace(str(digits_folder) + "/", "images/")
        lines.append(f"{rel},{ds.class_names[y]},{'train' if i % 3 else 'test'}")
    (tmp_path / "images").symlink_to(digits_folder)
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    full = load_csv(tmp_path / "m.csv")
    test = load_csv(tmp_path / "m.csv", split="test")
    assert len(full) == len(ds) and len(test) == len(range(0, len(ds), 3))
    assert full.class_names == ds.class_names
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(DataError, match=r"columns path\[,label\]"):
        load_csv(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="split == 'valid'"):
        load_csv(tmp_path / "m.csv", split="valid")


def test_open_source_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither a folder nor a .csv"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(str(tmp_path / "empty"))


def _png(path, value: int = 0, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 0)).save(path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_nested_folder_without_labels(tmp_path):
    """Photos as people keep them: nested folders, no class structure, formats mixed, hidden
    files of other programs beside them."""
    top = tmp_path / "photos"
    _png(top / "a.png", 1)
    _png(top / "2021" / "summer" / "beach" / "b.png", 2)
    Image.new("RGB", (9, 7)).save(top / "2021" / "c.jpg")
    (top / "2022").mkdir()
    Image.new("L", (5, 5)).save(top / "2022" / "d.webp")
    (top / "2022" / "notes.txt").write_text("not an image")
    (top / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    _png(top / ".thumbnails" / "t.png")
    ds = open_source(str(top), labels="none")
    names = sorted(Path(r).name for r in ds.refs)
    assert names == ["a.png", "b.png", "c.jpg", "d.webp"]
    assert ds.class_names == [UNLABELLED] and ds.labels.tolist() == [0, 0, 0, 0]
    # the same folder with labels from folders: first-level folder, the top's name for loose
    ds = load_folder(top)
    by_name = {Path(r).name: ds.class_names[y] for r, y in zip(ds.refs, ds.labels, strict=True)}
    assert by_name == {"a.png": "photos", "b.png": "2021", "c.jpg": "2021", "d.webp": "2022"}


def test_loose_images_beside_class_folders_are_kept_and_named(tmp_path, caplog):
    """30 images in top/shoes/ and 30 directly in top/: all 60 are read; the loose ones form
    the class 'top', and one warning says so."""
    top = tmp_path / "top"
    for i in range(30):
        _png(top / "shoes" / f"s{i:02d}.png", i)
        _png(top / f"loose{i:02d}.png", 100 + i)
    with caplog.at_level(logging.WARNING):
        ds = open_source(str(top))
    assert len(ds) == 60
    assert ds.class_names == ["shoes", "top"]
    assert np.bincount(ds.labels).tolist() == [30, 30]
    (message,) = _warnings(caplog)
    assert "30 image(s) lie directly in" in message and "loose00.png" in message
    assert "'top'" in message


def test_flat_folder_is_one_class(tmp_path, caplog):
    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", i)
    with caplog.at_level(logging.WARNING):
        ds = load_folder(tmp_path / "flat")
    assert ds.class_names == ["flat"] and len(ds) == 3
    assert _warnings(caplog) == []


def test_list_image_files_order_and_links(tmp_path):
    top = tmp_path / "top"
    for rel in ("z.png", "b/2.png", "b/10.png", "a/x/1.png", "a/0.png"):
        _png(top / rel)
    (top / "a" / "x" / "back").symlink_to(top)  # a loop
    _png(tmp_path / "elsewhere" / "e.png")
    (top / "c").symlink_to(tmp_path / "elsewhere")
    rel = [str(p.relative_to(top)) for p in list_image_files(top)]
    assert rel == ["z.png", "a/0.png", "a/x/1.png", "b/10.png", "b/2.png", "c/e.png"]
    with pytest.raises(DataError, match="no such folder"):
        list_image_files(tmp_path / "missing")


def test_load_files_skips_unreadable_queries_with_one_warning(tmp_path, caplog, fake_fmnist):
    """A folder of queries with bad files in it: every good one is read, the bad ones are
    listed in one warning; the order is that given."""
    queries = tmp_path / "queries"
    _png(queries / "q1.png", 10)
    _png(queries / "deep" / "q2.png", 20)
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.new("L", (400_000, 1)).save(queries / "line.png")
    single = tmp_path / "single.png"
    _png(single, 30)
    with caplog.at_level(logging.WARNING):
        ds = load_files([str(single), str(queries), str(tmp_path / "gone.png")], draft_size=8)
    assert [Path(r).name for r in ds.refs] == ["single.png", "q1.png", "q2.png"]
    assert ds.class_names == [UNLABELLED]
    assert int(ds.image(1)[0, 0, 0]) == 10
    (message,) = _warnings(caplog)
    assert "skipping 3 unreadable" in message
    for name in ("broken.jpg", "line.png", "gone.png"):
        assert name in message
    with pytest.raises(DataError, match="none of the 1 images"):
        load_files([str(tmp_path / "gone.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        expand_image_paths([str(tmp_path / "empty")])


def test_unreadable_files_listed_once_with_a_count(tmp_path, caplog):
    for i in range(25):
        (tmp_path / "d" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "c" / f"bad{i:02d}.png").write_text("x")
    _png(tmp_path / "d" / "c" / "good.png")
    with caplog.at_level(logging.WARNING):
        ds = load_folder(tmp_path / "d")
    assert len(ds) == 1
    (message,) = _warnings(caplog)
    assert "skipping 25 unreadable" in message and "... and 5 more" in message


def test_labels_optional_for_csv_and_builtin(tmp_path, fake_fmnist):
    for i in range(2):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "paths.csv").write_text("path\n0.png\n1.png\n")
    ds = load_csv(tmp_path / "paths.csv")
    assert ds.class_names == [UNLABELLED] and len(ds) == 2
    (tmp_path / "labelled.csv").write_text("path,label\n0.png,a\n1.png,b\n")
    assert load_csv(tmp_path / "labelled.csv").class_names == ["a", "b"]
    assert load_csv(tmp_path / "labelled.csv", labels="none").class_names == [UNLABELLED]
    test = open_source("fashion-mnist:test", root=fake_fmnist, labels="none")
    assert test.class_names == [UNLABELLED] and set(test.labels.tolist()) == {0}
    with pytest.raises(DataError, match="from-folders, none"):
        open_source(str(tmp_path), labels="classes")
    assert LABEL_MODES == ("from-folders", "none")


def test_parse_classes():
    assert parse_classes("5-9") == [5, 6, 7, 8, 9]
    assert parse_classes("0, 2,4-5") == [0, 2, 4, 5]
    assert parse_classes("") is None
    for bad in ("a-b", "9-5", "-1"):
        with pytest.raises(DataError):
            parse_classes(bad)
