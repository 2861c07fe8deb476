"""Searching an index with query images."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UserError

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    pass

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ search


def expand_queries(items: Sequence[str]) -> list[tuple[str, bool]]:
    """Query files, the image files of query folders (recursively), and built-in references;
    each with whether it came from a folder."""
    from data.images import is_image_file

    out: list[tuple[str, bool]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UserError(f"{p}: no image files in this folder")
            out += [(f, True) for f in found]
        else:
            out.append((item, False))
    return out


def read_query(ref: str):
    """Pixels of a query: an image file or a built-in reference (``fashion-mnist:test:0``)."""
    from data.datasets import BUILTIN, read_ref
    from data.images import read_image

    return read_ref(ref) if ref.startswith(BUILTIN + ":") else read_image(ref)


@dataclass
class QueryResult:
    """One query and its hits (:class:`retrieval.index.gallery.Hit`), best first."""

    query: str
    hits: list


def search_index(
    index_dir: str | os.PathLike,
    queries: Sequence[str],
    k: int = 10,
    model_path: str | os.PathLike | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mmap: bool = False,
    device: str = "auto",
    where: Mapping[str, object] | None = None,
) -> tuple[str, list[QueryResult]]:
    """Search an index with query images, in batches; returns the metric and the results per
    query.

    ``where`` restricts the results to the items matching a filter
    (:mod:`retrieval.index.filters`, e.g. ``{"label": ["Sneaker"]}``), inside the FAISS search.

    An image named on its own that cannot be read is an error; unreadable images of a query
    folder are skipped and listed in one warning, as when a gallery folder is indexed.

    Raises:
        UserError: a named image cannot be read, or no query image can; the filter names an
            unknown field or label.
    """
    from retrieval.serving.service import SearchService

    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    expanded = expand_queries(queries)
    named = {ref for ref, in_folder in expanded if not in_folder}
    for ref in named:  # fail early, before the model loads, on a file given by name
        if not ref.startswith("fashion-mnist:") and not Path(ref).is_file():
            read_query(ref)  # raises the reader's clear error
    service = SearchService(index_dir, model_path, device=device, mmap=mmap)
    searched, hits, skipped = service.search_files(
        [ref for ref, _ in expanded],
        k,
        nprobe=nprobe,
        ef_search=ef_search,
        read=read_query,
        where=where,
    )
    for ref, reason in skipped:
        if ref in named:
            raise UserError(reason)
    if skipped:
        shown = "; ".join(f"{ref} ({why})" for ref, why in skipped[:20])
        logger.warning(
            "skipped %d unreadable query images: %s%s",
            len(skipped),
            shown,
            " ..." if len(skipped) > 20 else "",
        )
    if not searched:
        raise UserError("none of the query images can be read")
    results = [QueryResult(ref, h) for ref, h in zip(searched, hits, strict=True)]
    return service.index.manifest.metric, results
