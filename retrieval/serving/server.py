"""The image search HTTP service (FastAPI): search by upload or by id, add, remove, serve images.

Endpoints (OpenAPI documentation at ``/docs``, with Swagger UI served from the package so that
it works offline; schema at ``/openapi.json``):

- ``GET /``: the search page (``retrieval/serving/web/index.html``);
- ``POST /search``: multipart ``file`` (an image) *or* ``id`` (an indexed item: "more like
  this"), ``k`` (1 .. :data:`MAX_K`), optional ``nprobe`` / ``ef_search``, optional ``where``
  (a filter, see below); ranked results;
- ``POST /search/batch``: several ``files`` with the same parameters; one answer per file, an
  unreadable file failing alone;
- ``GET /labels``: the labels of the live items, with their counts (the page's filter);
- ``GET /images/{id}``: the indexed image as PNG, ``?size=N`` for a thumbnail (cached). Images
  are looked up by id only: no path from the request ever reaches the file system;
- ``POST /images``: multipart ``file`` and optional ``label``: add an image (stored in the
  uploads folder), 201 with its id once the index folder is saved;
- ``DELETE /images/{id}``: remove an item, once saved;
- ``GET /health`` (503 ``{"status": "loading"}`` until the index and model are loaded),
  ``GET /stats``.

A ``where`` form field restricts a search to the items it matches (:mod:`retrieval.index.filters`,
filtered inside FAISS): ``FIELD=VALUE`` or ``FIELD=V1,V2`` (``label=Sneaker``), or a JSON object
(``{"label": ["Sneaker", "Sandal"]}``); the field repeated ANDs its conditions. The answer
echoes the filter it applied under ``where``; an unknown field or label is a 400.

Searches are micro-batched (:mod:`retrieval.serving.batching`): the requests waiting together
(up to ``max_batch``; a batch waits at most ``max_wait_ms`` for requests still being decoded)
share one forward pass and one FAISS call per distinct ``(k, nprobe, ef_search, where)``; each
gets the results it would get alone. The batch's worker thread decodes and embeds, a second
thread searches the index and answers, so consecutive batches overlap. The common request, an
upload with at most ``k`` / ``nprobe`` / ``ef_search``, takes a hot path
(:mod:`retrieval.serving.fastpath`): it is read and answered in the event loop, and its image,
when small, is decoded by the batch's worker with the rest of the batch: no request thread and
no FastAPI machinery per search. Other decodes (large uploads, ``/search/batch``, thumbnails)
run in threads, at most ``max_decodes`` at once (each decode of a large image can take hundreds
of MB). Answers carry ``Server-Timing`` (decode, queue, embed, search, total).

Errors are JSON ``{"detail": message}``: 400 unreadable or corrupt image, bad parameter; 404
unknown id; 413 body over the upload limit; 401 write without the API token (when one is
set); 409 a read-only (memory-mapped or on-disk) index; 422 out-of-range form values; 503 still
loading.

Importing this module does not import torch or FAISS (the server answers ``/health`` while they
load): :mod:`retrieval.serving.service` is imported when the service is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from data.errors import DataError
from retrieval.atomic import write_bytes
from retrieval.errors import UserError
from retrieval.serving.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT
from retrieval.serving.engine import DEFAULT_MAX_DECODES, Engine, Upload
from retrieval.serving.fastpath import UploadSearch, UploadSearchPath
from retrieval.serving.thumbnails import DEFAULT_CACHE_BYTES, encode_png

if TYPE_CHECKING:
    from retrieval.serving.service import SearchService

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
#: The interpreter's GIL switch interval while serving, seconds (Python's default: 5 ms). A
#: thread woken by a hand-off (the batch's worker, the event loop) waits at most this long for
#: a thread running Python code to let it in. Measured on 2 busy cores, 8 clients, runs
#: alternating with the default: 392 against 341 searches/s batched (medians of 5 runs each),
#: 235-240 against 208-209 unbatched (2 runs each).
SWITCH_INTERVAL = 0.001
#: Files one ``POST /search/batch`` may carry.
MAX_BATCH_FILES = 256
#: The index folder's manifest (checked before the server listens).
MANIFEST_FILE = "manifest.json"
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


def _store_upload(data: bytes, digest: str, fmt: str, folder: Path) -> Path:
    """Keep an added image under a content-derived name (never a name from the request);
    ``digest`` is the hex SHA-256 of ``data``."""
    name = digest[:32] + _EXTENSIONS.get(fmt, ".img")
    path = folder / name
    if not path.exists():
        write_bytes(path, data)
    return path.resolve()


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def server_timing(**durations: float) -> str:
    """A ``Server-Timing`` header value from durations in seconds (``decode;dur=1.2, ...``)."""
    return ", ".join(f"{name};dur={_ms(s)}" for name, s in durations.items())


def _user_error_response(exc: UserError) -> JSONResponse:
    from retrieval.index.gallery import UnknownIdError

    status = 404 if isinstance(exc, UnknownIdError) else 400
    return JSONResponse({"detail": str(exc)}, status_code=status)


def _hit_json(h) -> dict:
    return {
        "rank": h.rank,
        "id": h.id,
        "score": round(h.score, 6),
        "label": h.label,
        "name": Path(h.ref).name,
        "image": f"/images/{h.id}",
    }


_calibrations: dict[str, tuple[float, object]] = {}


def decision_of(service: SearchService, hits) -> dict:
    """``{"decision": label or "no match", "cutpoint": {...}}`` when the index folder is
    calibrated (``retrieval calibrate``; re-read when the file changes), else ``{}``."""
    import numpy as np

    from retrieval.evaluation.calibration import CALIBRATION_FILE, Calibration, match, to_distance

    path = Path(service.index_dir) / CALIBRATION_FILE
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    cached = _calibrations.get(str(path))
    if cached is None or cached[0] != mtime:
        cached = (mtime, Calibration.load(service.index_dir))
        _calibrations[str(path)] = cached
    cut = cached[1].cutpoint()
    metric = service.index.manifest.metric
    if hits:
        dist = to_distance(np.array([hits[0].score]), metric, similarity=metric == "cosine")
        decision = match(dist, [hits[0].label], cut)[0]
    else:
        decision = match(np.array([np.inf]), [None], cut)[0]
    return {"decision": decision, "cutpoint": {"name": cut.name, "distance": cut.distance}}


def create_app(
    service: SearchService | Future,
    uploads_dir: str | os.PathLike,
    token: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = 1000 * DEFAULT_MAX_WAIT,
    max_decodes: int = DEFAULT_MAX_DECODES,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> FastAPI:
    """The FastAPI application around a :class:`~retrieval.serving.service.SearchService`.

    Args:
        service: the index and model, or a future of them (``/health`` answers 503
            ``loading`` and the other endpoints 503 until it is done).
        uploads_dir: where images added through ``POST /images`` are kept.
        token: when set, ``POST /images`` and ``DELETE /images/{id}`` need
            ``Authorization: Bearer TOKEN``.
        max_upload_bytes: request body limit (413 above it).
        max_batch: most searches sharing one forward pass; 1 turns batching off.
        max_wait_ms: longest a search waits for others to join its batch, milliseconds.
        max_decodes: uploads and thumbnails decoded at once.
        cache_bytes: size of the thumbnail cache, bytes.
    """
    engine = Engine(service, max_batch, max_wait_ms / 1000, max_decodes, cache_bytes)
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
    app.state.engine = engine
    swagger = resources.files("retrieval.serving").joinpath("web/swagger")
    app.mount("/static/swagger", StaticFiles(directory=str(swagger)), name="swagger")

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return _user_error_response(exc)

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

    def decode_upload(file: UploadFile, service: SearchService) -> tuple[bytes, object, str]:
        """The upload's bytes, its pixels (uint8 tensor) and format; 400 when unreadable."""
        from retrieval.serving.service import decode_image

        data = file.file.read()
        with engine.decoding():
            try:
                image, fmt = decode_image(data, f"the upload {file.filename or ''}".strip())
            except DataError as exc:
                raise HTTPException(400, str(exc)) from None
        return data, image, fmt

    def prepared_upload(file: UploadFile, service: SearchService):
        """The upload decoded (JPEGs at a reduced scale) and preprocessed for the model."""
        from retrieval.serving.service import decode_image

        data = file.file.read()
        with engine.decoding():
            image, _ = decode_image(
                data, f"the upload {file.filename or ''}".strip(), draft_size=service.image_size
            )
            return service.prepare(image)

    def parse_filter(where: list[str] | None, service: SearchService) -> tuple[dict, tuple | None]:
        """The ``where`` form fields as a filter and its hashable form; 400 when malformed or
        naming an unknown field or label (before any image is decoded)."""
        from retrieval.index.filters import freeze, parse_where

        filt = parse_where(where or [])
        service.check_where(filt)
        return filt, freeze(filt)

    def results_body(
        service: SearchService, hits, query: dict, t0: float, where: dict | None = None
    ) -> dict:
        metric = service.index.manifest.metric
        return {
            "query": query,
            **({"where": where} if where else {}),
            "metric": metric,
            "score": "similarity" if metric == "cosine" else "distance",
            "results": [_hit_json(h) for h in hits],
            **decision_of(service, hits),
            "took_ms": _ms(time.perf_counter() - t0),
        }

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
    def health() -> JSONResponse:
        """Liveness: 503 ``loading`` until the index and model are loaded, then ``ok`` and how
        many images the index holds."""
        if engine.loading:
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            service = engine.service
        except HTTPException as exc:
            return JSONResponse({"status": "failed", "detail": exc.detail}, status_code=503)
        return JSONResponse({"status": "ok", "items": len(service)})

    @app.get("/stats")
    def stats() -> dict:
        """What the index holds, how it was built, and what the server has done."""
        service = engine.service
        with counters_lock:
            served = dict(counters)
        return {
            **service.stats(),
            **served,
            "uptime_s": round(time.time() - started, 1),
            "max_k": MAX_K,
            "max_upload_bytes": max_upload_bytes,
            "max_batch": engine.max_batch,
            "writes_need_token": token is not None,
            "thumbnail_cache": {
                "items": len(engine.thumbnails),
                "bytes": engine.thumbnails.size,
                "hits": engine.thumbnails.hits,
                "misses": engine.thumbnails.misses,
            },
        }

    @app.get("/labels")
    def labels() -> dict:
        """The labels of the indexed images and how many images carry each (labels with no
        image left out): the values of a ``where`` filter on ``label``."""
        counts = engine.service.label_counts()
        return {"labels": [{"name": name, "count": n} for name, n in counts.items()]}

    @app.post("/search")
    def search(
        file: Annotated[UploadFile | None, File(description="Query image.")] = None,
        id: Annotated[int | None, Form(description="Search with an indexed item instead.")] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K, description="Results wanted.")] = DEFAULT_K,
        nprobe: Annotated[int | None, Form(ge=1, description="IVF lists to visit.")] = None,
        ef_search: Annotated[int | None, Form(ge=1, le=65536, description="HNSW depth.")] = None,
        where: Annotated[
            list[str] | None,
            Form(
                description="Only items matching this filter: FIELD=VALUE[,VALUE...] (fields: "
                "label, id, ref) or a JSON object of fields to values; repeated = AND."
            ),
        ] = None,
    ) -> JSONResponse:
        """Rank the indexed images by similarity to an uploaded image or an indexed one."""
        from retrieval.serving.service import Query as SearchQuery

        t0 = time.perf_counter()
        service = engine.service
        if (file is None) == (id is None):
            raise HTTPException(400, "send either an image file or the id of an indexed image")
        filt, frozen = parse_filter(where, service)
        with engine.arriving():
            if file is not None:
                image = prepared_upload(file, service)
                query = {"filename": file.filename}
            else:
                with engine.decoding():
                    image = service.prepare(service.image(id))
                query = {"id": id}
            t_decoded = time.perf_counter()
            futures = engine.submit([SearchQuery(image, k, nprobe, ef_search, frozen)])
        (answer,) = engine.results(futures)
        if isinstance(answer, BaseException):
            raise answer
        count("searches")
        body = results_body(service, answer.hits, query, t0, filt)
        waited = time.perf_counter() - t_decoded - answer.embed_s - answer.search_s
        timing = server_timing(
            decode=t_decoded - t0,
            queue=max(0.0, waited),
            embed=answer.embed_s,
            search=answer.search_s,
            total=time.perf_counter() - t0,
        )
        return JSONResponse(
            body,
            headers={
                "Server-Timing": f'{timing}, batch;desc="{answer.batch_size}"',
            },
        )

    async def search_upload(request: UploadSearch, t0: float) -> Response:
        """What :func:`search` answers for an upload, served from the event loop by
        :class:`~retrieval.serving.fastpath.UploadSearchPath` (the hot path): the upload is
        decoded by the micro-batcher's worker, with the rest of its batch."""
        service = engine.service
        k = DEFAULT_K if request.k is None else request.k
        what = f"the upload {request.filename}".strip()
        t_queued = time.perf_counter()
        try:
            answer = await engine.search_upload(
                Upload(request.data, what, k, request.nprobe, request.ef_search)
            )
        except DataError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        except UserError as exc:
            return _user_error_response(exc)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
        except Exception as exc:  # outside FastAPI here: answer in JSON, log the traceback
            logger.exception("POST /search failed")
            return JSONResponse({"detail": f"internal error: {exc!r}"}, status_code=500)
        count("searches")
        body = results_body(service, answer.hits, {"filename": request.filename}, t0)
        work = answer.decode_s + answer.embed_s + answer.search_s
        timing = server_timing(
            decode=answer.decode_s,
            queue=max(0.0, time.perf_counter() - t_queued - work),
            embed=answer.embed_s,
            search=answer.search_s,
            total=time.perf_counter() - t0,
        )
        return JSONResponse(
            body, headers={"Server-Timing": f'{timing}, batch;desc="{answer.batch_size}"'}
        )

    @app.post("/search/batch")
    def search_batch(
        files: Annotated[list[UploadFile], File(description="Query images.")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="Results wanted.")] = DEFAULT_K,
        nprobe: Annotated[int | None, Form(ge=1, description="IVF lists to visit.")] = None,
        ef_search: Annotated[int | None, Form(ge=1, le=65536, description="HNSW depth.")] = None,
        where: Annotated[
            list[str] | None,
            Form(
                description="Only items matching this filter: FIELD=VALUE[,VALUE...] (fields: "
                "label, id, ref) or a JSON object of fields to values; repeated = AND."
            ),
        ] = None,
    ) -> JSONResponse:
        """Search with several images at once (the same parameters for all): one answer per
        file, in order; a file that cannot be read gets an ``error`` instead of results."""
        from retrieval.serving.service import Query as SearchQuery

        t0 = time.perf_counter()
        service = engine.service
        if len(files) > MAX_BATCH_FILES:
            raise HTTPException(400, f"send at most {MAX_BATCH_FILES} files per batch")
        filt, frozen = parse_filter(where, service)
        answers: list = [None] * len(files)
        futures, positions = [], []
        with engine.arriving():
            for pos, f in enumerate(files):
                try:
                    image = prepared_upload(f, service)
                    query = SearchQuery(image, k, nprobe, ef_search, frozen)
                except DataError as exc:
                    answers[pos] = exc
                    continue
                futures += engine.submit([query])  # batched with whatever else is arriving
                positions.append(pos)
            t_decoded = time.perf_counter()
        for pos, answer in zip(positions, engine.results(futures), strict=True):
            answers[pos] = answer
        out = []
        for f, answer in zip(files, answers, strict=True):
            query = {"filename": f.filename}
            if isinstance(answer, DataError | UserError):
                out.append({"query": query, "error": str(answer)})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out.append({"query": query, "results": [_hit_json(h) for h in answer.hits]})
        count("searches", len(positions))
        good = [a for a in answers if not isinstance(a, BaseException)]
        metric = service.index.manifest.metric
        timing = server_timing(
            decode=t_decoded - t0,
            embed=max((a.embed_s for a in good), default=0.0),  # the batches overlap
            search=max((a.search_s for a in good), default=0.0),
            total=time.perf_counter() - t0,
        )
        return JSONResponse(
            {
                "metric": metric,
                "score": "similarity" if metric == "cosine" else "distance",
                **({"where": filt} if filt else {}),
                "queries": out,
                "took_ms": _ms(time.perf_counter() - t0),
            },
            headers={"Server-Timing": timing},
        )

    @app.get("/images/{item_id}", responses={200: {"content": {"image/png": {}}}})
    def get_image(
        item_id: int,
        size: Annotated[
            int | None, Query(ge=MIN_THUMB, le=MAX_THUMB, description="Thumbnail side, pixels.")
        ] = None,
    ) -> Response:
        """An indexed image as PNG, looked up by id; ``size`` fits it into a square of that side
        (thumbnails are cached)."""
        t0 = time.perf_counter()
        service = engine.service
        service.item(item_id)  # 404 for an unknown or removed id, before the cache
        key = (item_id, size)
        data = engine.thumbnails.get(key)
        cached = data is not None
        if data is None:
            with engine.decoding():
                try:
                    pil = service.image_pil(item_id, draft_size=size)
                except DataError as exc:
                    raise HTTPException(
                        404, f"the image of item {item_id} cannot be read: {exc}"
                    ) from None
                data = encode_png(pil, size)
            engine.thumbnails.put(key, data)
        timing = server_timing(total=time.perf_counter() - t0)
        return Response(
            data,
            media_type="image/png",
            headers={
                "Cache-Control": "private, max-age=3600",
                "Server-Timing": f'{timing}, cache;desc="{"hit" if cached else "miss"}"',
            },
        )

    @app.post("/images", status_code=201, dependencies=[Depends(require_token)])
    def add_image(
        file: Annotated[UploadFile, File(description="Image to add.")],
        label: Annotated[str | None, Form(max_length=200, description="Class name.")] = None,
    ) -> dict:
        """Add an image; answers once the index folder is saved (a restart keeps it)."""
        from retrieval.serving.service import UNLABELLED

        service = engine.service
        if service.read_only:
            raise HTTPException(409, service.index.read_only_reason)
        data, image, fmt = decode_upload(file, service)
        digest = hashlib.sha256(data).hexdigest()
        path = _store_upload(data, digest, fmt, uploads)
        name = (label or "").strip() or UNLABELLED
        (new_id,) = service.add([image], [str(path)], [name], sha256=[digest])
        count("added")
        return {"id": new_id, "label": name, "image": f"/images/{new_id}", "items": len(service)}

    @app.delete("/images/{item_id}", dependencies=[Depends(require_token)])
    def remove_image(item_id: int) -> dict:
        """Remove an item; answers once the index folder is saved."""
        service = engine.service
        if service.read_only:
            raise HTTPException(409, service.index.read_only_reason)
        service.remove([item_id])
        engine.thumbnails.discard(lambda key: key[0] == item_id)
        count("removed")
        return {"removed": item_id, "items": len(service)}

    # the last added runs first: the body limit, then the hot path of POST /search
    app.add_middleware(
        UploadSearchPath, search=search_upload, ready=lambda: engine.ready, max_k=MAX_K
    )
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
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


