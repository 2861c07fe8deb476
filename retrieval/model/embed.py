"""Embedding extraction: run a model over a dataset in batches."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

#: Images per forward pass when embedding.
DEFAULT_BATCH_SIZE = 256


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings of every item of ``dataset`` (items ``(image, label)``), float32 ``(N, dim)``.

    Args:
        model: maps ``(batch, 3, H, W)`` to ``(batch, dim)``; put in eval mode here.
        dataset: yields ``(image_tensor, label)``.
        batch_size: images per forward pass.
        device: where to run the model.
        num_workers: DataLoader worker processes.
        on_batch: called with the number of images after each batch (progress bars).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for images, _ in loader:
        out.append(model(images.to(device, non_blocking=True)).float().cpu())
        if on_batch is not None:
            on_batch(len(images))
    model.train(was_training)
    if not out:
        return np.zeros((0, getattr(model, "embedding_dim", 0)), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def embed_images(
    model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Embeddings of a batch of already-transformed images ``(batch, 3, H, W)``."""
    model.eval().to(device)
    with torch.no_grad():
        return model(images.to(device)).float().cpu().numpy()
