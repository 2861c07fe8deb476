"""The gallery index: exact search against brute force, persistence, refusal of mismatches."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex, choose_index_type, knn, parse_memory


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
    index = GalleryIndex.build(
        xb, refs, labels, list("abcde"), model_sha256="aa" * 32, model_path="/m.pt"
    )
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
    con = sqlite3.connect(tmp_path / "idx" / "metadata.sqlite", isolation_level=None)
    con.execute("UPDATE items SET ref = '/etc/passwd' WHERE id = 0")  # an edited store
    con.close()
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
    bigger = GalleryIndex.build(np.vstack([xb, xb]), refs * 2, np.r_[labels, labels], list("abcde"))

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
        GalleryIndex.build(
            np.zeros((2, 4), np.float32), ["a", "b"], np.zeros(2), ["x"], metric="dot"
        )


# ------------------------------------------------------------------ index types, add, remove

#: Every index family the CLI documents; ``exact`` = a stored vector must find itself first.
INDEX_TYPES = {
    "Flat": True,
    "HNSW32": True,
    "IVF16,Flat": True,
    "SQ8": True,
    "IVF16,PQ4": False,
    "OPQ4,IVF16,PQ4": False,
}


def _clustered(n=1200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim)) * 4
    x = centres[rng.integers(0, 20, size=n)] + rng.normal(size=(n, dim))
    return x.astype(np.float32)


def _self_rank_ok(index, xb, ids, exact, **params):
    """Each stored vector finds itself first (exact types) or in the top 10 (PQ: >= 90%)."""
    d, i = index.search(xb, 10, **params)
    if exact:
        return (i[:, 0] == ids).mean() >= 0.99  # ties between duplicates may swap a few
    return (i == ids[:, None]).any(axis=1).mean() >= 0.9


@pytest.mark.parametrize("index_type", list(INDEX_TYPES))
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_every_index_type_keeps_ids_through_add_and_remove(index_type, metric, tmp_path):
    exact = INDEX_TYPES[index_type]
    xb = _clustered()
    n = len(xb)
    labels = np.arange(n) % 5
    index = GalleryIndex.build(
        xb[:1000],
        [f"/g/{j}" for j in range(1000)],
        labels[:1000],
        list("abcde"),
        metric=metric,
        index_type=index_type,
    )
    assert index.manifest.index_type == index_type
    params = {"nprobe": 16} if "IVF" in index_type else {}

    new_ids = index.add(xb[1000:], [f"/g/{j}" for j in range(1000, n)], labels[1000:])
    assert new_ids.tolist() == list(range(1000, n))
    removed = np.arange(0, n, 3)  # a third of the items, old and new
    assert index.remove(removed) == len(removed)
    live = np.setdiff1d(np.arange(n), removed)
    assert len(index) == len(live)

    d, i = index.search(xb, 10, **params)
    assert not np.isin(i, removed).any(), "a removed id came back"
    assert _self_rank_ok(index, xb[live], live, exact, **params)
    hits = index.hits(d[live[0]], i[live[0]])
    assert hits[0].ref == f"/g/{hits[0].id}" and hits[0].label == "abcde"[hits[0].id % 5]

    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.manifest.index_type == index_type and len(loaded) == len(live)
    d2, i2 = loaded.search(xb[live], 10, **params)
    np.testing.assert_array_equal(i2, index.search(xb[live], 10, **params)[1])
    more = loaded.add(xb[:2], ["/x/0", "/x/1"], [0, 1])
    assert more.tolist() == [n, n + 1], "ids are never reused"


def test_removing_unknown_ids_changes_nothing():
    xb = _clustered(n=100)
    index = GalleryIndex.build(xb, [str(j) for j in range(100)], np.zeros(100), ["a"])
    with pytest.raises(UserError, match="no item with id 100"):
        index.remove([5, 100])
    assert len(index) == 100 and 5 in index.items
    index.remove([5])
    with pytest.raises(UserError, match="no item with id 5"):
        index.remove([5])


def test_hnsw_removal_uses_tombstones_then_rebuilds():
    xb = _clustered(n=400)
    index = GalleryIndex.build(
        xb, [str(j) for j in range(400)], np.zeros(400), ["a"], index_type="HNSW32"
    )
    index.remove(range(50))
    assert index.tombstones == set(range(50)) and index.index.ntotal == 400
    _, i = index.search(xb[:50], 5)
    assert not np.isin(i, np.arange(50)).any()
    index.remove(range(50, 120))  # 120 / 400 > HNSW_COMPACT_FRACTION: rebuilt
    assert index.tombstones == set() and index.index.ntotal == 280
    _, i = index.search(xb[120:], 1)
    assert (i[:, 0] == np.arange(120, 400)).all()


def test_search_parameters_are_per_query_and_checked():
    xb = _clustered(n=2000)
    ivf = GalleryIndex.build(
        xb, [str(j) for j in range(2000)], np.zeros(2000), ["a"], index_type="IVF32,Flat"
    )
    exact = knn(xb, xb, 10)[1]
    recall = {
        p: np.mean(
            [
                len(set(a) & set(b)) / 10
                for a, b in zip(ivf.search(xb, 10, nprobe=p)[1], exact, strict=True)
            ]
        )
        for p in (1, 32)
    }
    assert recall[32] > 0.999 and recall[1] < recall[32]
    assert faiss.extract_index_ivf(ivf.index).nprobe == 32  # the stored default is untouched
    with pytest.raises(UserError, match="between 1 and 32"):
        ivf.search(xb[:1], 5, nprobe=0)
    with pytest.raises(UserError, match="efSearch applies to HNSW"):
        ivf.search(xb[:1], 5, ef_search=10)
    hnsw = GalleryIndex.build(
        xb, [str(j) for j in range(2000)], np.zeros(2000), ["a"], index_type="HNSW16"
    )
    assert hnsw.search(xb[:5], 5, ef_search=200)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="nprobe applies to IVF"):
        hnsw.search(xb[:1], 5, nprobe=4)


def test_bad_index_types_are_refused_clearly():
    xb = _clustered(n=300)
    args = (xb, [str(j) for j in range(300)], np.zeros(300), ["a"])
    with pytest.raises(UserError, match="FAISS cannot make an index of type 'Bogus12'"):
        GalleryIndex.build(*args, index_type="Bogus12")
    with pytest.raises(UserError, match="cannot make"):
        GalleryIndex.build(*args, index_type="PQ5")  # 5 does not divide 16
    with pytest.raises(UserError, match="at least 1024 vectors"):
        GalleryIndex.build(*args, index_type="IVF1024,Flat")
    with pytest.raises(UserError, match="IDMap"):
        GalleryIndex.build(*args, index_type="IDMap,Flat")


def test_auto_picks_by_size_and_memory():
    assert choose_index_type(500, 64) == "Flat"
    assert choose_index_type(200_000, 128, parse_memory("2GB")) == "HNSW32"
    assert choose_index_type(200_000, 128, parse_memory("120MB")) == "HNSW13"
    assert choose_index_type(1_000_000, 128, parse_memory("540MB")).startswith("IVF4096,")
    assert choose_index_type(1_000_000, 128, parse_memory("50MB")) == "OPQ32,IVF4096,PQ32"
    with pytest.raises(UserError, match="raise --memory-budget"):
        choose_index_type(1_000_000, 128, parse_memory("5MB"))
    with pytest.raises(UserError, match="memory size"):
        parse_memory("lots")
    xb = _clustered(n=300)
    index = GalleryIndex.build(
        xb, [str(j) for j in range(300)], np.zeros(300), ["a"], index_type="auto"
    )
    assert index.manifest.index_type == "Flat"


def test_memory_mapped_load_is_read_only(tmp_path):
    xb = _clustered(n=300)
    GalleryIndex.build(xb, [str(j) for j in range(300)], np.zeros(300), ["a"]).save(
        tmp_path / "idx"
    )
    mapped = GalleryIndex.load(tmp_path / "idx", mmap=True)
    assert mapped.search(xb[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="read-only"):
        mapped.add(xb[:1], ["x"], [0])
    with pytest.raises(UserError, match="read-only"):
        mapped.remove([0])


def test_format_1_folders_still_load(legacy_folder):
    """Indexes written before ids could change (no next_id, no time added) keep working."""
    folder = legacy_folder("format2-flat-cosine")
    (folder / "journal.jsonl").unlink()
    meta_path, man_path = folder / "metadata.json", folder / "manifest.json"
    meta = json.loads(meta_path.read_text())
    meta = {
        "class_names": meta["class_names"],
        "items": [{"id": it["id"], "ref": it["ref"], "label": it["label"]} for it in meta["items"]],
    }
    meta_path.write_text(json.dumps(meta))
    man = json.loads(man_path.read_text())
    for key in ("index_type", "updated"):
        del man[key]
    man["format_version"] = 1
    man["checksums"]["metadata.json"] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    man_path.write_text(json.dumps(man))
    old = GalleryIndex.load(folder, mmap=True)  # read as it is
    assert len(old) == 10 and old.next_id == 10 and old.manifest.index_type == "Flat"
    assert old.items[3].added == man["created"]
    old = GalleryIndex.load(folder)  # migrated
    assert old.add(np.ones((1, 4), np.float32), ["new"], [0]).tolist() == [10]
    man = json.loads(man_path.read_text())
    man["format_version"] = 99
    man_path.write_text(json.dumps(man))
    with pytest.raises(UserError, match="newer"):
        GalleryIndex.load(folder)


def _snapshot(folder) -> str:
    return hashlib.sha256((folder / "index.faiss").read_bytes()).hexdigest()


def _same_index(a: GalleryIndex, b: GalleryIndex, xq: np.ndarray) -> None:
    assert a.items == b.items  # ids, references, labels and times added
    assert a.class_names == b.class_names and a.next_id == b.next_id
    assert a.tombstones == b.tombstones
    d1, i1 = a.search(xq, 8)
    d2, i2 = b.search(xq, 8)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("index_type", ["Flat", "IVF8,Flat", "HNSW16"])
def test_commits_append_to_the_journal_and_loading_replays_it(index_type, tmp_path):
    xb = _clustered(400)
    labels, refs = np.arange(400) % 4, [f"/img/{i}.png" for i in range(400)]
    xq = xb[::25] + 0.01
    index = GalleryIndex.build(xb, refs, labels, list("abcd"), index_type=index_type)
    folder = tmp_path / "index"
    index.commit(folder)  # a folder new to the index: a whole snapshot, no journal
    assert not (folder / "journal.jsonl").exists()
    before = _snapshot(folder)
    rng = np.random.default_rng(5)
    for step in range(4):
        extra = rng.normal(size=(3, 16)).astype(np.float32)
        names = ["a", "new-class", "b"]
        index.add(
            extra, [f"/new/{step}-{j}.png" for j in range(3)], [index.label_id(n) for n in names]
        )
        index.remove(list(index.items)[step * 7 : step * 7 + 5])
        index.commit(folder)
    assert _snapshot(folder) == before  # the snapshot was not rewritten
    assert len((folder / "journal.jsonl").read_bytes().splitlines()) == 8
    _same_index(GalleryIndex.load(folder), index, xq)


def test_a_torn_last_line_is_dropped_and_overwritten(tmp_path):
    xb, labels, refs = _gallery()
    index = GalleryIndex.build(xb, refs, labels, list("abcde"))
    folder = tmp_path / "index"
    index.save(folder)
    index.remove([3])
    index.commit(folder)
    journal = folder / "journal.jsonl"
    whole = journal.read_bytes()
    index.remove([4])
    index.commit(folder)
    # A crash in the middle of writing the second change (before it was acknowledged):
    journal.write_bytes(journal.read_bytes()[: len(whole) + 40])
    loaded = GalleryIndex.load(folder)
    assert 3 not in loaded.items and 4 in loaded.items
    # The next change replaces the torn line instead of following it.
    loaded.remove([5])
    loaded.commit(folder)
    again = GalleryIndex.load(folder)
    assert {3, 5}.isdisjoint(again.items) and 4 in again.items and len(again) == 198


def test_a_damaged_journal_line_is_refused(tmp_path):
    xb, labels, refs = _gallery()
    index = GalleryIndex.build(xb, refs, labels, list("abcde"))
    folder = tmp_path / "index"
    index.save(folder)
    for i in (3, 4):
        index.remove([i])
        index.commit(folder)
    journal = folder / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0].replace(b"[3]", b"[7]") + lines[1])  # the checksum catches it
    with pytest.raises(UserError, match="line 1 is damaged"):
        GalleryIndex.load(folder)
    # A valid line of another index does not fit this one.
    other = GalleryIndex.build(xb, refs, labels, list("abcde"))
    other.save(tmp_path / "other")
    other.remove([150])
    other.commit(tmp_path / "other")
    other.remove([150 - 1])
    other.commit(tmp_path / "other")
    (tmp_path / "other" / "journal.jsonl").write_bytes(lines[0] + lines[0])  # id 3 twice
    with pytest.raises(UserError, match="line 2 does not fit"):
        GalleryIndex.load(tmp_path / "other")


def test_a_large_journal_is_folded_into_a_new_snapshot(tmp_path, monkeypatch):
    import retrieval.index.journal as index_module

    xb, labels, refs = _gallery()
    index = GalleryIndex.build(xb, refs, labels, list("abcde"))
    folder = tmp_path / "index"
    index.save(folder)
    monkeypatch.setattr(index_module, "JOURNAL_MIN_BYTES", 0)
    monkeypatch.setattr(index_module, "JOURNAL_COMPACT_FRACTION", 0.01)
    before = _snapshot(folder)
    index.remove([1])
    index.commit(folder)  # the journal was empty: appended
    assert (folder / "journal.jsonl").exists() and _snapshot(folder) == before
    index.add(xb[:40], [f"/again/{i}.png" for i in range(40)], labels[:40])
    index.commit(folder)  # appended: the check is on the journal before the append
    index.remove([2])
    index.commit(folder)  # now over 1% of index.faiss: a new snapshot, no journal
    assert not (folder / "journal.jsonl").exists() and _snapshot(folder) != before
    _same_index(GalleryIndex.load(folder), index, xb[::20])


# Folders written by GalleryIndex.build/save/commit of format 2 (tests/retrieval/index/data):
# 10 vectors of format2-vectors.npy (labels i % 3 of a, b, c), then 2 more added through the
# journal (labels d and b), then id 3 removed through the journal.
FORMAT_2 = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("folder", "metric"), [("format2-flat-cosine", "cosine"), ("format2-hnsw-l2", "l2")]
)
def test_folders_written_in_format_2_still_load(folder, metric, tmp_path):
    shutil.copytree(FORMAT_2 / folder, tmp_path / "idx")  # loading may not write, but be safe
    index = GalleryIndex.load(tmp_path / "idx", model_sha256="ab" * 32, dim=4)
    xb = np.load(FORMAT_2 / "format2-vectors.npy")
    ids = [i for i in range(12) if i != 3]
    assert sorted(index.items) == ids and index.next_id == 12
    assert index.class_names == ["a", "b", "c", "d"]
    assert [index.items[i].label for i in ids] == [i % 3 for i in ids[:-2]] + [3, 1]
    assert index.items[11].ref == "img/11.png"
    assert index.manifest.metric == metric and index.manifest.preprocessing == {"image_size": 28}
    d, i = index.search(xb[:2], 3)
    live = xb[ids]
    if metric == "cosine":
        unit = live / np.linalg.norm(live, axis=1, keepdims=True)
        score = (xb[:2] / np.linalg.norm(xb[:2], axis=1, keepdims=True)) @ unit.T
        order = np.argsort(-score, axis=1, kind="stable")[:, :3]
    else:
        score = np.sqrt(((xb[:2, None] - live[None]) ** 2).sum(-1))
        order = np.argsort(score, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(i, np.array(ids)[order])
    np.testing.assert_allclose(d, np.take_along_axis(score, order, 1), atol=1e-5)
