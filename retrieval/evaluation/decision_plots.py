"""Pictures of decisions: calibration curves and near-duplicate groups (PNG).

matplotlib (and torch, for the thumbnails) are imported when a picture is drawn, not when this
module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from retrieval.atomic import atomic_path
from retrieval.evaluation.calibration import BEST_F1, Calibration

#: Colours of the curves (the colour-blind-safe Okabe-Ito palette).
COLOURS = {"precision": "#0072B2", "recall": "#E69F00", "f1": "#009E73", "fpr": "#CC79A7"}
#: Groups and members per group drawn by :func:`duplicate_groups`.
MAX_GROUPS, MAX_MEMBERS = 12, 8
#: Frame of the kept file, and of the others.
KEPT, OTHER = "#1a9850", "#999999"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)
    return out


def calibration_curves(cal: Calibration, out: str | os.PathLike) -> Path:
    """Two panels: precision, recall, F1 and FPR against the distance threshold, with the
    cut-points as vertical lines; and the precision-recall curve with the cut-points marked.
    """
    curve = cal.curve
    if not curve or not curve.get("distance"):
        raise ValueError("the calibration holds no curve to draw")
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("precision", "recall", "f1", "fpr"):
        ax1.plot(curve["distance"], curve[key], label=key, color=COLOURS[key], lw=1.5)
    for c in cal.cutpoints.values():
        style = "-" if c.name == BEST_F1 else ":"
        ax1.axvline(c.distance, color="#555555", ls=style, lw=1)
        ax1.annotate(c.name, (c.distance, 0.02), rotation=90, fontsize=7, ha="right", va="bottom")
    distance_name = "1 - cosine" if cal.metric == "cosine" else "euclidean distance"
    ax1.set_xlabel(f"threshold ({distance_name})")
    ax1.set_ylim(-0.02, 1.02)
    title = f"{cal.queries} queries"
    if cal.open_set_queries:
        title += f" ({cal.open_set_queries} of classes absent from the gallery)"
    ax1.set_title(title, fontsize=9)
    ax1.legend(fontsize=8, loc="center right")
    ax2.plot(curve["recall"], curve["precision"], color=COLOURS["precision"], lw=1.5)
    for c in cal.cutpoints.values():
        ax2.plot([c.recall], [c.precision], "o", color="#333333", ms=4)
        ax2.annotate(
            f" {c.name}\n d={c.distance:.3g}", (c.recall, c.precision), fontsize=7, va="top"
        )
    ax2.set_xlabel("recall")
    ax2.set_ylabel("precision")
    ax2.set_xlim(-0.02, 1.02)
    ax2.set_ylim(-0.02, 1.05)
    ax2.set_title("precision-recall", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def duplicate_groups(
    report: dict,
    read_image: Callable[[str], object],
    out: str | os.PathLike,
    max_groups: int = MAX_GROUPS,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """One row per group of a :func:`retrieval.evaluation.duplicates.keep_report`: the kept
    file first (framed green), then the others with their size and distance to it.

    Args:
        report: the keep report.
        read_image: reference -> uint8 ``(3, H, W)`` tensor (``data.datasets.read_ref``).
        out: PNG path.
        max_groups, max_members: the largest groups and members drawn (the report has all).
    """
    groups = report["groups"][:max_groups]
    if not groups:
        raise ValueError("no duplicate groups to draw")
    plt = _pyplot()
    cols = min(max_members, max(g["size"] for g in groups))
    fig, axes = plt.subplots(
        len(groups), cols, figsize=(1.3 * cols, 1.55 * len(groups)), squeeze=False
    )
    for r, g in enumerate(groups):
        entries = [(g["keep"], True)] + [(d, False) for d in g["duplicates"]]
        axes[r][0].set_ylabel(f"group {g['group']}\n({g['size']} files)", fontsize=7)
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(entries):
                ax.axis("off")
                continue
            entry, kept = entries[c]
            img = read_image(entry["ref"])  # uint8 (3, H, W)
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(("keep: " if kept else "") + _caption(entry), fontsize=6)
            for spine in ax.spines.values():
                spine.set_edgecolor(KEPT if kept else OTHER)
                spine.set_linewidth(3 if kept else 1)
    fig.tight_layout()
    return _save(fig, out)


def _caption(entry: dict) -> str:
    name = Path(entry["ref"]).name[:16]
    size = entry.get("size_bytes")
    dist = entry.get("distance_to_kept")
    details = []
    if size is not None:
        details.append(f"{size / 1024:.0f} KB")
    if dist is not None:
        details.append(f"d={dist:.3f}")
    return name + ("\n" + " ".join(details) if details else "")
