"""The hot path of ``POST /search``: an uploaded image searched without FastAPI's per-request
machinery.

FastAPI serves ``POST /search`` through dependency resolution, form parsing into a spooled
temporary file, pydantic validation and a hop to a worker thread, which then waits for the
micro-batcher in yet another thread: on two cores that is more CPU per search than the
batched forward pass and the FAISS search together. :class:`UploadSearchPath`, an ASGI
middleware, answers the common request itself — a multipart body with one ``file`` and
optional integer ``k`` / ``nprobe`` / ``ef_search`` within their limits — from the event loop:
it reads the body, splits it with :func:`parse_form` and hands the search to a coroutine of
the server (which queues it for the micro-batcher and awaits its answer without a thread of
its own).

Every other request to the path (a search by ``id``, a ``where`` filter, a value out of range,
a form this parser does not take, the index still loading) goes to FastAPI with the body it
already read, so it gets exactly the answers and errors it always got; so does the OpenAPI
schema, which still describes the endpoint.

:func:`parse_form` is written here rather than taken from ``python-multipart`` (whose header
parser it uses): that library's streaming parser calls back into Python for every part and
header, and Starlette copies each upload into a temporary file; a search's body is one small
image and a few numbers, already in memory, which a few ``bytes.split`` calls take apart.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Form fields the hot path takes, with their inclusive ranges (the endpoint's own limits are
#: passed in for ``k``); any other field sends the request to FastAPI.
INT_FIELDS = {"k": (1, None), "nprobe": (1, None), "ef_search": (1, 65536)}
#: Longest integer the hot path reads (a longer one goes to FastAPI for its 422).
_MAX_DIGITS = 9
#: Most parts a form the hot path serves has: the file and one of each integer field.
MAX_PARTS = 1 + len(INT_FIELDS)


@dataclass(frozen=True)
class UploadSearch:
    """A search the hot path took: the uploaded image and the form's numbers."""

    filename: str
    data: bytes
    k: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type, else ``None``."""
    ctype, options = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


def parse_form(body: bytes, boundary: bytes) -> list[tuple[dict[bytes, bytes], bytes]] | None:
    """The parts of a ``multipart/form-data`` body: ``(Content-Disposition options, content)``
    each; ``None`` for anything but a plain body (a preamble, an epilogue, a part that is not
    ``form-data``, a malformed header), which the caller leaves to a complete parser.

    Example:
        >>> body = (b'--b\\r\\nContent-Disposition: form-data; name="k"\\r\\n\\r\\n3\\r\\n'
        ...         b'--b\\r\\nContent-Disposition: form-data; name="file"; filename="q.png"'
        ...         b'\\r\\nContent-Type: image/png\\r\\n\\r\\nPNG...\\r\\n--b--\\r\\n')
        >>> [(o[b"name"], data) for o, data in parse_form(body, b"b")]
        [(b'k', b'3'), (b'file', b'PNG...')]
    """
    delimiter = b"\r\n--" + boundary
    # split no further than a form of MAX_PARTS: a body of thousands of tiny parts (which
    # FastAPI refuses) then ends in one long last piece, not in work on the event loop
    chunks = (b"\r\n" + body).split(delimiter, MAX_PARTS + 1)
    # the boundary never occurs inside a part, so the pieces are: nothing before the first
    # delimiter, "\r\n" + a part after each, "--" (+ "\r\n") after the last one
    if len(chunks) < 3 or chunks[0] or chunks[-1] not in (b"--", b"--\r\n"):
        return None
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"\r\n"):
            return None
        disposition = None
        for line in head[2:].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                return None
            if name.strip().lower() == b"content-disposition":
                disposition = value
        if disposition is None:
            return None
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            return None
        parts.append((options, content))
    return parts


def upload_search(parts: list[tuple[dict[bytes, bytes], bytes]], max_k: int) -> UploadSearch | None:
    """The search a form asks for when the hot path can serve it as FastAPI would: exactly one
    ``file`` (with a file name) and at most one of each integer field (a plain field, in
    range); else ``None``."""
    file: tuple[str, bytes] | None = None
    numbers: dict[str, int] = {}
    for options, content in parts:
        name = options[b"name"]
        if name == b"file":
            filename = options.get(b"filename")
            if file is not None or not filename:
                return None
            try:
                file = (filename.decode("utf-8"), content)
            except UnicodeDecodeError:
                return None
            continue
        field = name.decode("latin-1")
        if field not in INT_FIELDS or field in numbers or b"filename" in options:
            return None  # (a number sent as a file is FastAPI's 422)
        if not content.isdigit() or len(content) > _MAX_DIGITS:
            return None
        low, high = INT_FIELDS[field]
        high = max_k if field == "k" else high
        value = int(content)
        if value < low or (high is not None and value > high):
            return None
        numbers[field] = value
    if file is None:
        return None
    return UploadSearch(file[0], file[1], **numbers)


class UploadSearchPath:
    """ASGI middleware: ``POST path`` requests that :func:`upload_search` accepts are answered
    by ``search`` (awaited in the event loop); every other request goes to ``app``, a body
    already read with it.

    Args:
        app: the application behind (FastAPI).
        search: ``search(request, t0)`` makes the response of a search; ``t0`` is when the
            request arrived (``time.perf_counter``).
        ready: whether the server can search at all (else FastAPI answers, e.g. 503 loading).
        max_k: most results a search may ask for (more: FastAPI's 422).
        path: the path served.
    """

    def __init__(
        self,
        app: ASGIApp,
        search: Callable[[UploadSearch, float], Awaitable[Response]],
        ready: Callable[[], bool],
        max_k: int,
        path: str = "/search",
    ):
        self.app = app
        self.search = search
        self.ready = ready
        self.max_k = max_k
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != self.path
            or scope["method"] != "POST"
            or not self.ready()
        ):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        boundary = multipart_boundary(content_type)
        if boundary is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        try:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
        except HTTPException as exc:  # the body limit
            await JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)(
                scope, receive, send
            )
            return
        body = b"".join(chunks)
        parts = parse_form(body, boundary)
        request = upload_search(parts, self.max_k) if parts is not None else None
        if request is None:
            await self.app(scope, _replay(body, receive), send)
            return
        response = await self.search(request, t0)
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the connection says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
