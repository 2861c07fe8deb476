"""The SQLite metadata store: WAL mode, filters by column and user field, migration from
``metadata.json``, and agreement with the journal after a writer is killed between the two."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index import journal as wal
from retrieval.index.store import STORE_FILE, MetadataStore, Record
from tests.conftest import REPO


def _records(n: int, start: int = 0) -> list[Record]:
    return [
        Record(i, f"/img/{i}.png", f"c{i % 3}", 1000.0 + i, f"{i:064x}", {"shop": f"s{i % 2}"})
        for i in range(start, start + n)
    ]


def test_store_is_wal_and_reads_back_what_was_written(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        assert store.journal_mode == "wal"
        store.insert(_records(10))
        store.delete([3, 4])
        assert len(store) == 8
        got = store.get([9, 3, 0])
        assert [r.id for r in got] == [9, 0]
        assert got[0] == Record(9, "/img/9.png", "c0", 1009.0, f"{9:064x}", {"shop": "s1"})
        assert store.label_counts() == {"c0": 3, "c1": 2, "c2": 3}


def test_filters_by_column_and_user_field(tmp_path):
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.insert(_records(30))
        assert store.matching_ids({"label": "c1"}).tolist() == list(range(1, 30, 3))
        assert store.matching_ids({"label": ["c1", "c2"], "shop": "s0"}).tolist() == [
            i for i in range(30) if i % 3 and i % 2 == 0
        ]
        assert store.matching_ids({"id": [5, 6, 99], "ref": "/img/6.png"}).tolist() == [6]
        assert store.matching_ids({}).tolist() == list(range(30))
        with pytest.raises(UserError, match="cannot filter on 'colour'; the fields are: id, ref"):
            store.matching_ids({"colour": "red"})
        plan = " ".join(
            str(r)
            for r in store._con.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM items WHERE label = 'c1'"
            )
        )
        assert "items_label" in plan  # the filter reads the index, not every row


def test_import_of_a_format_2_metadata_json(tmp_path):
    folder = Path(__file__).parent / "data" / "format2-flat-cosine"
    meta = json.loads((folder / "metadata.json").read_text())
    with MetadataStore(tmp_path / STORE_FILE) as store:
        assert store.import_metadata(folder / "metadata.json") == len(meta["items"])
        first = meta["items"][0]
        (rec,) = store.get([first["id"]])
        assert rec.ref == first["ref"] and rec.label == meta["class_names"][first["label"]]
        with pytest.raises(UserError, match="not empty"):
            store.import_metadata(folder / "metadata.json")


def _add_entry(ids, label="c9") -> dict:
    xb = np.zeros((len(ids), 4), np.float32)
    return wal.add_entry(np.array(ids), [f"/new/{i}.png" for i in ids], [label] * len(ids), 5.0, xb)


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from retrieval.index import journal as wal
    from retrieval.index.store import MetadataStore, Record
    folder, where = Path(sys.argv[1]), sys.argv[2]
    store = MetadataStore(folder / "metadata.sqlite")
    xb = np.zeros((2, 4), np.float32)
    entry = wal.add_entry(np.array([100, 101]), ["/new/100.png", "/new/101.png"],
                          ["c9", "c9"], 5.0, xb)
    good = wal.append(folder / "journal.jsonl", [entry], store.applied)
    if where == "between":  # the journal line is fsync'd; the database never hears of it
        os.kill(os.getpid(), signal.SIGKILL)
    store._con.execute("BEGIN IMMEDIATE")
    store._insert([Record(100, "/new/100.png", "c9", 5.0)])
    os.kill(os.getpid(), signal.SIGKILL)  # inside the database's transaction
    """
)


@pytest.mark.parametrize("where", ["between", "in_transaction"])
def test_journal_and_store_agree_after_a_writer_is_killed(tmp_path, where):
    journal = tmp_path / "journal.jsonl"
    with MetadataStore(tmp_path / STORE_FILE) as store:
        store.insert(_records(5))
        first = _add_entry([5])
        applied = wal.append(journal, [first], 0)
        store.apply(first, applied)
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path), where], cwd=REPO, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with MetadataStore(tmp_path / STORE_FILE) as store:
        assert store.get([100, 101]) == []  # behind the journal, never half a transaction
        assert store.applied == applied < journal.stat().st_size
        assert store.catch_up(journal) == 1
        assert [r.id for r in store.get([100, 101])] == [100, 101]
        assert store.applied == journal.stat().st_size
        assert store.catch_up(journal) == 0  # applied once only
        assert len(store) == 8


def test_catch_up_leaves_a_torn_line_and_refuses_damage_or_another_journal(tmp_path):
    journal = tmp_path / "journal.jsonl"
    with MetadataStore(tmp_path / STORE_FILE) as store:
        good = wal.append(journal, [_add_entry([1]), {"op": "remove", "ids": [1]}], 0)
        with journal.open("ab") as f:
            f.write(b"deadbeef {torn")  # a crash while writing: no newline
        assert store.catch_up(journal) == 2 and len(store) == 0 and store.applied == good
        data = journal.read_bytes()
        journal.write_bytes(
            data[:good]
            + b"0" * 64
            + b' {"op":"x"}\n'
            + wal.encode_line({"op": "remove", "ids": []})
        )
        with pytest.raises(UserError, match="damaged"):
            store.catch_up(journal)
        journal.write_bytes(b"")
        with pytest.raises(UserError, match="different indexes"):
            store.catch_up(journal)
