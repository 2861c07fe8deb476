"""The gallery index: exact search against brute force, persistence, refusal of mismatches."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index import GalleryIndex, knn


def _gallery(n=200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    xb = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, 5, size=n)
    refs = [f"/img/{i}.png" for i in range(n)]
    return xb, labels, refs


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_matches_brute_force(metric):
    xb, labels, refs = _gallery()
    xq = np.random.default_rng(1).normal(size=(20, 16)).astype(np.float32)
    index = GalleryIndex.build(xb, refs, labels, list("abcde"), metric=metric)
    d, i = index.search(xq, 5)
    if metric == "cosine":
        sim = (xq / np.linalg.norm(xq, axis=1, keepdims=True)) @ (
            xb / np.linalg.norm(xb, axis=1, keepdims=True)
        ).T
        want_i = np.argsort(-sim, axis=1)[:, :5]
        want_d = np.take_along_axis(sim, want_i, 1)
    else:
        dist = np.sqrt(((xq[:, None] - xb[None]) ** 2).sum(-1))
        want_i = np.argsort(dist, axis=1)[:, :5]
        want_d = np.take_along_axis(dist, want_i, 1)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-4)
    d2, i2 = knn(xq, xb, 5, metric)
    np.testing.assert_array_equal(i2, want_i)
    hits = index.hits(d[0], i[0])
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0].ref == refs[want_i[0, 0]]
    assert hits[0].label == "abcde"[labels[want_i[0, 0]]]


def test_save_load_roundtrip_and_checks(tmp_path):
    xb, labels, refs = _gallery()
    index = GalleryIndex.build(xb, refs, labels, list("abcde"), model_sha256="aa" * 32,
                               model_path="/m.pt")
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", model_sha256="aa" * 32, dim=16)
    assert loaded.refs == refs and loaded.labels.tolist() == labels.tolist()
    d1, i1 = index.search(xb[:3], 4)
    d2, i2 = loaded.search(xb[:3], 4)
    np.testing.assert_array_equal(i1, i2)
    assert i1[:, 0].tolist() == [0, 1, 2]  # a gallery vector finds itself first

    with pytest.raises(UserError, match="another model"):
        GalleryIndex.load(tmp_path / "idx", model_sha256="bb" * 32)
    with pytest.raises(UserError, match="16-dimensional"):
        GalleryIndex.load(tmp_path / "idx", dim=64)
    with pytest.raises(UserError, match="dimension"):
        loaded.search(np.zeros((1, 8), dtype=np.float32), 3)


def test_damaged_files_are_refused(tmp_path):
    xb, labels, refs = _gallery(n=20)
    GalleryIndex.build(xb, refs, labels, list("abcde")).save(tmp_path / "idx")
    meta = tmp_path / "idx" / "metadata.json"
    data = json.loads(meta.read_text())
    data["items"][0]["ref"] = "/etc/passwd"
    meta.write_text(json.dumps(data))
    with pytest.raises(UserError, match="damaged"):
        GalleryIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        GalleryIndex.load(tmp_path / "idx")
    with pytest.raises(UserError, match="not an index folder"):
        GalleryIndex.load(tmp_path)
    with pytest.raises(UserError, match="no such index"):
        GalleryIndex.load(tmp_path / "missing")


def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch):
    xb, labels, refs = _gallery(n=30)
    GalleryIndex.build(xb, refs, labels, list("abcde")).save(tmp_path / "idx")
    bigger = GalleryIndex.build(np.vstack([xb, xb]), refs * 2, np.r_[labels, labels],
                                list("abcde"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert len(GalleryIndex.load(tmp_path / "idx")) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left behind


def test_empty_gallery_and_bad_metric():
    with pytest.raises(UserError, match="empty"):
        GalleryIndex.build(np.zeros((0, 4), np.float32), [], np.zeros(0), [])
    with pytest.raises(UserError, match="metric"):
        GalleryIndex.build(np.zeros((2, 4), np.float32), ["a", "b"], np.zeros(2), ["x"],
                           metric="dot")
