"""The journal: repair of a damaged tail, lines that do not fit the index."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex
from retrieval.index.journal import add_entry, encode_line, repair_journal


def test_a_garbage_tail_is_refused_naming_the_repair_which_keeps_the_valid_lines(saved_index):
    folder, index = saved_index
    for i in (3, 4):
        index.remove([i])
        index.commit(folder)
    journal = folder / "journal.jsonl"
    good = journal.read_bytes()
    garbage = np.random.default_rng(0).bytes(5000).replace(b"\n", b"x")
    garbage = garbage[:1000] + b"\n" + garbage[1000:2500] + b"\n" + garbage[2500:4998]
    journal.write_bytes(good + garbage)  # like head -c 5000 /dev/urandom >> journal.jsonl
    with pytest.raises(UserError) as err:
        GalleryIndex.load(folder)
    message = str(err.value)
    assert f"retrieval index repair {folder}" in message and "line 3" in message
    assert len(message.splitlines()) == 1
    assert repair_journal(folder) == (2, 5000)
    assert journal.read_bytes() == good
    loaded = GalleryIndex.load(folder)
    assert len(loaded) == 48 and {3, 4}.isdisjoint(loaded.items)
    assert repair_journal(folder) == (2, 0)  # nothing more to drop


def test_repair_drops_everything_after_a_damaged_line(saved_index):
    folder, index = saved_index
    for i in (3, 4, 5):
        index.remove([i])
        index.commit(folder)
    journal = folder / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1].replace(b"[4]", b"[9]") + lines[2])
    assert repair_journal(folder) == (1, len(lines[1]) + len(lines[2]))
    loaded = GalleryIndex.load(folder)
    assert 3 not in loaded.items and {4, 5} <= set(loaded.items)
    loaded.remove([6])  # the journal goes on from the repaired end
    loaded.commit(folder)
    assert 6 not in GalleryIndex.load(folder).items


def test_repair_of_a_folder_without_journal_changes_nothing(saved_index, tmp_path):
    folder, _ = saved_index
    assert repair_journal(folder) == (0, 0)
    files = sorted(n for n in os.listdir(folder) if not n.endswith(("-wal", "-shm")))
    assert files == ["index.faiss", "manifest.json", "metadata.sqlite"]  # SQLite's own aside
    with pytest.raises(UserError, match="not an index folder"):
        repair_journal(tmp_path)


def test_a_checksummed_line_of_another_dimension_is_refused(saved_index):
    folder, index = saved_index
    index.remove([1])
    index.commit(folder)  # the journal exists; now a valid line with 4-d vectors
    entry = add_entry([50], ["/x.png"], ["a"], 0.0, np.ones((1, 4), np.float32))
    with open(folder / "journal.jsonl", "ab") as fh:
        fh.write(encode_line(entry))
    with pytest.raises(UserError, match="line 2 does not fit") as err:
        GalleryIndex.load(folder)
    assert len(str(err.value).splitlines()) == 1
    entry = json.loads(encode_line(entry).split(b" ", 1)[1])
    assert entry["dim"] == 4
