"""The manifest: edited or damaged manifests are refused with one line, never silently used."""

from __future__ import annotations

import hashlib
import json

import pytest

from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex
from retrieval.index.manifest import read_manifest


def _edit(path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _refused(folder, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        GalleryIndex.load(folder)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(checksums="zzz"), "checksums must map"),
        (lambda m: m.pop("checksums"), "no checksum for index.faiss"),
        (lambda m: m["checksums"].pop("metadata.sqlite"), "no checksum for metadata.sqlite"),
        (lambda m: m.update(dim="8"), "dim must be a whole number"),
        (lambda m: m.update(metric="dot"), "metric 'dot'"),
    ],
)
def test_a_damaged_manifest_is_refused(saved_index, change, match):
    folder, _ = saved_index
    _edit(folder / "manifest.json", change)
    _refused(folder, match)
    with pytest.raises(UserError, match="rebuild the index"):
        read_manifest(folder)


def test_the_manifest_is_cross_checked_against_the_faiss_file(saved_index):
    folder, _ = saved_index
    path = folder / "manifest.json"
    original = path.read_text()
    _edit(path, lambda m: m.update(metric="l2"))  # cosine similarities shown as distances
    _refused(folder, "metric l2")
    path.write_text(original)
    _edit(path, lambda m: m.update(dim=4))
    _refused(folder, "dimension 4")
    path.write_text(original)
    _edit(path, lambda m: m.update(count=49))
    _refused(folder, "49 items")
    path.write_text(original)
    assert len(GalleryIndex.load(folder)) == 50


def test_a_label_out_of_range_is_refused_on_load(legacy_folder):
    folder = legacy_folder("format2-flat-cosine")
    meta_path = folder / "metadata.json"
    _edit(meta_path, lambda m: m["items"][7].update(label=5))
    digest = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    _edit(folder / "manifest.json", lambda m: m["checksums"].update({"metadata.json": digest}))
    _refused(folder, "item 7 has label 5")
