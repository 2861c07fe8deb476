"""Filtered search through the service, the HTTP API (``where``, ``GET /labels``) and the
command line (``retrieval search --where``), including searches filtered while images are
added."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retrieval.serving.server import create_app
from retrieval.serving.service import SearchService
from tests.conftest import run_cli

PER_CLASS = 30  # the digits folder: ids 0-29 are digit0, 30-59 digit1, ...


@pytest.fixture
def service(index_dir) -> SearchService:
    return SearchService(index_dir, device="cpu")


@pytest.fixture
def client(service, tmp_path) -> TestClient:
    return TestClient(create_app(service, tmp_path / "uploads"))


def _digit(item_id: int) -> str:
    return f"digit{item_id // PER_CLASS}"


def _expected(service: SearchService, item_id: int, subset: set[int], k: int) -> list[int]:
    """Brute force over the subset: the exact (Flat) ranking of every item, restricted."""
    xq = service.embed([service.image(item_id)])
    hits = service.search_vectors(xq, len(service))[0]
    return [h.id for h in hits if h.id in subset][:k]


def test_post_search_where_equals_brute_force_on_the_subset(client, service):
    subset = set(range(90, 120))  # digit3
    r = client.post("/search", data={"id": "5", "k": "8", "where": "label=digit3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["where"] == {"label": ["digit3"]}
    assert [h["id"] for h in body["results"]] == _expected(service, 5, subset, 8)
    assert {h["label"] for h in body["results"]} == {"digit3"}
    # the same search unfiltered finds item 5 itself first: the filter changed the answer
    assert client.post("/search", data={"id": "5", "k": "8"}).json()["results"][0]["id"] == 5


def test_where_takes_json_and_repeated_fields_and(client, service):
    wanted = [10, 40, 41, 95, 200]  # digit0, digit1, digit1, digit3, digit6
    r = client.post(
        "/search",
        data={
            "id": "40",
            "k": "10",
            "where": ['{"label": ["digit1", "digit3"]}', "id=" + ",".join(map(str, wanted))],
        },
    )
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["results"]]
    assert ids[0] == 40 and sorted(ids) == [40, 41, 95]
    assert ids == _expected(service, 40, {40, 41, 95}, 10)


def test_batch_search_applies_the_filter_to_every_file(client, service):
    files = [
        ("files", (Path(service.item(i).ref).name, Path(service.item(i).ref).read_bytes()))
        for i in (3, 250)
    ]
    r = client.post("/search/batch", files=files, data={"k": "5", "where": "label=digit7"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["where"] == {"label": ["digit7"]}
    for q in body["queries"]:
        assert len(q["results"]) == 5 and {h["label"] for h in q["results"]} == {"digit7"}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("colour=red", "cannot filter on 'colour'; the fields are: label, id, ref"),
        ("label=digit42", "no label 'digit42' in this index; its labels: digit0, digit1"),
        ("label", "is not FIELD=VALUE"),
        ("{bad json", "is not a JSON object"),
    ],
)
def test_bad_filters_are_400_with_one_line(client, where, message):
    for url, extra in (("/search", {"id": "1"}), ("/search/batch", {})):
        files = (
            [("files", ("x.png", b"not decoded: the filter fails first"))] if extra == {} else None
        )
        r = client.post(url, data={**extra, "where": where}, files=files)
        assert r.status_code == 400, (url, r.text)
        detail = r.json()["detail"]
        assert message in detail and "\n" not in detail


def test_labels_endpoint_counts_the_live_items(client, service):
    r = client.get("/labels")
    assert r.status_code == 200
    labels = r.json()["labels"]
    assert [lab["name"] for lab in labels] == [f"digit{d}" for d in range(10)]
    assert all(lab["count"] == PER_CLASS for lab in labels)
    service.remove(list(range(30)))  # every digit0
    service.add_vectors(service.embed([service.image(31)]), ["/added/x.png"], ["sevens"])
    labels = client.get("/labels").json()["labels"]
    assert [lab["name"] for lab in labels] == [f"digit{d}" for d in range(1, 10)] + ["sevens"]
    assert labels[-1]["count"] == 1


def test_page_has_the_label_filter(client):
    page = client.get("/").text
    assert 'id="label-filter"' in page and 'fetch("/labels")' in page
    assert 'form.append("where"' in page


def test_filtered_searches_while_adding_through_the_server(client, service, index_dir):
    """Threads search with filters while another adds images through ``POST /images``: no
    error, every hit matches its filter, and the additions are found by a filtered search
    (and not by one that excludes their label)."""
    from retrieval.index.gallery import GalleryIndex

    errors: list[BaseException] = []
    uploads = [
        (f"copy{j}.png", Path(service.item(j * PER_CLASS).ref).read_bytes()) for j in range(6)
    ]
    added: list[int] = []

    def searcher(label: str, query_id: int) -> None:
        try:
            for _ in range(12):
                r = client.post(
                    "/search", data={"id": str(query_id), "k": "10", "where": f"label={label}"}
                )
                assert r.status_code == 200, r.text
                hits = r.json()["results"]
                assert len(hits) == 10 and {h["label"] for h in hits} == {label}
                if label != "digit2":
                    assert not set(added) & {h["id"] for h in hits}
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def adder() -> None:
        try:
            for name, data in uploads:
                r = client.post("/images", files={"file": (name, data)}, data={"label": "digit2"})
                assert r.status_code == 201, r.text
                added.append(r.json()["id"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=searcher, args=(lab, q))
        for lab, q in (("digit2", 0), ("digit5", 0), ("digit9", 61))
    ]
    threads.append(threading.Thread(target=adder))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(added) == list(range(300, 306))
    # an added copy of item 0 (a digit0 image labelled digit2) is the best digit2 match for 0
    r = client.post("/search", data={"id": "0", "k": "3", "where": "label=digit2"})
    assert r.json()["results"][0]["id"] == 300
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    on_disk = GalleryIndex.load(index_dir)
    _, i = on_disk.search(service.embed([service.image(0)]), 6, where={"id": added})
    assert sorted(i[0].tolist()) == added


def test_filtered_searches_and_label_counts_while_adding_and_removing(client, service, index_dir):
    """Searches filtered by a label being added and by ids, ``GET /labels`` and a second
    reader of the folder, while images are added and removed through the server: no error,
    every hit satisfies its filter, and the counts always add up to the index's size."""
    from retrieval.index.gallery import GalleryIndex

    errors: list[BaseException] = []
    data = Path(service.item(0).ref).read_bytes()
    wanted_ids = set(range(0, 300, 7)) | set(range(300, 310))
    done = threading.Event()

    def check(body: dict, label: str | None, ids: set[int] | None) -> None:
        for h in body["results"]:
            assert label is None or h["label"] == label, h
            assert ids is None or h["id"] in ids, h

    def searcher(where: str, label: str | None, ids: set[int] | None) -> None:
        try:
            while not done.is_set():
                r = client.post("/search", data={"id": "2", "k": "10", "where": where})
                assert r.status_code == 200, r.text
                check(r.json(), label, ids)
                counts = client.get("/labels").json()["labels"]
                assert all(lab["count"] > 0 for lab in counts)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:  # another view of the folder while it changes
        try:
            while not done.is_set():
                other = GalleryIndex.load(index_dir)
                xq = service.embed([service.image(2)])
                d, i = other.search(xq, 5, where={"label": "digit4"})
                assert {h.label for h in other.hits(d[0], i[0])} == {"digit4"}
                other.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=searcher, args=("label=fresh", "fresh", None)),
        threading.Thread(
            target=searcher, args=("id=" + ",".join(map(str, sorted(wanted_ids))), None, wanted_ids)
        ),
        threading.Thread(target=searcher, args=("label=digit3", "digit3", None)),
        threading.Thread(target=reader),
    ]
    first = client.post("/images", files={"file": ("f.png", data)}, data={"label": "fresh"})
    assert first.status_code == 201 and first.json()["id"] == 300
    service.remove([1])
    for t in threads:
        t.start()
    try:
        for j in range(1, 8):
            r = client.post("/images", files={"file": (f"f{j}.png", data)}, data={"label": "fresh"})
            assert r.status_code == 201, r.text
            service.remove([j * 7 + 1, 300 + j // 2] if j % 2 else [j * 7 + 1])
    finally:
        done.set()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    counts = {lab["name"]: lab["count"] for lab in client.get("/labels").json()["labels"]}
    assert sum(counts.values()) == len(service) == 300 + 8 - 8 - 4 and counts["fresh"] == 4
    r = client.post("/search", data={"id": "2", "k": "10", "where": "label=fresh"})
    assert sorted(h["id"] for h in r.json()["results"]) == [304, 305, 306, 307]
    assert len(GalleryIndex.load(index_dir)) == len(service)


def test_cli_search_where(built_index, digits_folder, capsys):
    query = sorted((digits_folder / "digit4").iterdir())[0]
    code, out, err = run_cli(
        [
            "search",
            built_index,
            query,
            "--k",
            "6",
            "--json",
            "--where",
            "label=digit8,digit4",
            "--where",
            "id=130,131,250,251,252,10",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["where"] == {
        "label": ["digit8", "digit4"],
        "id": ["130", "131", "250", "251", "252", "10"],
    }
    ids = [h["id"] for h in doc["queries"][0]["results"]]
    assert sorted(ids) == [130, 131, 250, 251, 252]  # 10 is a digit0: the AND drops it
    code, _, err = run_cli(["search", built_index, query, "--where", "shape=round"], capsys)
    assert code != 0 and "cannot filter on 'shape'" in err and "Traceback" not in err


def test_page_label_filter_in_a_browser(trained_run, digits_folder, tmp_path):
    """The page lists the labels with their counts and searches within the one chosen."""
    from tests.retrieval.serving import test_browser as tb

    if not tb.CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is missing")
    gen = tb.server_url.__wrapped__(tmp_path, trained_run, digits_folder)
    url, service = next(gen)
    try:
        with tb.sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(tb.CHROMIUM), args=tb.CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                options = page.locator("#label-filter option")
                tb.sync_api.expect(options).to_have_count(11)
                assert options.nth(4).text_content() == "digit3 (30)"
                page.select_option("#label-filter", "digit3")
                page.set_input_files("#file-input", service.item(5).ref)  # a digit0
                tb.sync_api.expect(page.locator("#status")).to_contain_text("12 results for")
                ids = tb._result_ids(page)
                assert ids == _expected(service, 5, set(range(90, 120)), 12)
                labels = page.locator("#results .result .label").all_text_contents()
                assert set(labels) == {"digit3"}
            finally:
                browser.close()
    finally:
        next(gen, None)
