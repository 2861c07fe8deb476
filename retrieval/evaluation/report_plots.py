"""Pictures of an evaluation report: recall@k curves and a 2-D map of the embeddings.

Each function draws one PNG from plain arrays and writes it atomically; the neighbour grids
come from :func:`retrieval.evaluation.plots.neighbour_grid`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retrieval.atomic import atomic_path  # noqa: E402

#: Classes drawn with their own colour in the 2-D map; the rest share grey.
MAX_COLOURED_CLASSES = 20


def _save(fig, out: str | os.PathLike) -> None:
    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def recall_curves(
    curves: Sequence[tuple[str, Sequence[int], Sequence[float]]], out: str | os.PathLike
) -> None:
    """Recall@k against k (log scale), one line per ``(name, ks, recalls)``; writes a PNG."""
    if not curves:
        raise ValueError("no curve to draw")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ks, values in curves:
        ax.plot(ks, values, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, out)


def embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out: str | os.PathLike,
    title: str = "",
) -> None:
    """Scatter of 2-D points ``(n, 2)`` coloured by class ``(n,)``; writes a PNG.

    The :data:`MAX_COLOURED_CLASSES` most frequent classes get a colour and a legend entry;
    the others are drawn in grey.
    """
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
        raise ValueError(f"expected (n, 2) points and (n,) labels, got {points.shape}")
    values, counts = np.unique(labels, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")][:MAX_COLOURED_CLASSES]
    cmap = plt.get_cmap("tab20" if len(top) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(6.2, 5))
    rest = ~np.isin(labels, top)
    if rest.any():
        ax.scatter(*points[rest].T, s=4, c="#bbbbbb", label="other classes", linewidths=0)
    for n, label in enumerate(sorted(top.tolist())):
        mask = labels == label
        name = class_names[label] if label < len(class_names) else str(label)
        ax.scatter(*points[mask].T, s=6, color=cmap(n % cmap.N), label=name, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, out)
