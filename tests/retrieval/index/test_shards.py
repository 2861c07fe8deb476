"""Sharded embedding and indexes built from shards: the same index as one built in one go."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

import retrieval.index.factory as index_module
from retrieval.errors import UserError
from retrieval.index.factory import ID_BYTES
from retrieval.index.gallery import GalleryIndex, GalleryPart, ReadOnlyIndexError
from retrieval.index.knn import knn
from retrieval.index.manifest import INDEX_FILE, IVFDATA_FILE
from retrieval.index.shards import Rank, read_shards, shard_range
from tests.conftest import run_cli, run_torchrun
from tests.retrieval.model.test_export import make_checkpoint


def test_shard_ranges_split_the_gallery_exactly():
    for total in range(0, 23):
        for world_size in range(1, 6):
            spans = [shard_range(total, Rank(r, world_size)) for r in range(world_size)]
            assert [i for s in spans for i in s] == list(range(total))
            assert max(map(len, spans)) - min(map(len, spans)) <= 1


def _gallery(n: int = 2000, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    xb = (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    labels = rng.integers(0, 3, n)
    refs = [f"img{i}.png" for i in range(n)]
    xq = (centres[rng.integers(0, 20, 40)] + 0.3 * rng.normal(size=(40, dim))).astype(np.float32)
    return xb, refs, labels, xq


@pytest.mark.parametrize("index_type", ["Flat", "SQ8", "IVF16,Flat", "IVF16,PQ4", "HNSW16"])
def test_built_in_parts_equals_built_in_one_go(index_type, tmp_path, monkeypatch):
    # A training sample smaller than the gallery, so that the sampled path is the one tested.
    monkeypatch.setattr(index_module, "MAX_TRAINING_VECTORS", 1500)
    xb, refs, labels, xq = _gallery()
    one = GalleryIndex.build(xb, refs, labels, ["a", "b", "c"], index_type=index_type)
    # Uneven parts, one of a single vector; memory-mapped like shards.
    cuts = [0, 700, 701, 2000]
    parts = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        np.save(tmp_path / f"{i}.npy", xb[a:b])
        parts.append(
            GalleryPart(np.load(tmp_path / f"{i}.npy", mmap_mode="r"), refs[a:b], labels[a:b])
        )
    merged = GalleryIndex.build_in_parts(parts, ["a", "b", "c"], index_type=index_type)

    assert merged.index.ntotal == len(merged) == len(xb)
    assert list(merged.ids) == list(range(len(xb)))
    assert merged.refs == refs and list(merged.labels) == list(labels)
    d1, i1 = one.search(xq, 10)
    d2, i2 = merged.search(xq, 10)
    if index_type.startswith("HNSW"):
        # A graph grown part by part differs from one grown in one go; its recall does not.
        _, exact = knn(xq, xb, 10)
        recall = [
            np.mean([len(set(r) & set(e)) / 10 for r, e in zip(i, exact, strict=True)])
            for i in (i1, i2)
        ]
        assert recall[1] >= recall[0] - 0.05
    else:
        np.testing.assert_array_equal(i2, i1)
        np.testing.assert_allclose(d2, d1, rtol=0, atol=1e-6)
    merged.save(tmp_path / "index")
    assert GalleryIndex.load(tmp_path / "index").search(xq, 10)[1].tolist() == i2.tolist()


@pytest.mark.parametrize("index_type", ["IVF16,Flat", "IVF16,PQ4"])
def test_on_disk_lists_give_the_in_memory_results(index_type, tmp_path):
    xb, refs, labels, xq = _gallery()
    parts = [GalleryPart(xb[a:b], refs[a:b], labels[a:b]) for a, b in [(0, 900), (900, 2000)]]
    memory = GalleryIndex.build_in_parts(parts, ["a", "b", "c"], index_type=index_type)
    memory.set_search_defaults(nprobe=4)
    work = tmp_path / "work"
    disk = GalleryIndex.build_in_parts(parts, ["a", "b", "c"], index_type=index_type, on_disk=work)
    disk.set_search_defaults(nprobe=4)
    assert sorted(p.name for p in work.iterdir()) == [IVFDATA_FILE]  # the part files are gone
    memory.save(tmp_path / "memory")
    disk.save(tmp_path / "disk")
    assert not (work / IVFDATA_FILE).exists()  # moved into the index folder
    # Moved elsewhere, the folder still finds its lists (they are beside index.faiss).
    (tmp_path / "disk").rename(tmp_path / "moved")
    loaded = GalleryIndex.load(tmp_path / "moved")
    assert loaded.describe()["lists_on_disk"] and loaded.read_only
    # index.faiss holds the quantizer and the lists' directory, not the codes and ids.
    codes = len(xb) * (faiss.extract_index_ivf(loaded.index).code_size + ID_BYTES)
    saved = (tmp_path / "memory" / INDEX_FILE).stat().st_size - (
        tmp_path / "moved" / INDEX_FILE
    ).stat().st_size
    assert saved >= 0.9 * codes
    d1, i1 = GalleryIndex.load(tmp_path / "memory").search(xq, 10)
    d2, i2 = loaded.search(xq, 10)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(d2, d1, rtol=0, atol=1e-6)
    with pytest.raises(ReadOnlyIndexError, match="rebuild it"):
        loaded.add(xq[:1], ["new.png"], [0])
    # A damaged lists file is caught by its checksum.
    with open(tmp_path / "moved" / IVFDATA_FILE, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="damaged"):
        GalleryIndex.load(tmp_path / "moved")


def test_on_disk_index_keeps_json_output_clean(tmp_path, trained_run, digits_folder, capfd):
    # FAISS printf()s a notice when it finds the lists beside a moved index: not on stdout.
    ckpt = trained_run / "best.pt"
    code, _, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            ckpt,
            "--out",
            tmp_path / "built",
            "--index",
            "IVF4,Flat",
            "--on-disk",
            "--device",
            "cpu",
        ],
        capfd,
    )
    assert code == 0, err
    (tmp_path / "built").rename(tmp_path / "moved")
    query = next((digits_folder / "digit3").iterdir())
    code, out, err = run_cli(
        ["search", tmp_path / "moved", query, "--json", "--device", "cpu"], capfd
    )
    assert code == 0, err
    assert json.loads(out)["queries"][0]["results"][0]["label"] == "digit3"
    assert "IO_FLAG_ONDISK_SAME_DIR" in err


def test_on_disk_needs_inverted_lists(tmp_path):
    xb, refs, labels, _ = _gallery(200)
    with pytest.raises(UserError, match="choose an IVF type"):
        GalleryIndex.build_in_parts(
            [GalleryPart(xb, refs, labels)],
            ["a", "b", "c"],
            index_type="HNSW16",
            on_disk=tmp_path / "work",
        )


def _build_merged_and_one(shards: Path, folder: Path, tmp_path: Path, args: list, capsys) -> None:
    """``tmp_path/merged`` built from the shards, ``tmp_path/one`` from the images in one go."""
    for source, out in ((["--from-shards", shards], "merged"), ([folder], "one")):
        code, _, err = run_cli(["index", "build", *source, "--out", tmp_path / out, *args], capsys)
        assert code == 0, err


def _index(path: Path) -> GalleryIndex:
    return GalleryIndex.load(path)


def _same_results(a: GalleryIndex, b: GalleryIndex, xq: np.ndarray) -> None:
    assert a.refs == b.refs and list(a.labels) == list(b.labels)
    same = {"next_id": 0, "read_only": False, "lists_on_disk": False}
    assert a.describe() | same == b.describe() | same
    d1, i1 = a.search(xq, 5)
    d2, i2 = b.search(xq, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-5)


def test_one_process_shards(tmp_path, trained_run, digits_folder, capsys):
    ckpt = trained_run / "best.pt"
    shards = tmp_path / "shards"
    code, out, err = run_cli(
        ["embed", digits_folder, "--model", ckpt, "--shards", shards, "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in shards.iterdir()) == [
        "shard-00000-of-00001.json",
        "shard-00000-of-00001.npy",
    ]
    args = ["--model", ckpt, "--index", "IVF4,Flat", "--nprobe", "2", "--device", "cpu"]
    _build_merged_and_one(shards, digits_folder, tmp_path, args, capsys)
    xq = np.load(shards / "shard-00000-of-00001.npy")[::10]
    _same_results(_index(tmp_path / "merged"), _index(tmp_path / "one"), xq)
    code, out, err = run_cli(
        ["index", "build", "--from-shards", shards, "--out", tmp_path / "disk", "--on-disk", *args],
        capsys,
    )
    assert code == 0 and "inverted lists on disk" in " ".join(out.split()), err
    assert (tmp_path / "disk" / IVFDATA_FILE).is_file()
    assert not (tmp_path / ".disk.lists").exists()  # the work folder is cleaned up
    _same_results(_index(tmp_path / "disk"), _index(tmp_path / "one"), xq)
    code, _, err = run_cli(["index", "add", tmp_path / "disk", digits_folder], capsys)
    assert code == 2 and "on disk" in err and "rebuild" in err
    code, _, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--out",
            tmp_path / "hnsw",
            "--on-disk",
            "--model",
            ckpt,
            "--index",
            "HNSW16",
        ],
        capsys,
    )
    assert code == 2 and "choose an IVF type" in err
    assert not (tmp_path / "hnsw").exists()

    # Refused: shards of another model, damaged embeddings, --out under torchrun, no source.
    other = make_checkpoint(tmp_path / "other.pt")
    code, _, err = run_cli(
        ["index", "build", "--from-shards", shards, "--out", tmp_path / "x", "--model", other],
        capsys,
    )
    assert code == 2 and "another model" in err
    code, _, err = run_cli(["index", "build", "--out", tmp_path / "x", "--model", ckpt], capsys)
    assert code == 2 and "--from-shards" in err
    npy = shards / "shard-00000-of-00001.npy"
    damaged = np.load(npy)
    damaged[0, 0] += 1
    np.save(npy, damaged)
    with pytest.raises(UserError, match="checksum"):
        read_shards(shards)
    os.environ.update(RANK="0", WORLD_SIZE="2")
    try:
        code, _, err = run_cli(
            ["embed", digits_folder, "--model", ckpt, "--out", tmp_path / "e.npy"], capsys
        )
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert code == 2 and "--shards" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_two_ranks_with_torchrun_give_the_index_built_in_one_go(
    tmp_path, trained_run, digits_folder, capsys
):
    ckpt = trained_run / "best.pt"
    shards = tmp_path / "shards"
    run = run_torchrun(
        ["embed", digits_folder, "--model", ckpt, "--shards", shards, "--device", "cpu"],
        tmp_path,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2" in run.stdout and "rank 1 of 2" in run.stdout

    found = read_shards(shards)
    assert [s.meta["rank"] for s in found] == [0, 1]
    assert [len(s.refs) for s in found] == [150, 150]
    # Each rank embedded its own half: together they are the single-process embeddings.
    code, _, err = run_cli(
        ["embed", digits_folder, "--model", ckpt, "--out", tmp_path / "all.npy", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    together = np.concatenate([s.vectors() for s in found])
    np.testing.assert_allclose(together, np.load(tmp_path / "all.npy"), rtol=0, atol=1e-5)
    ids = json.loads((tmp_path / "all.ids.json").read_text())
    assert [r for s in found for r in s.refs] == [it["ref"] for it in ids["items"]]

    # IVF with fewer lists visited than exist: equal results need the same quantizer and lists.
    args = ["--model", ckpt, "--index", "IVF4,Flat", "--nprobe", "2", "--device", "cpu"]
    _build_merged_and_one(shards, digits_folder, tmp_path, args, capsys)
    _same_results(_index(tmp_path / "merged"), _index(tmp_path / "one"), together[::7])
    code, _, err = run_cli(
        [
            "index",
            "build",
            "--from-shards",
            shards,
            "--out",
            tmp_path / "on-disk",
            "--on-disk",
            *args,
        ],
        capsys,
    )
    assert code == 0, err
    _same_results(_index(tmp_path / "on-disk"), _index(tmp_path / "one"), together[::7])

    # An incomplete run and shards of two runs are refused.
    shutil.move(shards / "shard-00001-of-00002.json", tmp_path / "rank1.json")
    with pytest.raises(UserError, match="rank 1 of 2 has not written"):
        read_shards(shards)
    shutil.move(tmp_path / "rank1.json", shards / "shard-00001-of-00002.json")
    code, _, err = run_cli(
        ["embed", digits_folder, "--model", ckpt, "--shards", shards, "--device", "cpu"], capsys
    )
    assert code == 0, err
    with pytest.raises(UserError, match="mixes shards of different runs"):
        read_shards(shards)
