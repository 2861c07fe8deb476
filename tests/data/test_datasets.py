"""Data sources: built-in lookup order, IDX reading, image folders, CSV manifests, bad files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import fashion_mnist
from data.datasets import load_csv, load_folder, open_source, parse_classes, read_ref
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
    with pytest.raises(DataError, match="path,label"):
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


def test_parse_classes():
    assert parse_classes("5-9") == [5, 6, 7, 8, 9]
    assert parse_classes("0, 2,4-5") == [0, 2, 4, 5]
    assert parse_classes("") is None
    for bad in ("a-b", "9-5", "-1"):
        with pytest.raises(DataError):
            parse_classes(bad)