def check_servable(
    index_dir: str | os.PathLike, model_path: str | os.PathLike | None = None
) -> None:
    """The quick checks made before the server listens (without torch or FAISS): the index
    folder has a manifest, and the model (given, or the one it names) exists. Loading checks
    the rest (checksums, the model's hash).

    Raises:
        UserError: either is missing.
    """
    manifest = Path(index_dir) / MANIFEST_FILE
    if not manifest.is_file():
        raise UserError(
            f"{index_dir} is not an index folder (no {MANIFEST_FILE}); build one "
            "with `retrieval index build`"
        )
    if model_path is None:
        try:
            model_path = json.loads(manifest.read_text(encoding="utf-8"))["model_path"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # loading gives the full message
    from retrieval.model.resolve import NATIVE_IMAGE_SIZE

    if str(model_path).partition(":")[0] in NATIVE_IMAGE_SIZE:
        return  # a named model: resolved when loading
    if not Path(model_path).is_file():
        raise UserError(f"the model {model_path} is gone; pass --model MODEL")


def load_service(
    index_dir: str | os.PathLike,
    model_path: str | os.PathLike | None,
    device: str,
    mmap: bool,
    max_batch: int,
    locks: contextlib.ExitStack,
) -> SearchService:
    """Lock the index folder (unless ``mmap``), load the index and model, set the thread
    counts for ``max_batch`` and warm the model up (the first search as fast as the tenth)."""
    from retrieval.serving.service import SearchService, configure_threads, index_lock

    t0 = time.perf_counter()
    if not mmap:
        locks.enter_context(index_lock(index_dir))
    configure_threads(batched=max_batch > 1)
    service = SearchService(index_dir, model_path, device=device, mmap=mmap)
    service.warm_up(sorted({1, min(8, max_batch), max_batch}))
    logger.info(
        "loaded %s (%d images) in %.1f s", index_dir, len(service), time.perf_counter() - t0
    )
    return service


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
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = 1000 * DEFAULT_MAX_WAIT,
    max_decodes: int = DEFAULT_MAX_DECODES,
) -> None:
    """Run the server until interrupted (uvicorn), loading the index and model meanwhile.

    The server listens at once and answers ``/health`` with 503 ``loading`` while a thread
    imports torch and FAISS, loads the index and model and warms the model up; then with
    ``ok``. If loading fails, the server stops and the error is raised here. The index folder
    is locked against other writers while the server runs (unless ``mmap``). The interpreter's
    GIL switch interval is :data:`SWITCH_INTERVAL` meanwhile.

    Raises:
        UserError: the index or model cannot be loaded (also checked before listening: the
            index folder and the model file exist).
    """
    import uvicorn

    check_servable(index_dir, model_path)
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        logger.warning(
            "serving on %s without an API token: anyone who can reach it can add "
            "and remove images (set --token or %s)",
            host,
            TOKEN_ENV,
        )
    uploads = Path(uploads_dir) if uploads_dir is not None else default_uploads_dir(index_dir)
    loaded: Future = Future()
    app = create_app(
        loaded,
        uploads,
        token=token,
        max_upload_bytes=max_upload_bytes,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_decodes=max_decodes,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))

    with contextlib.ExitStack() as locks:

        def load() -> None:
            try:
                loaded.set_result(
                    load_service(index_dir, model_path, device, mmap, max_batch, locks)
                )
            except BaseException as exc:  # noqa: BLE001 - raised again below
                loaded.set_exception(exc)
                server.should_exit = True

        loader = threading.Thread(target=load, name="load-index", daemon=True)
        loader.start()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            server.run()
        finally:
            sys.setswitchinterval(switch_interval)
            app.state.engine.close()
        loader.join()
        exc = loaded.exception()
        if exc is not None:
            raise exc
