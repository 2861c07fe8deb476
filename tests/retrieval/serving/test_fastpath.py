"""The hot path of ``POST /search``: the multipart split, which forms it takes, answers equal to
FastAPI's, uploads decoded by the batch's worker (a bad one failing alone), cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from data.errors import DataError
from retrieval.serving.engine import Engine, Upload
from retrieval.serving.fastpath import (
    MAX_PARTS,
    UploadSearch,
    multipart_boundary,
    parse_form,
    upload_search,
)
from retrieval.serving.server import MAX_K, create_app
from retrieval.serving.service import SearchService


def _encoded(files: dict | list, data: dict | None = None) -> tuple[bytes, bytes]:
    """A multipart body and its boundary, as httpx (the TestClient's transport) encodes them."""
    request = httpx.Request("POST", "http://x/search", files=files, data=data)
    body = request.read()
    return body, multipart_boundary(request.headers["content-type"].encode())


# ------------------------------------------------------------------------------ parsing


def test_a_client_body_is_split_into_its_parts():
    image = b"\x89PNG\r\n\x1a\n\r\n--not-the-boundary\r\n\r\n\x00\xff"  # CRLFs inside the file
    body, boundary = _encoded({"file": ("q.png", image, "image/png")}, {"k": "7"})
    parts = parse_form(body, boundary)
    by_name = {options[b"name"]: (options.get(b"filename"), content) for options, content in parts}
    assert by_name == {b"k": (None, b"7"), b"file": (b"q.png", image)}
    assert upload_search(parts, MAX_K) == UploadSearch("q.png", image, k=7)


@pytest.mark.parametrize(
    "body",
    [
        b"preamble\r\n--b\r\nContent-Disposition: form-data; name=k\r\n\r\n3\r\n--b--\r\n",
        b"--b\r\nContent-Disposition: form-data; name=k\r\n\r\n3\r\n--b\r\n",  # not closed
        b"--b\r\nContent-Disposition: form-data; name=k\r\n\r\n3\r\n--b--\r\nepilogue",
        b"--b\r\nContent-Disposition: attachment; name=k\r\n\r\n3\r\n--b--\r\n",
        b"--b\r\nContent-Disposition form-data; name=k\r\n\r\n3\r\n--b--\r\n",  # no colon
        b"--b\r\nContent-Type: text/plain\r\n\r\n3\r\n--b--\r\n",  # no disposition
        b"--b\r\nContent-Disposition: form-data; name=k\r\n3\r\n--b--\r\n",  # no blank line
        b"--b--\r\n",  # no part at all
    ],
)
def test_bodies_the_split_does_not_take_are_left_to_fastapi(body):
    assert parse_form(body, b"b") is None


def test_a_body_of_more_parts_than_a_served_form_is_left_to_fastapi():
    part = b"--b\r\nContent-Disposition: form-data; name=k\r\n\r\n3\r\n"
    assert len(parse_form(part * MAX_PARTS + b"--b--\r\n", b"b")) == MAX_PARTS
    # split no further: thousands of parts (FastAPI refuses over 1,000) cost one split
    assert parse_form(part * (MAX_PARTS + 1) + b"--b--\r\n", b"b") is None
    assert parse_form(part * 200_000 + b"--b--\r\n", b"b") is None


@pytest.mark.parametrize(
    "form",
    [
        {"k": "0"},
        {"k": str(MAX_K + 1)},
        {"k": "ten"},
        {"k": "-3"},
        {"k": " 3"},
        {"k": ""},
        {"nprobe": "0"},
        {"ef_search": "65537"},
        {"id": "3"},
        {"where": "label=Sneaker"},
        {"k": ["3", "4"]},
    ],
)
def test_forms_the_hot_path_does_not_take(form):
    body, boundary = _encoded({"file": ("q.png", b"img", "image/png")}, form)
    assert upload_search(parse_form(body, boundary), MAX_K) is None


def test_a_form_without_exactly_one_named_file_is_not_taken():
    none, b1 = _encoded({"k": (None, b"3")})
    two, b2 = _encoded([("file", ("a.png", b"a")), ("file", ("b.png", b"b"))])
    unnamed, b3 = _encoded([("file", (None, b"a"))])
    k_as_file, b4 = _encoded([("file", ("a.png", b"a")), ("k", ("k.txt", b"3"))])
    for body, boundary in ((none, b1), (two, b2), (unnamed, b3), (k_as_file, b4)):
        assert upload_search(parse_form(body, boundary), MAX_K) is None
    body, boundary = _encoded({"file": ("q.png", b"a")}, {"nprobe": "4", "ef_search": "65536"})
    assert upload_search(parse_form(body, boundary), MAX_K) == UploadSearch(
        "q.png", b"a", nprobe=4, ef_search=65536
    )


def test_the_boundary_is_read_from_the_content_type():
    assert multipart_boundary(b'multipart/form-data; boundary="a b"') == b"a b"
    assert multipart_boundary(b"multipart/form-data") is None
    assert multipart_boundary(b"application/x-www-form-urlencoded") is None


# ------------------------------------------------------------------------------ serving


@pytest.fixture
def service(index_dir) -> SearchService:
    return SearchService(index_dir, device="cpu")


def _file(service: SearchService, item_id: int) -> tuple[str, bytes]:
    ref = Path(service.item(item_id).ref)
    return ref.name, ref.read_bytes()


@pytest.mark.parametrize("max_batch", [32, 1])
def test_the_hot_path_answers_what_fastapi_answers(service, tmp_path, monkeypatch, max_batch):
    served = []
    real = Engine.search_upload

    async def counted(self, upload):
        served.append(upload.what)
        return await real(self, upload)

    monkeypatch.setattr(Engine, "search_upload", counted)
    client = TestClient(create_app(service, tmp_path / "up", max_batch=max_batch))
    name, data = _file(service, 42)
    files = {"file": (name, data, "image/png")}
    fast = client.post("/search", files=files, data={"k": "5"})
    assert served == [f"the upload {name}"]
    # a field FastAPI ignores and the hot path does not take: the same search through FastAPI
    slow = client.post("/search", files=files, data={"k": "5", "note": "x"})
    assert len(served) == 1
    assert fast.status_code == slow.status_code == 200
    a, b = fast.json(), slow.json()
    assert a.pop("took_ms") >= 0 and b.pop("took_ms") >= 0
    assert a == b and a["query"] == {"filename": name} and a["results"][0]["id"] == 42
    assert len(a["results"]) == 5
    timing = dict(p.strip().split(";", 1) for p in fast.headers["server-timing"].split(","))
    assert {"decode", "queue", "embed", "search", "total"} <= set(timing)
    assert float(timing["decode"].removeprefix("dur=")) > 0  # the upload was decoded
    r = client.post("/search", files={"file": ("bad.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "the upload bad.png" in r.json()["detail"]
    assert len(served) == 2


def test_only_uploads_small_in_bytes_and_in_pixels_are_decoded_by_the_batch_worker():
    import io

    from PIL import Image

    from retrieval.serving.engine import WORKER_DECODE_BYTES, decodes_quickly

    def encoded(size, fmt, **kw):
        out = io.BytesIO()
        Image.new("RGB", size).save(out, fmt, **kw)
        return out.getvalue()

    assert decodes_quickly(encoded((28, 28), "PNG"))
    bomb = encoded((8000, 8000), "WEBP", lossless=True)  # seconds of decoding, in 2.5 KB
    assert len(bomb) < WORKER_DECODE_BYTES and not decodes_quickly(bomb)
    assert not decodes_quickly(b"\0" * (WORKER_DECODE_BYTES + 1))
    assert decodes_quickly(b"not an image")  # its decode fails at once, in the batch


def test_an_unexpected_failure_on_the_hot_path_is_a_json_500(service, tmp_path, monkeypatch):
    async def closed(self, upload):
        raise RuntimeError("the batcher is closed")  # as during a shutdown

    monkeypatch.setattr(Engine, "search_upload", closed)
    client = TestClient(create_app(service, tmp_path / "up"), raise_server_exceptions=False)
    name, data = _file(service, 42)
    r = client.post("/search", files={"file": (name, data, "image/png")})
    assert r.status_code == 500 and "the batcher is closed" in r.json()["detail"]


@pytest.mark.parametrize("failure", ["not an image", "a decoder crash"])
def test_a_bad_upload_fails_alone_in_its_batch(service, monkeypatch, failure):
    if failure == "a decoder crash":  # as PIL on some fuzzed TIFFs: not a DataError
        prepare = Engine._prepare

        def crashing(self, upload, service):
            if "bad" in upload.what:
                raise TypeError("'IFDRational' object cannot be interpreted as an integer")
            return prepare(self, upload, service)

        monkeypatch.setattr(Engine, "_prepare", crashing)
    engine = Engine(service, max_batch=8, max_wait=0.5)
    uploads = [
        Upload(_file(service, 10)[1], "the upload a.png", 3),
        Upload(b"not an image", "the upload bad.png", 3),
        Upload(_file(service, 20)[1], "the upload c.png", 3),
    ]

    async def all_three():
        return await asyncio.gather(
            *(engine.search_upload(u) for u in uploads), return_exceptions=True
        )

    with engine.arriving():  # the batch waits (0.5 s at most): all three share it
        good1, bad, good2 = asyncio.run(all_three())
    engine.close()
    assert isinstance(bad, DataError) and "the upload bad.png" in str(bad)
    assert good1.batch_size == good2.batch_size == 2  # one forward pass for both good ones
    assert good1.hits[0].id == 10 and good2.hits[0].id == 20 and good1.decode_s > 0
    alone = service.search([service.image(20)], 3)[0]
    assert [h.id for h in good2.hits] == [h.id for h in alone]


def test_a_cancelled_upload_does_not_stall_its_batch(service):
    engine = Engine(service, max_batch=8, max_wait=0.5)
    name, data = _file(service, 30)

    async def one_gives_up():
        gone = asyncio.create_task(engine.search_upload(Upload(data, "gone", 3)))
        kept = asyncio.create_task(engine.search_upload(Upload(data, "kept", 3)))
        await asyncio.sleep(0.05)  # both queued; the batch is held open by arriving()
        gone.cancel()
        return gone, await asyncio.wait_for(kept, 10)

    with engine.arriving():
        gone, kept = asyncio.run(one_gives_up())
    engine.close()
    assert gone.cancelled()
    assert kept.batch_size == 1 and kept.hits[0].id == 30  # served without the cancelled one
