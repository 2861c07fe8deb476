"""The HTTP service: search by upload and by id, images by id, add/remove with persistence,
limits and error codes, the API token, concurrency (FastAPI's TestClient, in-process)."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex
from retrieval.model.checkpoint import load_checkpoint
from retrieval.serving.server import MAX_K, create_app
from retrieval.serving.service import SearchService, index_lock

TOKEN = "s3cret-token"


@pytest.fixture
def service(index_dir) -> SearchService:
    return SearchService(index_dir, device="cpu")


@pytest.fixture
def client(service, tmp_path) -> TestClient:
    return TestClient(create_app(service, tmp_path / "uploads", token=TOKEN))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _gallery_file(service: SearchService, item_id: int) -> tuple[str, bytes]:
    ref = service.item(item_id).ref
    return Path(ref).name, Path(ref).read_bytes()


def _auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_upload_of_a_gallery_image_ranks_it_first(client, service):
    for item_id in (0, 137, 299):
        name, data = _gallery_file(service, item_id)
        r = client.post("/search", files={"file": (name, data, "image/png")}, data={"k": "7"})
        assert r.status_code == 200, r.text
        body = r.json()
        results = body["results"]
        assert len(results) == 7 and [h["rank"] for h in results] == list(range(1, 8))
        assert results[0]["id"] == item_id
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["label"] == service.label_name(service.item(item_id).label)
        scores = [h["score"] for h in results]
        assert scores == sorted(scores, reverse=True)
        assert body["score"] == "similarity" and body["query"] == {"filename": name}
        assert "/" not in results[0]["name"]  # no server paths in answers


def test_more_like_this_searches_with_an_indexed_item(client):
    r = client.post("/search", data={"id": "42", "k": "5"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == 42
    assert client.post("/search", data={"id": "100000"}).status_code == 404


def test_images_are_served_by_id_only(client, service):
    r = client.get("/images/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    original = Image.open(service.item(3).ref).convert("RGB")
    served = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert np.array_equal(np.asarray(original), np.asarray(served))
    thumb = Image.open(io.BytesIO(client.get("/images/3?size=64").content))
    assert max(thumb.size) == 64
    assert client.get("/images/3?size=5000").status_code == 422
    assert client.get("/images/99999").status_code == 404
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/images/3.png"):
        assert client.get(path).status_code in (404, 422), path


def test_health_stats_docs_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "items": 300}
    stats = client.get("/stats").json()
    assert stats["items"] == 300 and stats["index_type"] == "Flat" and stats["dim"] == 128
    assert stats["writes_need_token"] is True and stats["max_k"] == MAX_K
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/images", "/images/{item_id}", "/health", "/stats"} <= set(paths)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # works without a network
    script = client.get("/static/swagger/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text


def _bomb_png(side: int) -> bytes:
    """A valid 1x1 PNG whose header claims side x side pixels (CRC fixed up)."""
    data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_requests_get_clear_errors(client, service, tmp_path):
    def upload(data: bytes, **form):
        return client.post("/search", files={"file": ("q.png", data, "image/png")}, data=form)

    r = upload(b"this is not an image")
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    _, good = _gallery_file(service, 0)
    r = upload(good[: len(good) // 2])
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["detail"]
    r = upload(_bomb_png(9000))  # over our limit, under PIL's own
    assert r.status_code == 400 and "9000x9000 pixels" in r.json()["detail"]
    r = upload(_bomb_png(30000))  # PIL refuses to open it at all
    assert r.status_code == 400 and "too large" in r.json()["detail"]
    assert upload(b"").status_code == 400
    for k in ("0", str(MAX_K + 1), "ten"):
        assert upload(good, k=k).status_code == 422, k
    assert client.post("/search", data={"k": "3"}).status_code == 400
    r = upload(good, id="1")
    assert r.status_code == 400 and "either" in r.json()["detail"]
    r = upload(good, nprobe="4")
    assert r.status_code == 400 and "nprobe applies to IVF" in r.json()["detail"]

    small = TestClient(create_app(service, tmp_path / "up", max_upload_bytes=2048))
    r = small.post("/search", files={"file": ("big.png", b"\0" * 5000, "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the streamed body is counted
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(10):
            yield b"\0" * 1000

    r = small.post(
        "/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 413


def test_add_and_remove_need_the_token_and_survive_a_restart(client, service, index_dir, tmp_path):
    pattern = np.zeros((16, 16, 3), np.uint8)
    pattern[::2, :, 0] = 255  # red stripes: unlike any digit
    data = _png(pattern)
    files = {"file": ("stripes.png", data, "image/png")}
    assert client.post("/images", files=files, data={"label": "stripes"}).status_code == 401
    r = client.post(
        "/images", files=files, data={"label": "stripes"}, headers={"Authorization": "Bearer wrong"}
    )
    assert r.status_code == 401
    r = client.post("/images", files=files, data={"label": "stripes"}, headers=_auth())
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    assert new_id == 300 and r.json()["items"] == 301
    r = client.post("/images", files={"file": ("x.txt", b"hello", "text/plain")}, headers=_auth())
    assert r.status_code == 400

    hit = client.post("/search", files=files, data={"k": "1"}).json()["results"][0]
    assert hit["id"] == new_id and hit["label"] == "stripes"
    assert client.get(f"/images/{new_id}").status_code == 200

    assert client.delete("/images/5").status_code == 401
    assert client.delete("/images/5", headers=_auth()).json() == {"removed": 5, "items": 300}
    assert client.delete("/images/5", headers=_auth()).status_code == 404
    assert client.get("/images/5").status_code == 404

    # a new process reads what was acknowledged
    restarted = SearchService(index_dir, device="cpu")
    assert len(restarted) == 300 and 5 not in restarted.index.items
    assert restarted.label_name(restarted.item(new_id).label) == "stripes"
    import hashlib

    (row,) = restarted.index.store.get([new_id])
    assert row.sha256 == hashlib.sha256(data).hexdigest()  # the upload's content hash
    fresh = TestClient(create_app(restarted, tmp_path / "uploads"))
    assert fresh.post("/search", files=files, data={"k": "1"}).json()["results"][0]["id"] == new_id


def test_a_failed_save_is_not_acknowledged_and_rolled_back(
    service, index_dir, tmp_path, monkeypatch
):
    client = TestClient(create_app(service, tmp_path / "uploads"), raise_server_exceptions=False)

    def disk_full(*args):
        raise OSError("disk full")

    # The change is appended to the journal, whose fsync fails: not acknowledged, not kept.
    monkeypatch.setattr(os, "fsync", disk_full)
    assert client.delete("/images/7").status_code == 500
    monkeypatch.undo()
    assert 7 in service.index.items and len(service) == 300  # memory matches disk again
    assert 7 in GalleryIndex.load(index_dir).items
    # The same with a new snapshot (what a first commit to a folder, or compaction, writes).
    monkeypatch.setattr(GalleryIndex, "save", disk_full)
    service.index._folder = None  # as if the folder were new to it: commit writes a snapshot
    assert client.delete("/images/8").status_code == 500
    monkeypatch.undo()
    assert 8 in service.index.items and 8 in GalleryIndex.load(index_dir).items
    assert client.delete("/images/7").status_code == 200
    assert 7 not in GalleryIndex.load(index_dir).items


def test_concurrent_searches_adds_and_removes(service, index_dir):
    """Searches run while images are added and removed: no error, no torn result, no lost
    add, and the folder on disk ends with exactly the acknowledged changes."""
    images = [service.image(i) for i in range(20)]
    errors: list[BaseException] = []
    added: list[int] = []
    lock = threading.Lock()

    def searcher():
        try:
            for _ in range(15):
                for hits in service.search(images[:4], 10):
                    for h in hits:  # each hit is consistent with its item (no torn read)
                        assert h.ref.endswith(".png") and h.label.startswith("digit")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def adder(start):
        try:
            for j in range(start, start + 10):
                (new,) = service.add([images[j % 20]], [f"/added/{j}.png"], ["digit0"])
                with lock:
                    added.append(new)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def remover():
        try:
            for j in range(100, 120):
                service.remove([j])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    threads += [threading.Thread(target=adder, args=(s,)) for s in (0, 10)]
    threads += [threading.Thread(target=remover)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(added) == list(range(300, 320))
    on_disk = GalleryIndex.load(index_dir)
    assert len(on_disk) == 300 + 20 - 20
    assert set(added) <= set(on_disk.items) and not set(range(100, 120)) & set(on_disk.items)


def test_memory_mapped_service_is_read_only(index_dir, tmp_path):
    service = SearchService(index_dir, device="cpu", mmap=True)
    client = TestClient(create_app(service, tmp_path / "uploads"))
    _, data = _gallery_file(service, 9)
    r = client.post("/search", files={"file": ("q.png", data, "image/png")})
    assert r.json()["results"][0]["id"] == 9
    r = client.post("/images", files={"file": ("q.png", data, "image/png")})
    assert r.status_code == 409 and "read-only" in r.json()["detail"]
    assert client.delete("/images/9").status_code == 409


def test_one_writer_process_at_a_time(index_dir):
    with index_lock(index_dir):
        with pytest.raises(UserError, match="another process"):
            with index_lock(index_dir):
                pass
    with index_lock(index_dir):  # released
        pass


def test_service_refuses_an_index_of_another_model(index_dir, tmp_path, trained_run):
    state = load_checkpoint(trained_run / "best.pt")
    other = tmp_path / "other.pt"
    torch.save({**state, "note": "retrained"}, other)  # a valid, different checkpoint
    with pytest.raises(UserError, match="another model"):
        SearchService(index_dir, other, device="cpu")


# ------------------------------------------------------------------------------ batching, timing


def test_answers_carry_server_timing(client, service):
    name, data = _gallery_file(service, 4)
    r = client.post("/search", files={"file": (name, data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200
    timing = dict(part.strip().split(";", 1) for part in r.headers["server-timing"].split(","))
    assert {"decode", "queue", "embed", "search", "total"} <= set(timing)
    durations = {k: float(v.removeprefix("dur=")) for k, v in timing.items() if k != "batch"}
    assert all(d >= 0 for d in durations.values())
    assert durations["total"] >= durations["embed"] and timing["batch"] == 'desc="1"'


def test_concurrent_searches_share_batches_and_get_their_own_results(service):
    """Threads searching at once through the batcher (a long window, so that batches form) get
    exactly what each search gives alone."""
    from retrieval.serving.server import Engine
    from retrieval.serving.service import Query

    engine = Engine(service, max_batch=16, max_wait=0.2)
    ids = list(range(0, 300, 25))
    settings = [(3, None), (7, None), (1, None)]
    start = threading.Barrier(len(ids))
    answers: dict[int, object] = {}

    def one(n: int, item: int) -> None:
        k, _ = settings[n % 3]
        start.wait()
        with engine.arriving():  # as the endpoint does while it decodes
            query = Query(service.prepare(service.image(item)), k)
            futures = engine.submit([query])
        answers[item] = engine.results(futures)[0]

    threads = [threading.Thread(target=one, args=(n, i)) for n, i in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.close()
    assert max(a.batch_size for a in answers.values()) > 1
    for n, item in enumerate(ids):
        k = settings[n % 3][0]
        alone = service.search([service.image(item)], k)[0]
        assert [h.id for h in answers[item].hits] == [h.id for h in alone]
        assert answers[item].hits[0].id == item


def test_batch_endpoint_fails_a_bad_image_alone(client, service):
    files = [
        ("files", _gallery_file(service, 10) + ("image/png",)),
        ("files", ("bad.png", b"not an image", "image/png")),
        ("files", _gallery_file(service, 20) + ("image/png",)),
    ]
    r = client.post("/search/batch", files=files, data={"k": "2"})
    assert r.status_code == 200, r.text
    queries = r.json()["queries"]
    assert [q["query"]["filename"] for q in queries] == [files[0][1][0], "bad.png", files[2][1][0]]
    assert queries[0]["results"][0]["id"] == 10 and queries[2]["results"][0]["id"] == 20
    assert "results" not in queries[1] and "not an image" in queries[1]["error"]
    assert "embed" in r.headers["server-timing"]
    r = client.post("/search/batch", files=files[:1], data={"nprobe": "3"})
    assert "nprobe applies to IVF" in r.json()["queries"][0]["error"]


def test_unbatched_server_gives_the_same_answers(service, tmp_path):
    batched = TestClient(create_app(service, tmp_path / "up"))
    alone = TestClient(create_app(service, tmp_path / "up", max_batch=1))
    name, data = _gallery_file(service, 77)
    files = {"file": (name, data, "image/png")}
    a = batched.post("/search", files=files, data={"k": "9"}).json()["results"]
    b = alone.post("/search", files=files, data={"k": "9"}).json()["results"]
    assert [h["id"] for h in a] == [h["id"] for h in b] and a[0]["id"] == 77


def test_health_says_loading_until_the_service_is_ready(service, tmp_path):
    loading: Future = Future()
    client = TestClient(create_app(loading, tmp_path / "up"))
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert client.get("/").status_code == 200  # the page is served meanwhile
    r = client.post("/search", data={"id": "1"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    loading.set_result(service)
    assert client.get("/health").json() == {"status": "ok", "items": 300}
    assert client.post("/search", data={"id": "1"}).json()["results"][0]["id"] == 1


@pytest.mark.parametrize(
    ("max_batch", "side", "most_at_once"),
    [
        (1, 28, 2),  # unbatched: each request decodes in its thread, two at a time
        (32, 28, 1),  # batched, small uploads: the batch's worker decodes them, one at a time
        (32, 200, 2),  # batched, large uploads: decoded in threads first, two at a time
    ],
)
def test_decodes_at_once_are_bounded(service, tmp_path, monkeypatch, max_batch, side, most_at_once):
    import retrieval.serving.service as service_module
    from retrieval.serving.engine import WORKER_DECODE_BYTES

    running, most = 0, 0
    lock = threading.Lock()
    real = service_module.decode_image

    def slow_decode(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "decode_image", slow_decode)
    app = create_app(service, tmp_path / "up", max_batch=max_batch, max_decodes=2)
    client = TestClient(app)
    name, data = _gallery_file(service, 3)
    if side > 28:  # noise does not compress: a PNG larger than the worker decodes
        data = _png(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        assert len(data) > WORKER_DECODE_BYTES
    codes = []

    def post():
        r = client.post("/search", files={"file": (name, data, "image/png")})
        codes.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 6
    assert most == most_at_once  # six uploads at once


def test_thumbnails_of_large_photos_are_fitted_and_cached(service, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    photo = tmp_path / "holiday.jpg"
    big = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8).repeat(100, 0).repeat(100, 1)
    Image.fromarray(big).save(photo, quality=90)  # 4000 x 3000
    (new_id,) = service.add_vectors(np.ones((1, 128), np.float32), [str(photo)], ["photos"])
    calls = []
    real = service.image_pil

    def spy(item_id, draft_size=None):
        calls.append(draft_size)
        return real(item_id, draft_size)

    monkeypatch.setattr(service, "image_pil", spy)
    client = TestClient(create_app(service, tmp_path / "up"))
    first = client.get(f"/images/{new_id}?size=160")
    assert first.status_code == 200 and 'cache;desc="miss"' in first.headers["server-timing"]
    assert Image.open(io.BytesIO(first.content)).size == (160, 120)
    second = client.get(f"/images/{new_id}?size=160")
    assert second.content == first.content and 'desc="hit"' in second.headers["server-timing"]
    assert calls == [160]  # decoded once, at a reduced scale
    assert client.get("/stats").json()["thumbnail_cache"]["hits"] == 1
    assert client.delete(f"/images/{new_id}").status_code == 200
    assert client.get(f"/images/{new_id}?size=160").status_code == 404  # not from the cache
