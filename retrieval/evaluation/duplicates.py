"""Near-duplicate groups: every pair of vectors within a distance, joined into groups.

:func:`duplicate_pairs` finds every pair ``(i, j)``, ``i < j``, whose distance is at most the
threshold with an exact FAISS range search (``IndexFlatIP`` for cosine, ``IndexFlatL2`` for
l2), in blocks of queries, so memory holds one block's results, never an ``n x n`` matrix.
:func:`find_duplicates` joins the pairs into groups: the connected components of the graph
whose edges are the pairs (``scipy.sparse.csgraph.connected_components``), so two images can
share a group through a third even when they are farther apart than the threshold themselves
(single linkage, as imagededup and Immich group duplicates).

Distances follow :mod:`retrieval.evaluation.calibration`: lower is closer, ``1 - cos`` for
cosine, Euclidean for l2, so a cut-point chosen there applies here unchanged.

:func:`keep_report` says which file of each group would be kept (the largest file, or the first
in order) and which would go; nothing is ever deleted. :func:`write_json` and
:func:`write_csv` write the report atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval import atomic
from retrieval.errors import UserError

logger = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
#: How a group's kept file is chosen.
KEEP_RULES = ("largest", "first")
#: Queries per range-search block.
BLOCK = 8192
#: The search stops when a threshold links more pairs than this many per vector (on average):
#: a threshold that large groups unrelated images and would fill memory.
MAX_PAIRS_PER_VECTOR = 200
#: Columns of the CSV report.
CSV_COLUMNS = ("group", "ref", "keep", "size_bytes", "distance_to_kept")


def _prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (n, dim), got shape {x.shape}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.ascontiguousarray(x / np.maximum(norms, 1e-12))
    return x


def duplicate_pairs(
    vectors: np.ndarray,
    threshold: float,
    metric: str = "cosine",
    block: int = BLOCK,
    max_pairs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Every pair of vectors at distance at most ``threshold`` (exact range search).

    .. math::
        \{(i, j) : i < j,\ d(x_i, x_j) \le t\}, \qquad
        d = 1 - \frac{x_i \cdot x_j}{\lVert x_i \rVert \lVert x_j \rVert}
        \ \text{(cosine)} \quad\text{or}\quad \lVert x_i - x_j \rVert\ \text{(l2)}

    Cost: :math:`O(n^2 \cdot \mathrm{dim})` distance computations (BLAS), memory
    :math:`O(\mathrm{block} \cdot n)` transient plus the pairs found.

    Args:
        vectors: ``(n, dim)``.
        threshold: largest distance of a pair, >= 0.
        metric: ``cosine`` or ``l2``.
        block: queries per range search.
        max_pairs: stop with an error past this many pairs (default
            :data:`MAX_PAIRS_PER_VECTOR` per vector).

    Returns:
        ``(pairs, distances)``: int64 ``(m, 2)`` with ``i < j``, sorted; float64 ``(m,)``.

    Raises:
        UserError: a negative threshold, or one that links too many pairs.

    Example:
        >>> x = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
        >>> pairs, d = duplicate_pairs(x, 0.01)
        >>> pairs.tolist(), bool(d[0] < 1e-3)
        ([[0, 1]], True)
    """
    import faiss

    if not threshold >= 0:
        raise UserError(f"the duplicate threshold is a distance >= 0, got {threshold}")
    x = _prepare(vectors, metric)
    n, dim = x.shape
    max_pairs = MAX_PAIRS_PER_VECTOR * max(n, 1) if max_pairs is None else max_pairs
    if metric == "cosine":
        index = faiss.IndexFlatIP(dim)
        # FAISS keeps inner products strictly above the radius: 1 - ip <= t  <=>  ip >= 1 - t
        radius = float(np.nextafter(np.float32(1.0 - threshold), np.float32(-np.inf)))
    else:
        index = faiss.IndexFlatL2(dim)
        # FAISS keeps squared distances strictly below the radius: d <= t  <=>  d^2 <= t^2
        radius = float(np.nextafter(np.float32(threshold) ** 2, np.float32(np.inf)))
    index.add(x)
    found_i, found_j, found_d = [], [], []
    total = 0
    for start in range(0, n, block):
        lims, dist, ids = index.range_search(x[start : start + block], radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = ids > rows  # each pair once, no self pairs
        rows, ids, dist = rows[keep], ids[keep], dist[keep]
        total += len(rows)
        if total > max_pairs:
            raise UserError(
                f"threshold {threshold} links more than {max_pairs} pairs of {n} vectors: that "
                "groups unrelated images; choose a smaller threshold (or a calibrated cut-point)"
            )
        found_i.append(rows)
        found_j.append(ids.astype(np.int64))
        found_d.append(dist)
    if not found_i:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    raw = np.concatenate(found_d).astype(np.float64)
    d = 1.0 - raw if metric == "cosine" else np.sqrt(np.maximum(raw, 0.0))
    d = np.maximum(d, 0.0)
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], axis=1), d[order]


@dataclass(frozen=True)
class Group:
    """A group of near-duplicates: positions of its members (ascending) and the largest
    distance among its direct pairs."""

    members: tuple[int, ...]
    max_distance: float


