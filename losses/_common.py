"""Shared checks and reductions for the loss modules (private)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Reductions understood by every loss written in this package.
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    """Return ``reduction`` if it is one of ``allowed``; raise ``ValueError`` otherwise."""
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return reduction


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Reduce a tensor of per-item losses the way torch losses do."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def check_nonempty(tensor: Tensor, name: str = "input") -> None:
    """Raise ``ValueError`` when ``tensor`` holds an empty batch (first dimension 0)."""
    if tensor.ndim == 0:
        return
    if tensor.shape[0] == 0 or tensor.numel() == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {tuple(tensor.shape)}); a loss needs at least "
            "one sample: drop empty batches in the data loader (drop_last=True) or skip them"
        )


def check_embeddings(embeddings: Tensor, labels: Tensor | None) -> None:
    """Check an ``(embeddings, labels)`` pair: 2-D, non-empty, one label per row."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (batch, dim), got {tuple(embeddings.shape)}")
    check_nonempty(embeddings, "embeddings")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have shape (batch,) = ({embeddings.shape[0]},), "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point:
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root with a finite (zero) gradient at 0, for distances and RMSE."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x > 0, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))
