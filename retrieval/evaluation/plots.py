"""Pictures: a grid of queries with their nearest neighbours.

Training curves are drawn by :mod:`retrieval.training.curves`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from retrieval.atomic import atomic_path  # noqa: E402

GOOD, BAD = "#1a9850", "#d73027"


@dataclass
class Tile:
    """One picture in a grid: a uint8 ``(3, H, W)`` image, its caption, and whether it is a
    correct neighbour (None when unknown: the frame stays neutral)."""

    image: torch.Tensor
    caption: str
    correct: bool | None = None


def _show(ax, tile: Tile, title_weight: str = "normal") -> None:
    ax.imshow(tile.image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(tile.caption, fontsize=7, fontweight=title_weight)
    color = {True: GOOD, False: BAD, None: "#999999"}[tile.correct]
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3 if tile.correct is not None else 1)


def neighbour_grid(rows: Sequence[tuple[Tile, Sequence[Tile]]], out: str | os.PathLike) -> None:
    """Write a PNG: one row per query — the query, then its neighbours in rank order.

    Neighbours of the query's class are framed green, others red (when known).
    """
    if not rows:
        raise ValueError("nothing to draw")
    cols = 1 + max(len(n) for _, n in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(1.25 * cols, 1.45 * len(rows)), squeeze=False
    )
    for r, (query, neighbours) in enumerate(rows):
        _show(axes[r][0], query, "bold")
        axes[r][0].set_ylabel("query", fontsize=7)
        for c in range(1, cols):
            if c - 1 < len(neighbours):
                _show(axes[r][c], neighbours[c - 1])
            else:
                axes[r][c].axis("off")
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: str | os.PathLike) -> None:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
