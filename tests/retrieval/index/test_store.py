"""The SQLite metadata store: WAL mode, filters by column and user field, reads as of a journal
position, snapshots by the backup API; and, through :class:`GalleryIndex`, lazy opening,
agreement with the journal after a writer is killed between the two, and migration of index
folders written with ``metadata.json``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrieval.atomic import folder_lock
from retrieval.errors import UserError
from retrieval.index import journal as wal
from retrieval.index.gallery import GalleryIndex
from retrieval.index.manifest import FORMAT_VERSION, is_index_folder, read_manifest
from retrieval.index.store import STAGED, STORE_FILE, MetadataStore, Record, SnapshotMeta
from tests.conftest import REPO


def _records(n: int, start: int = 0) -> list[Record]:
    return [
        Record(i, f"/img/{i}.png", f"c{i % 3}", 1000.0 + i, f"{i:064x}", {"shop": f"s{i % 2}"})
        for i in range(start, start + n)
    ]


def _entry(op: str, ids: list[int]) -> dict:
    if op == "remove":
        return {"op": "remove", "ids": ids}
    xb = np.zeros((len(ids), 4), np.float32)
    return wal.add_entry(ids, [f"/new/{i}.png" for i in ids], ["c9"] * len(ids), 5.0, xb)


def test_store_is_wal_and_reads_back_what_was_written(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        assert store.journal_mode == "wal"
        store.stage_add(_records(10))
        store.stage_remove([3, 4])
        store.commit([], 0)
        assert sorted(store.live(range(12))) == [0, 1, 2, 5, 6, 7, 8, 9]
        got = store.get([9, 3, 0])
        assert [r.id for r in got] == [9, 0]
        assert got[0] == Record(9, "/img/9.png", "c0", 1009.0, f"{9:064x}", {"shop": "s1"})
        assert store.label_counts() == {"c0": 3, "c1": 2, "c2": 3}
        assert store.first_id() == 0


def test_filters_by_column_and_user_field(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.stage_add(_records(30))
        store.commit([], 0)
        assert store.matching_ids({"label": "c1"}).tolist() == list(range(1, 30, 3))
        assert store.matching_ids({"label": ["c1", "c2"], "shop": "s0"}).tolist() == [
            i for i in range(30) if i % 3 and i % 2 == 0
        ]
        assert store.matching_ids({"id": [5, 6, 99], "ref": "/img/6.png"}).tolist() == [6]
        assert store.matching_ids({}).tolist() == list(range(30))
        with pytest.raises(UserError, match="cannot filter on 'colour'; the fields are: id, ref"):
            store.matching_ids({"colour": "red"})
        assert store.has_field("shop") and store.has_field("id") and not store.has_field("x")
        # the statements a filtered search runs read indexes, and list no field names
        ran: list[str] = []
        store._con.set_trace_callback(ran.append)  # as executed, values bound
        store.matching_ids({"label": "c1"})
        store.matching_ids({"shop": "s0"})
        store._con.set_trace_callback(None)
        assert ran and not any("DISTINCT" in sql for sql in ran)
        plans = {
            sql: " ".join(str(r) for r in store._con.execute("EXPLAIN QUERY PLAN " + sql))
            for sql in ran
            if sql.startswith("SELECT id FROM items")
        }
        assert len(plans) == 2
        label_plan, shop_plan = plans.values()
        assert "items_label" in label_plan and "fields_name_value" in shop_plan


def test_reads_are_as_of_the_view_and_rollback_matches_a_cut_journal(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.stage_add(_records(3))
        store.commit([], 0)  # the snapshot's rows: position 0
        add, remove = _entry("add", [3]), _entry("remove", [0])
        store.apply(add, 100)
        store.apply(remove, 150)
        store.view = 99  # a process that replayed less of the journal
        assert sorted(store.live(range(5))) == [0, 1, 2] and len(store.get([3])) == 0
        store.view = 150
        assert sorted(store.live(range(5))) == [1, 2, 3]
        assert store.matching_ids({"label": "c0"}).tolist() == []  # 0 is removed by now
        store.rollback_to(120)  # the journal was cut after the addition
        assert store.applied == 120 and sorted(store.live(range(5))) == [0, 1, 2, 3]


def test_staged_changes_are_seen_by_the_writer_only_until_committed(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.stage_add(_records(2))
        store.commit([({"op": "add", "ids": [0, 1]}, 0)], 0)
        store.view = 0
        store.stage_add(_records(1, start=2))
        store.stage_remove([0])
        assert sorted(store.live(range(3))) == [1, 2]  # this connection sees its changes
        other = MetadataStore(tmp_path / STORE_FILE, read_only=True)
        assert sorted(other.live(range(3))) == [0, 1]  # another one does not
        entries = [(_entry("add", [2]), 40), (_entry("remove", [0]), 60)]
        store.commit(entries, 60)
        other.view = 60
        assert sorted(other.live(range(3))) == [1, 2] and other.applied == 60
        rows = dict(store._con.execute("SELECT id, added_at FROM items").fetchall())
        assert rows == {0: 0, 1: 0, 2: 40} and STAGED not in rows.values()
        other.close()


def test_a_snapshot_is_a_checkpointed_copy_without_removed_rows(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.stage_add(_records(5))
        store.commit([], 0)
        store.apply(_entry("remove", [1]), 70)  # committed, still in the WAL
        store.view = 70
        store.stage_add(_records(1, start=5))  # staged, not committed
        staged = [_entry("add", [5])]
        assert (tmp_path / (STORE_FILE + "-wal")).stat().st_size > 0
        dest = tmp_path / "copy.sqlite"
        store.write_snapshot(dest, SnapshotMeta(["c0", "c1", "c2"], 6, [], 5), staged)
    assert not (tmp_path / "copy.sqlite-wal").exists()  # closed: nothing left in a WAL
    con = sqlite3.connect(dest)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = con.execute("SELECT id, added_at, removed_at FROM items ORDER BY id").fetchall()
    assert rows == [(0, 0, None), (2, 0, None), (3, 0, None), (4, 0, None), (5, 0, None)]
    assert con.execute("SELECT COUNT(*) FROM fields WHERE id = 1").fetchone()[0] == 0
    con.close()
    with MetadataStore(dest) as copy:
        assert copy.applied == 0 and not copy.changed
        assert copy.snapshot_meta() == SnapshotMeta(["c0", "c1", "c2"], 6, [], 5)


def test_import_refuses_a_store_that_is_not_empty(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        meta = SnapshotMeta(["c0", "c1", "c2"], 3, [], 3)
        store.import_items(_records(3), meta)
        assert store.snapshot_meta() == meta
        with pytest.raises(UserError, match="not empty"):
            store.import_items(_records(1, start=7), meta)
        assert len(store.live(range(10))) == 3


# ---------------------------------------------------------------------- through GalleryIndex


def test_opening_an_index_reads_no_row_of_its_store(saved_index, monkeypatch):
    folder, _ = saved_index
    assert not (folder / "metadata.json").exists() and (folder / STORE_FILE).is_file()
    assert read_manifest(folder).format_version == FORMAT_VERSION == 3

    def no_scan(self):
        raise AssertionError("every row read")

    monkeypatch.setattr(MetadataStore, "scan", no_scan)
    index = GalleryIndex.load(folder)
    assert index.store.journal_mode == "wal" and len(index) == 50
    xq = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    d, i = index.search(xq, 5, where={"label": "b"})
    hits = index.hits(d[0], i[0])
    assert len(hits) == 5 and all(h.label == "b" and h.id % 2 == 1 for h in hits)
    assert 7 in index.items and index.items[7].ref == "/img/7.png" and 50 not in index.items
    assert index.label_counts() == {"a": 25, "b": 25}


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from retrieval.index.gallery import GalleryIndex
    from retrieval.index.store import MetadataStore

    folder = sys.argv[1]
    index = GalleryIndex.load(folder)
    index.add(np.ones((1, 8), np.float32), ["/img/acknowledged.png"], [0])
    index.commit(folder)
    print("acknowledged", flush=True)

    def killed(*args, **kwargs):  # the journal line is fsync'd; the store never commits it
        os.kill(os.getpid(), signal.SIGKILL)

    MetadataStore.commit = killed
    index.add(np.tile([1.0, -1.0], (2, 4)).astype(np.float32), ["/img/x.png", "/img/y.png"], [1, 1])
    index.commit(folder)
    """
)


