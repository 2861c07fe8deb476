"""The image search HTTP service (FastAPI): search by upload or by id, add, remove, serve images.

Endpoints (OpenAPI documentation at ``/docs``, with Swagger UI served from the package so that
it works offline; schema at ``/openapi.json``):

- ``GET /``: the search page (``retrieval/web/index.html``);
- ``POST /search``: multipart ``file`` (an image) *or* ``id`` (an indexed item: "more like
  this"), ``k`` (1 .. :data:`MAX_K`), optional ``nprobe`` / ``ef_search``; ranked results;
- ``GET /images/{id}``: the indexed image as PNG, ``?size=N`` for a thumbnail. Images are looked
  up by id only: no path from the request ever reaches the file system;
- ``POST /images``: multipart ``file`` and optional ``label``: add an image (stored in the
  uploads folder), 201 with its id once the index folder is saved;
- ``DELETE /images/{id}``: remove an item, once saved;
- ``GET /health``, ``GET /stats``.

Errors are JSON ``{"detail": message}``: 400 unreadable or corrupt image, bad parameter; 404
unknown id; 413 body over the upload limit; 401 write without the API token (when one is
set); 409 a read-only (memory-mapped or on-disk) index; 422 out-of-range form values.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from data.errors import DataError
from retrieval.atomic import write_bytes
from retrieval.errors import UserError
from retrieval.index.gallery import UnknownIdError
from retrieval.serving.service import UNLABELLED, SearchService, decode_image, index_lock

logger = logging.getLogger(__name__)

#: Largest request body accepted (an uploaded image and its form fields), bytes.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Most results one search may ask for.
MAX_K = 100
#: Results when ``k`` is not given.
DEFAULT_K = 12
#: Thumbnail sides accepted by ``GET /images/{id}?size=``, pixels.
MIN_THUMB, MAX_THUMB = 16, 1024
#: Address the server binds to unless told otherwise: this machine only.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
#: Environment variable read for the API token when ``--token`` is not given.
TOKEN_ENV = "RETRIEVAL_API_TOKEN"
#: File extension of stored uploads, by PIL format.
_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI lets HTTPException out of body parsing
                    raise HTTPException(413, _too_large_text(self.max_bytes))
            return message

        await self.app(scope, limited, send)


def _too_large_text(limit: int) -> str:
    return f"the upload is larger than the {limit / 1024**2:g} MB limit"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_text(limit)}, status_code=413)


def _store_upload(data: bytes, fmt: str, folder: Path) -> Path:
    """Keep an added image under a content-derived name (never a name from the request)."""
    name = hashlib.sha256(data).hexdigest()[:32] + _EXTENSIONS.get(fmt, ".img")
    path = folder / name
    if not path.exists():
        write_bytes(path, data)
    return path.resolve()


def _png(image, size: int | None) -> bytes:
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if size is not None:
        pil.thumbnail((size, size), Image.NEAREST if max(pil.size) < size else Image.LANCZOS)
        if max(pil.size) < size:  # small images (28 px) are enlarged with hard pixel edges
            scale = size / max(pil.size)
            pil = pil.resize(
                (max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.NEAREST
            )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _read_upload(file: UploadFile) -> tuple[bytes, object, str]:
    data = file.file.read()
    try:
        image, fmt = decode_image(data, f"the upload {file.filename or ''}".strip())
    except DataError as exc:
        raise HTTPException(400, str(exc)) from None
    return data, image, fmt


def create_app(
    service: SearchService,
    uploads_dir: str | os.PathLike,
    token: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The FastAPI application around a :class:`~retrieval.serving.service.SearchService`.

    Args:
        service: the index and model.
        uploads_dir: where images added through ``POST /images`` are kept.
        token: when set, ``POST /images`` and ``DELETE /images/{id}`` need
            ``Authorization: Bearer TOKEN``.
        max_upload_bytes: request body limit (413 above it).
    """
    uploads = Path(uploads_dir)
    page = (
        resources.files("retrieval.serving").joinpath("web/index.html").read_text(encoding="utf-8")
    )
    counters = {"searches": 0, "added": 0, "removed": 0}
    counters_lock = threading.Lock()
    started = time.time()
    app = FastAPI(
        title="metric-retrieval image search",
        description="Search an image index by example; add and remove images.",
        version="1",
        docs_url=None,  # served below from the package's own copy of Swagger UI
        redoc_url=None,
    )
    swagger = resources.files("retrieval.serving").joinpath("web/swagger")
    app.mount("/static/swagger", StaticFiles(directory=str(swagger)), name="swagger")
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        status = 404 if isinstance(exc, UnknownIdError) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def require_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(
                401,
                "this endpoint needs the API token: Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def count(key: str, n: int = 1) -> None:
        with counters_lock:
            counters[key] += n

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs() -> HTMLResponse:
        """The OpenAPI documentation, with Swagger UI's files from this package (no network)."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    @app.get("/health")
    def health() -> dict:
        """Liveness: the index is loaded and how many images it holds."""
        return {"status": "ok", "items": len(service)}

    @app.get("/stats")
    def stats() -> dict:
        """What the index holds, how it was built, and what the server has done."""
        with counters_lock:
            served = dict(counters)
        return {
            **service.stats(),
            **served,
            "uptime_s": round(time.time() - started, 1),
            "max_k": MAX_K,
            "max_upload_bytes": max_upload_bytes,
            "writes_need_token": token is not None,
        }

    @app.post("/search")
    def search(
        file: Annotated[UploadFile | None, File(description="Query image.")] = None,
        id: Annotated[int | None, Form(description="Search with an indexed item instead.")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K, description="Results wanted.")] = DEFAULT_K,
        nprobe: Annotated[int | None, Form(ge=1, description="IVF lists to visit.")] = None,
        ef_search: Annotated[int | None, Form(ge=1, le=65536, description="HNSW depth.")] = None,
    ) -> dict:
        """Rank the indexed images by similarity to an uploaded image or an indexed one."""
        t0 = time.perf_counter()
        if (file is None) == (id is None):
            raise HTTPException(400, "send either an image file or the id of an indexed image")
        if file is not None:
            _, image, _ = _read_upload(file)
            query = {"filename": file.filename}
        else:
            image = service.image(id)
            query = {"id": id}
        hits = service.search([image], k, nprobe=nprobe, ef_search=ef_search)[0]
        count("searches")
        metric = service.index.manifest.metric
        return {
            "query": query,
            "metric": metric,
            "score": "similarity" if metric == "cosine" else "distance",
            "results": [
                {
                    "rank": h.rank,
                    "id": h.id,
                    "score": round(h.score, 6),
                    "label": h.label,
                    "name": Path(h.ref).name,
                    "image": f"/images/{h.id}",
                }
                for h in hits
            ],
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    @app.get("/images/{item_id}", responses={200: {"content": {"image/png": {}}}})
    def get_image(
        item_id: int,
        size: Annotated[
            int | None, Query(ge=MIN_THUMB, le=MAX_THUMB, description="Thumbnail side, pixels.")
        ] = None,
    ) -> Response:
        """An indexed image as PNG, looked up by id."""
        try:
            image = service.image(item_id)
        except DataError as exc:
            raise HTTPException(404, f"the image of item {item_id} cannot be read: {exc}") from None
        return Response(
            _png(image, size),
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.post("/images", status_code=201, dependencies=[Depends(require_token)])
    def add_image(
        file: Annotated[UploadFile, File(description="Image to add.")],
        label: Annotated[str | None, Form(max_length=200, description="Class name.")] = None,
    ) -> dict:
        """Add an image; answers once the index folder is saved (a restart keeps it)."""
        if service.read_only:
            raise HTTPException(409, service.index.read_only_reason)
        data, image, fmt = _read_upload(file)
        path = _store_upload(data, fmt, uploads)
        name = (label or "").strip() or UNLABELLED
        (new_id,) = service.add([image], [str(path)], [name])
        count("added")
        return {"id": new_id, "label": name, "image": f"/images/{new_id}", "items": len(service)}

    @app.delete("/images/{item_id}", dependencies=[Depends(require_token)])
    def remove_image(item_id: int) -> dict:
        """Remove an item; answers once the index folder is saved."""
        if service.read_only:
            raise HTTPException(409, service.index.read_only_reason)
        service.remove([item_id])
        count("removed")
        return {"removed": item_id, "items": len(service)}

    return app


def default_uploads_dir(index_dir: str | os.PathLike) -> Path:
    """Where added images go by default: ``INDEX_DIR-uploads`` beside the index folder (the
    index folder itself is replaced on every save)."""
    index_dir = Path(index_dir)
    return index_dir.parent / f"{index_dir.name}-uploads"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    uploads_dir: str | os.PathLike | None = None,
    mmap: bool = False,
    device: str = "cpu",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> None:
    """Load the index and model, then run the server until interrupted (uvicorn).

    The index folder is locked against other writers while the server runs (unless ``mmap``).
    """
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        logger.warning(
            "serving on %s without an API token: anyone who can reach it can add "
            "and remove images (set --token or %s)",
            host,
            TOKEN_ENV,
        )
    service = SearchService(index_dir, model_path, device=device, mmap=mmap)
    uploads = Path(uploads_dir) if uploads_dir is not None else default_uploads_dir(index_dir)
    app = create_app(service, uploads, token=token, max_upload_bytes=max_upload_bytes)
    with index_lock(index_dir) if not mmap else contextlib.nullcontext():
        uvicorn.run(app, host=host, port=port, log_level="info")
