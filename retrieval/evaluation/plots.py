"""Pictures: a grid of queries with their nearest neighbours, and training curves."""

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


def training_curves(records: Sequence[dict], out: str | os.PathLike) -> None:
    """Loss and validation metrics per epoch, side by side."""
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    ax1.plot(epochs, [r["loss"] for r in records], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    for key in ("val_recall@1", "val_map@r"):
        if all(key in r for r in records):
            ax2.plot(epochs, [r[key] for r in records], marker="o", label=key[4:])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation (seen classes)")
    if ax2.get_lines():
        ax2.legend()
    else:  # trained without a validation split
        ax2.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: str | os.PathLike) -> None:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
