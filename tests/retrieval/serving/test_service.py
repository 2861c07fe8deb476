"""Searching through the command line: index build/add/remove/info and search, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex
from retrieval.serving.service import Query, SearchService, decode_image, index_lock
from tests.conftest import run_cli


def _search_json(capsys, index_dir, *args):
    code, out, err = run_cli(["search", index_dir, *args, "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_index_lifecycle_through_the_cli(trained_run, digits_folder, tmp_path, capsys):
    idx = tmp_path / "new" / "folders" / "idx"
    code, out, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            trained_run / "best.pt",
            "--out",
            idx,
            "--index",
            "HNSW16",
            "--ef-search",
            "40",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "indexed 300 images" in out and "HNSW16" in out

    query = sorted(digits_folder.rglob("*.png"))[31]  # digit1/0030.png, id 31
    res = _search_json(capsys, idx, query, "--k", "5", "--ef-search", "80")
    assert res["queries"][0]["results"][0]["id"] == 31
    assert res["queries"][0]["results"][0]["ref"] == str(query)

    # add a single file with a label, and a folder (labelled by its sub-folders)
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    code, out, err = run_cli(
        ["index", "add", idx, tmp_path / "stripes.png", "--label", "stripes", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert "added 1 images (id 300)" in out and "holds 301" in out
    code, out, err = run_cli(["index", "add", idx, digits_folder, "--device", "cpu"], capsys)
    assert code == 0 and "ids 301-600" in out, err
    hit = _search_json(capsys, idx, tmp_path / "stripes.png", "--k", "1")
    assert hit["queries"][0]["results"][0]["label"] == "stripes"

    code, out, err = run_cli(["index", "remove", idx, "31", "300"], capsys)
    assert code == 0 and "removed 2 items" in out, err
    code, _, err = run_cli(["index", "remove", idx, "31"], capsys)
    assert code == 2 and "no item with id 31" in err
    res = _search_json(capsys, idx, query, "--k", "3")
    ids = [h["id"] for h in res["queries"][0]["results"]]
    assert 31 not in ids and ids[0] == 301 + 31  # the same picture, added again later

    # a folder of queries, one batched search; and the picture
    code, out, err = run_cli(
        [
            "search",
            idx,
            digits_folder / "digit3",
            "--k",
            "4",
            "--out",
            tmp_path / "grid.png",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert out.count("query:") == 30 and (tmp_path / "grid.png").stat().st_size > 1000

    code, out, err = run_cli(["index", "info", idx], capsys)
    assert code == 0 and "HNSW16" in out and "599" in out and "ef_search" in out

    code, _, err = run_cli(["search", idx, query, "--nprobe", "4", "--device", "cpu"], capsys)
    assert code == 2 and "nprobe applies to IVF" in err
    # The adds and removes went to the journal; a memory map needs them folded in first.
    assert (idx / "journal.jsonl").stat().st_size > 0
    code, _, err = run_cli(["search", idx, query, "--mmap", "--device", "cpu"], capsys)
    assert code == 2 and "retrieval index compact" in err
    code, out, err = run_cli(["index", "compact", idx], capsys)
    assert code == 0 and "599 items" in out, err
    assert not (idx / "journal.jsonl").exists()
    code, out, err = run_cli(["search", idx, query, "--mmap", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert [h["id"] for h in json.loads(out)["queries"][0]["results"]][:3] == ids


def test_auto_and_ivf_builds_and_clear_refusals(trained_run, digits_folder, tmp_path, capsys):
    model = trained_run / "best.pt"
    code, out, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            model,
            "--out",
            tmp_path / "auto",
            "--index",
            "auto",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0 and "Flat" in out, err  # 300 images: exact search
    code, out, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            model,
            "--out",
            tmp_path / "ivf",
            "--index",
            "IVF4,Flat",
            "--nprobe",
            "4",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    query = sorted(digits_folder.rglob("*.png"))[250]
    res = _search_json(capsys, tmp_path / "ivf", query, "--k", "3", "--nprobe", "4")
    assert res["queries"][0]["results"][0]["id"] == 250
    code, _, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            model,
            "--out",
            tmp_path / "bad",
            "--index",
            "IVF4096,Flat",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and "needs at least 4096 vectors" in err
    code, _, err = run_cli(
        [
            "index",
            "build",
            digits_folder,
            "--model",
            model,
            "--out",
            tmp_path / "bad",
            "--index",
            "auto",
            "--memory-budget",
            "1KB",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and "memory-budget" in err
    assert not (tmp_path / "bad").exists()


def test_a_locked_index_refuses_other_writers(trained_run, digits_folder, tmp_path, capsys):
    idx = tmp_path / "idx"
    GalleryIndex.build(
        np.eye(4, 128, dtype=np.float32), ["a", "b", "c", "d"], np.zeros(4), ["x"]
    ).save(idx)
    with index_lock(idx):
        code, _, err = run_cli(["index", "remove", idx, "1"], capsys)
    assert code == 2 and "another process" in err
    assert len(GalleryIndex.load(idx)) == 4


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_decode_image_reads_common_formats(fmt, tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(buf, format=fmt)
    image, found = decode_image(buf.getvalue())
    assert (
        found == fmt and tuple(image.shape) == (3, 5, 7) and image.dtype.is_floating_point is False
    )


# ------------------------------------------------------------------------------ batched search

#: (k, nprobe, ef_search) per query, cycled over the batch; one HNSW setting is invalid.
SETTINGS = {
    "HNSW16": [(1, None, 4), (5, None, 16), (10, None, None), (3, None, 64), (3, 2, None)],
    "IVF4,Flat": [(5, 1, None), (5, 4, None), (10, None, None), (2, 2, None)],
}


@pytest.mark.parametrize("spec", sorted(SETTINGS))
def test_a_batch_with_mixed_k_and_parameters_gives_the_unbatched_results(typed_index, spec):
    service = SearchService(typed_index(spec), device="cpu")
    images = [service.image(i) for i in range(0, 300, 11)]  # 28 queries
    settings = [SETTINGS[spec][n % len(SETTINGS[spec])] for n in range(len(images))]
    queries = [Query(service.prepare(img), *s) for img, s in zip(images, settings, strict=True)]
    answers = service.search_batch(queries)
    assert len(answers) == len(images)
    differs = False
    for img, (k, nprobe, ef), answer in zip(images, settings, answers, strict=True):
        if nprobe is not None and spec.startswith("HNSW"):
            assert isinstance(answer, UserError) and "nprobe applies to IVF" in str(answer)
            continue
        alone = service.search([img], k, nprobe=nprobe, ef_search=ef)[0]
        assert answer.batch_size == len(images)
        assert [h.id for h in answer.hits] == [h.id for h in alone]
        assert [h.score for h in answer.hits] == pytest.approx([h.score for h in alone], abs=1e-5)
        assert len(answer.hits) == k
        if spec.startswith("IVF") and nprobe == 1:
            wide = service.search([img], k, nprobe=4)[0]
            differs |= [h.id for h in wide] != [h.id for h in alone]
    if spec.startswith("IVF"):
        assert differs  # nprobe was honoured per query: 1 list misses neighbours 4 lists find


def test_search_files_skips_unreadable_queries(typed_index, digits_folder, tmp_path):
    service = SearchService(typed_index("Flat"), device="cpu")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths = [str(p) for p in sorted(digits_folder.rglob("*.png"))[:70]]  # more than a batch
    paths.insert(3, str(tmp_path / "broken.png"))
    searched, hits, skipped = service.search_files(paths, k=2)
    assert searched == [p for p in paths if "broken" not in p]
    assert [h[0].id for h in hits] == list(range(70))  # each gallery image finds itself
    assert len(skipped) == 1 and skipped[0][0].endswith("broken.png")
    assert "not an image" in skipped[0][1]


def test_every_thread_can_take_the_configured_faiss_threads(monkeypatch):
    """OpenMP keeps its thread count per thread: the batcher's search thread, which runs no
    torch operation, would otherwise search with one OpenMP thread per core."""
    import threading

    import faiss

    from retrieval.serving import service as service_module

    saved = faiss.omp_get_max_threads()
    configured = saved + 3  # a count no new thread starts with
    monkeypatch.setattr(service_module, "_faiss_threads", configured)
    seen = {}

    def fresh_thread():
        seen["before"] = faiss.omp_get_max_threads()
        service_module.apply_faiss_threads()
        seen["after"] = faiss.omp_get_max_threads()

    try:
        thread = threading.Thread(target=fresh_thread)
        thread.start()
        thread.join(10)
    finally:
        faiss.omp_set_num_threads(saved)
    assert seen["before"] != configured and seen["after"] == configured
    assert faiss.omp_get_max_threads() == saved  # the calling thread's count is its own


def test_configure_threads_gives_one_thread_each_unbatched(monkeypatch):
    import faiss
    import torch

    from retrieval.serving import service as service_module

    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    monkeypatch.setattr(service_module, "_faiss_threads", None)
    try:
        service_module.configure_threads(batched=False)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        assert service_module._faiss_threads == 1
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])