def test_journal_and_store_agree_after_a_writer_is_killed_between_them(saved_index, caplog):
    folder, _ = saved_index
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(folder)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["acknowledged"]
    journal = folder / "journal.jsonl"
    with MetadataStore(folder / STORE_FILE, read_only=True) as store:
        store.view = journal.stat().st_size
        assert store.applied < journal.stat().st_size  # behind the journal, never ahead
        assert store.get([51, 52]) == []  # the killed transaction left nothing
    with caplog.at_level(logging.WARNING, logger="retrieval.index.gallery"):
        index = GalleryIndex.load(folder)  # catches up, and says why
    assert "a writer stopped between the journal and the store" in caplog.text
    assert index.store.applied == journal.stat().st_size == index._journal_bytes
    assert len(index) == 53 == index.index.ntotal
    assert [index.items[i].ref for i in (50, 51, 52)] == [
        "/img/acknowledged.png",
        "/img/x.png",
        "/img/y.png",
    ]
    d, i = index.search(np.tile([1.0, -1.0], (1, 4)).astype(np.float32), 1)
    assert index.hits(d[0], i[0])[0].id in (51, 52)
    again = GalleryIndex.load(folder)  # applied once only
    assert len(again) == 53 and again.store.applied == journal.stat().st_size


def _contents(folder) -> dict[str, bytes]:
    """The folder's files and their bytes, SQLite's own (``-wal``, ``-shm``) aside."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(("wal", "shm"))}


def test_a_reader_beside_a_busy_writer_sees_the_store_as_of_its_position(saved_index):
    folder, index = saved_index
    index.remove([0])
    index.commit(folder)
    # the store is made to lag one change behind the journal, as a killed writer leaves it
    index.add(np.ones((1, 8), np.float32), ["/img/late.png"], [1])
    wal.append(folder / "journal.jsonl", index._pending, index._journal_bytes)
    index.discard()
    index.close()
    with folder_lock(folder):  # another process writes the folder: nothing may be written
        before = _contents(folder)
        reader = GalleryIndex.load(folder)
        assert len(reader) == 49 and 0 not in reader.items and 50 not in reader.items
        assert _contents(folder) == before
    assert 50 in GalleryIndex.load(folder).items  # the next writer catches up


@pytest.mark.parametrize("name", ["format2-flat-cosine", "format2-hnsw-l2"])
def test_a_folder_of_format_2_is_migrated_on_the_first_open_that_may_write(
    legacy_folder, name, caplog
):
    folder = legacy_folder(name)
    meta = json.loads((folder / "metadata.json").read_text())
    xq = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)

    with folder_lock(folder):  # another process holds the folder: read, never written
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        reader = GalleryIndex.load(folder)
        want = reader.search(xq, 4)
        want_items = dict(reader.items.items())
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert reader.store.path is None  # its metadata.json read into memory

    with caplog.at_level(logging.WARNING, logger="retrieval.index.gallery"):
        index = GalleryIndex.load(folder)
    assert caplog.text == ""  # a migration is not a writer that stopped halfway
    assert not (folder / "metadata.json").exists() and (folder / STORE_FILE).is_file()
    manifest = read_manifest(folder)
    assert manifest.format_version == 3 and set(manifest.checksums) == {
        "index.faiss",
        STORE_FILE,
    }
    assert is_index_folder(folder)
    got = index.search(xq, 4)
    np.testing.assert_array_equal(got[1], want[1])
    assert dict(index.items.items()) == want_items and len(index) == len(reader)
    assert len(index) == len(meta["items"]) + 1  # the journal's change is in the store too
    assert index.store.applied == (folder / "journal.jsonl").stat().st_size
    assert [index.items[it["id"]].ref for it in meta["items"][:3]] == [
        it["ref"] for it in meta["items"][:3]
    ]
    index.close()
    again = GalleryIndex.load(folder, mmap=False)
    assert dict(again.items.items()) == want_items
    again.save(folder)  # compacted: a format-3 snapshot
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        "index.faiss",
        "manifest.json",
        STORE_FILE,
    ]


def test_a_read_only_open_of_a_format_2_folder_writes_nothing(legacy_folder):
    folder = legacy_folder("format2-flat-cosine")
    (folder / "journal.jsonl").unlink()  # memory-mapped opens need a compacted folder
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    mapped = GalleryIndex.load(folder, mmap=True)
    assert len(mapped) == 10 and mapped.items[4].ref == "img/04.png"
    d, i = mapped.search(np.ones((1, 4), np.float32), 3, where={"label": "b"})
    assert {mapped.items[int(j)].label for j in i[0]} == {1}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not os.path.exists(folder.parent / f".{folder.name}.lock")


def test_a_snapshot_of_an_open_store_holds_its_committed_and_staged_changes(saved_index):
    folder, index = saved_index
    index.add(np.ones((1, 8), np.float32), ["/img/committed.png"], [0])
    index.commit(folder)  # in the store's WAL, not yet in its file
    index.add(np.ones((1, 8), np.float32), ["/img/staged.png"], [1])
    index.remove([3])
    index.save(folder)  # a new snapshot, swapped in atomically
    assert (folder / "journal.jsonl").exists() is False
    con = sqlite3.connect(f"file:{folder / STORE_FILE}?mode=ro", uri=True)
    refs = dict(con.execute("SELECT id, ref FROM items WHERE id >= 50").fetchall())
    assert refs == {50: "/img/committed.png", 51: "/img/staged.png"}
    assert con.execute("SELECT COUNT(*) FROM items WHERE id = 3").fetchone()[0] == 0
    con.close()
    loaded = GalleryIndex.load(folder)
    assert len(loaded) == 51 and 3 not in loaded.items and loaded.items[51].label == 1
    assert is_index_folder(folder)


def test_content_hashes_and_user_fields_are_journaled_and_snapshotted(saved_index):
    folder, index = saved_index
    digest = "ab" * 32
    index.add(
        np.ones((2, 8), np.float32),
        ["/a.png", "/b.png"],
        [0, 1],
        [digest, None],
        [
            {"shop": "north"},
            {},
        ],
    )
    index.commit(folder)
    entry = json.loads((folder / "journal.jsonl").read_bytes().split(b" ", 1)[1])
    assert entry["sha256"] == [digest, None] and entry["fields"] == [{"shop": "north"}, {}]
    for opened in (GalleryIndex.load(folder), None):
        if opened is None:  # after a new snapshot
            index.save(folder)
            opened = GalleryIndex.load(folder)
        a, b = opened.store.get([50, 51])
        assert (a.sha256, a.fields, b.sha256, b.fields) == (digest, {"shop": "north"}, None, {})
        assert opened.store.matching_ids({"shop": "north"}).tolist() == [50]
        assert opened.store.matching_ids({"sha256": digest}).tolist() == [50]


@pytest.mark.parametrize("name", ["idx#1", "v?2", "a 50%", "b%23c"])
def test_a_folder_name_that_means_something_in_a_uri_keeps_its_metadata(tmp_path, name):
    rng = np.random.default_rng(0)
    refs = [f"/img/{c}.png" for c in "abcdefghij" * 2]
    index = GalleryIndex.build(rng.normal(size=(20, 8)).astype(np.float32), refs, [0] * 20, ["x"])
    folder = tmp_path / name
    index.save(folder)
    again = GalleryIndex.load(folder)
    again.add(np.ones((1, 8), np.float32), ["/img/new.png"], [0])
    again.commit(folder)
    again.save(folder)  # the snapshot copies the committed store, opened read-only by URI
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no stray file beside it
    for mmap in (False, True):
        loaded = GalleryIndex.load(folder, mmap=mmap)
        assert len(loaded) == 21 and loaded.items[20].ref == "/img/new.png"
        assert loaded.items[3].ref == "/img/d.png"
        loaded.close()


def test_a_folder_that_cannot_be_written_is_read_and_says_why_it_cannot_change(
    saved_index, monkeypatch
):
    folder, index = saved_index
    index.close()
    real_access = os.access

    def access(path, mode):  # as on a read-only mount (root passes any permission check)
        if mode == os.W_OK and os.path.realpath(path) == os.path.realpath(folder):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    loaded = GalleryIndex.load(folder)  # not --mmap: read-only all the same
    assert len(loaded) == 50 and loaded.items[7].ref == "/img/7.png"
    with pytest.raises(UserError, match="cannot be written here .* copy the index"):
        loaded.add(np.ones((1, 8), np.float32), ["/img/x.png"], [0])
    loaded.close()
    (folder / (STORE_FILE + "-wal")).write_bytes(b"\0" * 32)  # changes not in the database
    with pytest.raises(UserError, match="holds changes not yet written"):
        GalleryIndex.load(folder, mmap=True)
