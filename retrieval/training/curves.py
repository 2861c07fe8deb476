"""``curves.png`` of a run folder: the training loss and the validation metrics per epoch.

matplotlib is imported when a picture is drawn, not when the training loop is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retrieval.atomic import atomic_path


def training_curves(records: Sequence[dict], out: str | os.PathLike) -> None:
    """Write a PNG: loss (left) and validation recall@1 and MAP@R (right) per epoch.

    Args:
        records: one dict per epoch with ``epoch`` and ``loss`` (and ``val_recall@1``,
            ``val_map@r`` when the run had a validation split), as in ``metrics.jsonl``; a
            record without ``loss`` (the untrained baseline) is drawn on the right only.
        out: the PNG path, written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    trained = [r for r in records if "loss" in r]  # not the untrained baseline (epoch 0)
    ax1.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    for key in ("val_recall@1", "val_map@r"):
        if all(key in r for r in records):
            ax2.plot(epochs, [r[key] for r in records], marker="o", label=key[4:])
    ax2.set_xlabel("epoch")
    held_out = any("val_classes" in r for r in records)  # whole classes, never trained on
    ax2.set_ylabel("validation (held-out classes)" if held_out else "validation (seen classes)")
    if ax2.get_lines():
        ax2.legend()
    else:  # trained without a validation split
        ax2.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    try:
        with atomic_path(Path(out)) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
