"""Retrieval evaluation of embeddings: leave-one-out k-NN with FAISS, then the metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from data.datasets import ImageDataset

from retrieval.index import knn_leave_one_out
from retrieval.metrics import DEFAULT_KS, relevant_counts, summarize


def evaluate_embeddings(
    x: np.ndarray, y: np.ndarray, ks: Sequence[int] = DEFAULT_KS, metric: str = "cosine"
) -> dict[str, float]:
    """Leave-one-out retrieval metrics: every item queries all the others.

    Args:
        x: embeddings, shape ``(n, dim)``.
        y: labels, shape ``(n,)``.
        ks: the k's of recall@k.
        metric: ``cosine`` or ``l2``.

    Returns:
        ``{"recall@k": ..., "map@r": ..., "queries": n}`` (see :mod:`retrieval.metrics`).
    """
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    r = relevant_counts(y, y, leave_one_out=True)
    k = max(max(ks), int(r.max()))
    _, idx = knn_leave_one_out(x, k, metric)
    if idx.shape[1] < max(ks):
        raise ValueError(f"recall@{max(ks)} needs more than {len(x)} items")
    return summarize(y, y[idx], r, ks)


def pixel_vectors(ds: ImageDataset, size: int = 28) -> np.ndarray:
    """Raw pixels as vectors, the baseline every model must beat: ``(n, 3 * size * size)``.

    Images are resized (shorter side) and centre-cropped to ``size`` pixels.
    """
    resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    rows = []
    for i in range(len(ds)):
        img = ds.image(i)
        if img.shape[1:] != (size, size):
            img = resize(img)
        rows.append(img.flatten())
    return torch.stack(rows).float().numpy()