def group_pairs(n: int, pairs: np.ndarray, distances: np.ndarray | None = None) -> list[Group]:
    """Connected components of the graph on ``n`` vertices with edges ``pairs``; only
    components of two or more, largest first (then by first member).

    Example:
        >>> [g.members for g in group_pairs(5, np.array([[0, 3], [3, 4]]))]
        [(0, 3, 4)]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    worst = np.zeros(len(sizes))
    if distances is not None and len(distances):
        np.maximum.at(worst, component[pairs[:, 0]], np.asarray(distances, dtype=np.float64))
    members: dict[int, list[int]] = {}
    for v in np.flatnonzero(sizes[component] >= 2).tolist():
        members.setdefault(int(component[v]), []).append(v)
    groups = [Group(tuple(m), float(worst[c])) for c, m in members.items()]
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0]))


def find_duplicates(vectors: np.ndarray, threshold: float, metric: str = "cosine") -> list[Group]:
    """Groups of near-duplicates: vectors joined by pairs at distance <= ``threshold``.

    See :func:`duplicate_pairs` (exact range search) and :func:`group_pairs` (connected
    components).

    Example:
        >>> x = np.array([[1, 0], [0, 1], [1, 0.001], [0.001, 1], [1, 1]], np.float32)
        >>> [g.members for g in find_duplicates(x, 0.001)]
        [(0, 2), (1, 3)]
    """
    pairs, d = duplicate_pairs(vectors, threshold, metric)
    groups = group_pairs(len(vectors), pairs, d)
    logger.info(
        "%d pairs within %g: %d groups holding %d of %d vectors",
        len(pairs),
        threshold,
        len(groups),
        sum(len(g.members) for g in groups),
        len(vectors),
    )
    return groups


# ------------------------------------------------------------------------------- the report


def file_sizes(refs: Sequence[str]) -> list[int | None]:
    """Size in bytes of each reference that is a file; None for the others (built-in images,
    missing files)."""
    out: list[int | None] = []
    for ref in refs:
        try:
            out.append(os.stat(ref).st_size if os.path.isfile(ref) else None)
        except OSError:
            out.append(None)
    return out


def keep_report(
    groups: Sequence[Group],
    refs: Sequence[str],
    keep: str = "largest",
    sizes: Sequence[int | None] | None = None,
    vectors: np.ndarray | None = None,
    metric: str = "cosine",
) -> dict:
    """Which member of each group would be kept, and which would go. Nothing is deleted.

    Args:
        groups: from :func:`find_duplicates`.
        refs: reference (file path) of each vector.
        keep: ``largest`` (the largest file; unknown sizes count as 0; ties go to the first) or
            ``first`` (the first in order).
        sizes: byte size of each reference (default :func:`file_sizes` of ``refs``).
        vectors, metric: when given, each member's distance to the kept one is reported.

    Returns:
        ``{"keep": ..., "groups": [{"group", "keep", "duplicates": [{"ref", "size_bytes",
        "distance_to_kept"}], ...}], "files_in_groups", "would_remove", "bytes_freed"}``.

    Example:
        >>> r = keep_report([Group((0, 2), 0.01)], ["a.jpg", "b.jpg", "c.jpg"], "largest",
        ...                 sizes=[10, 5, 30])
        >>> r["groups"][0]["keep"]["ref"], [d["ref"] for d in r["groups"][0]["duplicates"]]
        ('c.jpg', ['a.jpg'])
    """
    if keep not in KEEP_RULES:
        raise UserError(f"--keep is one of {', '.join(KEEP_RULES)}, got {keep!r}")
    if sizes is None:
        sizes = file_sizes(refs)
    if len(sizes) != len(refs):
        raise ValueError("sizes and refs must have the same length")
    x = _prepare(vectors, metric) if vectors is not None else None
    out_groups = []
    removed = freed = 0
    for number, g in enumerate(groups, start=1):
        members = list(g.members)
        if keep == "largest":
            kept = max(members, key=lambda m: (sizes[m] or 0, -m))
        else:
            kept = members[0]

        def entry(m: int, kept: int = kept) -> dict:
            e = {"ref": refs[m], "size_bytes": sizes[m]}
            if x is not None:
                diff = (
                    1.0 - float(x[m] @ x[kept])
                    if metric == "cosine"
                    else float(np.linalg.norm(x[m] - x[kept]))
                )
                e["distance_to_kept"] = max(diff, 0.0)
            return e

        dups = [entry(m) for m in members if m != kept]
        removed += len(dups)
        freed += sum(d["size_bytes"] or 0 for d in dups)
        out_groups.append(
            {
                "group": number,
                "size": len(members),
                "max_pair_distance": g.max_distance,
                "keep": entry(kept),
                "duplicates": dups,
            }
        )
    return {
        "keep_rule": keep,
        "groups": out_groups,
        "files_in_groups": sum(len(g.members) for g in groups),
        "would_remove": removed,
        "bytes_freed": freed,
    }


def write_json(path: str | os.PathLike, report: dict, **info) -> Path:
    """Write the report (plus ``info``: threshold, metric, source...) as JSON, atomically."""
    path = Path(path)
    atomic.write_json(path, {**info, **report})
    return path


def write_csv(path: str | os.PathLike, report: dict) -> Path:
    """One row per file in a group (:data:`CSV_COLUMNS`), the kept file first; atomic."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for g in report["groups"]:
        for e, kept in [(g["keep"], True)] + [(d, False) for d in g["duplicates"]]:
            dist = e.get("distance_to_kept")
            w.writerow(
                [
                    g["group"],
                    e["ref"],
                    "yes" if kept else "no",
                    "" if e["size_bytes"] is None else e["size_bytes"],
                    "" if dist is None else f"{dist:.6f}",
                ]
            )
    path = Path(path)
    atomic.write_text(path, buf.getvalue())
    return path
