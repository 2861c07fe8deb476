"""The search page end to end in headless Chromium, against a real uvicorn server on loopback.

Needs Debian's ``chromium`` at /usr/bin/chromium (the project set-up and CI install it) and the
``playwright`` Python package (the [dev] extra); Playwright's own browser download is not used.
"""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.serving.server import create_app
from retrieval.serving.service import SearchService
from tests.conftest import build_index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="/usr/bin/chromium is missing: install Debian's chromium package (make setup does)",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [dev] extra")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url(tmp_path, trained_run, digits_folder) -> Iterator[tuple[str, SearchService]]:
    """A uvicorn server on 127.0.0.1 and a free port, in a thread, serving a digits index."""
    import uvicorn

    index_dir = tmp_path / "index"
    build_index(digits_folder, trained_run / "best.pt", index_dir)
    service = SearchService(index_dir, device="cpu")
    port = _free_port()
    config = uvicorn.Config(
        create_app(service, tmp_path / "uploads"), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the uvicorn server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(timeout=10)
    shutil.rmtree(tmp_path / "uploads", ignore_errors=True)


def _result_ids(page) -> list[int]:
    return [
        int(x)
        for x in page.locator("#results .result").evaluate_all(
            "cards => cards.map(c => c.dataset.id)"
        )
    ]


def test_search_page_upload_then_more_like_this(server_url, tmp_path):
    url, service = server_url
    gallery_id = 137
    gallery_file = service.item(gallery_id).ref
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            sync_api.expect(page.locator("#index-info")).to_contain_text("300 images")

            # 1. choose a file that is in the gallery: it comes back first
            page.set_input_files("#file-input", gallery_file)
            sync_api.expect(page.locator("#status")).to_contain_text("12 results for")
            ids = _result_ids(page)
            assert ids[0] == gallery_id and len(ids) == 12
            first = page.locator("#results .result").first
            label = service.label_name(service.item(gallery_id).label)
            sync_api.expect(first.locator(".label")).to_have_text(label)
            sync_api.expect(first.locator(".name")).to_have_text(Path(gallery_file).name)
            sync_api.expect(first.locator(".score")).to_have_text("1.000")
            assert page.locator("#query-image").get_attribute("src").startswith("blob:")
            page.wait_for_function(  # thumbnails really loaded
                "() => [...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )

            # 2. click a result: a new grid, searched with that item, which ranks first
            clicked = ids[4]
            page.locator("#results .result").nth(4).click()
            sync_api.expect(page.locator("#status")).to_contain_text(f"for item {clicked}")
            new_ids = _result_ids(page)
            assert new_ids[0] == clicked and new_ids != ids
            assert f"/images/{clicked}" in page.locator("#query-image").get_attribute("src")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)

            # 3. drag and drop an image onto the drop zone
            data = base64.b64encode(Path(service.item(7).ref).read_bytes()).decode()
            transfer = page.evaluate_handle(
                """(b64) => {
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer();
                    dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
                    return dt;
                }""",
                data,
            )
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            sync_api.expect(page.locator("#status")).to_contain_text("for dropped.png")
            assert _result_ids(page)[0] == 7

            # 4. a file that is not an image: a readable error, no crash
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.set_input_files("#file-input", str(bad))
            sync_api.expect(page.locator("#status")).to_contain_text("not an image")
        finally:
            browser.close()
    # the server's 400 for the bad upload is logged by Chromium as a failed resource load
    assert [e for e in errors if "400" not in e] == []


def test_api_docs_render_without_a_network(server_url):
    url, _ = server_url
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            outside: list[str] = []

            def only_loopback(route) -> None:
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.goto(f"{url}/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert {"/search", "/images", "/health"} <= {p.replace("\u200b", "") for p in paths}
            assert outside == []
        finally:
            browser.close()
