"""Embedding extraction: run a model over a dataset in batches, as fast as the model allows.

The pipeline (:func:`embed_dataset`):

- images are decoded and preprocessed in DataLoader worker processes while the model runs on
  the previous batch (:func:`default_num_workers` chooses how many);
- batches run under ``torch.inference_mode()`` (no autograd bookkeeping);
- on the CPU, convolutional networks run in channels-last memory layout, which oneDNN's
  convolutions prefer (``scripts/bench_embed.py``: EfficientNet-Lite0's forward pass at 224 px
  on 2 cores ran 1.6-1.7x faster than in the default layout);
- progress is reported after every batch with the images per second so far
  (:class:`EmbedProgress`), for a progress bar with its rate and ETA in the command line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from retrieval.errors import USER_ERRORS

logger = logging.getLogger(__name__)

#: Images per forward pass when embedding small images (up to :data:`BATCH_PIXELS` in all).
DEFAULT_BATCH_SIZE = 256
#: Pixels per forward pass (a batch of 256 images of 64 x 64): bounds the memory of a batch
#: of large images (16 images at 224 px).
BATCH_PIXELS = 256 * 64 * 64
#: Most DataLoader workers chosen automatically.
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class EmbedProgress:
    """Where embedding stands after a batch.

    Attributes:
        done: images embedded so far.
        total: images to embed.
        seconds: wall time since embedding started (worker start-up included).
    """

    done: int
    total: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        """Seconds left at the rate so far."""
        rate = self.images_per_second
        return (self.total - self.done) / rate if rate > 0 else float("inf")


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


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reads_files(dataset: Dataset) -> bool:
    """True when the items are decoded from files (an image dataset whose store has ``paths``,
    as :class:`data.datasets.FileStore`), so decoding is worth moving to worker processes."""
    return hasattr(getattr(dataset, "store", None), "paths")


def default_num_workers(dataset: Dataset, device: torch.device | str = "cpu") -> int:
    """DataLoader workers for embedding ``dataset`` on ``device``.

    - 0 for items already in memory (Fashion-MNIST) or a single batch: starting processes
      costs more than it saves;
    - on the CPU, one worker per 4 cores (at least 1): the model's forward pass already uses
      every core through torch's threads, and at 224 px decoding a JPEG and resizing it takes
      about a tenth of a forward pass, so a few decoding processes keep up
      (``scripts/bench_embed.py`` measures it);
    - on a GPU, a worker per core (at most :data:`MAX_AUTO_WORKERS`): decoding is then the
      bottleneck.
    """
    if not reads_files(dataset) or len(dataset) <= 1:
        return 0
    cores = cpu_count()
    if torch.device(device).type == "cpu":
        return max(1, cores // 4)
    return max(1, min(cores, MAX_AUTO_WORKERS))


def default_batch_size(image_size: int) -> int:
    """Images per forward pass for ``image_size`` px inputs: :data:`DEFAULT_BATCH_SIZE`, fewer
    for large images so that a batch holds at most :data:`BATCH_PIXELS` pixels.

    Example:
        >>> default_batch_size(28), default_batch_size(224), default_batch_size(2000)
        (256, 20, 1)
    """
    return max(1, min(DEFAULT_BATCH_SIZE, BATCH_PIXELS // (image_size * image_size)))


def uses_channels_last(model: nn.Module) -> bool:
    """True when the model's convolution weights are in channels-last layout."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _to_layout(model: nn.Module, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)


def _has_convolutions(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


@dataclass(frozen=True)
class _Failed:
    """A user error (a corrupt image, ...) raised while reading an item in a worker process."""

    error: type[Exception]
    message: str


class _Guarded(Dataset):
    """``dataset`` whose items are read in worker processes: a user error comes back as a
    :class:`_Failed` and is raised again, unchanged, in the main process. (The DataLoader would
    raise it with the worker's traceback in its message, and the command line prints user
    errors' messages as one line.)"""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except USER_ERRORS as exc:
            return _Failed(type(exc), str(exc))


def _collate(items: list):
    failed = next((item for item in items if isinstance(item, _Failed)), None)
    return failed if failed is not None else default_collate(items)


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_progress: Callable[[EmbedProgress], None] | None = None,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Embeddings of every item of ``dataset`` (items ``(image, label)``), float32 ``(N, dim)``.

    Args:
        model: maps ``(batch, 3, H, W)`` to ``(batch, dim)``; run in eval mode, then put back
            in the mode and memory layout it had.
        dataset: yields ``(image_tensor, label)``.
        batch_size: images per forward pass; default :func:`default_batch_size` of the first
            image's size.
        device: where to run the model.
        num_workers: DataLoader worker processes decoding images; default
            :func:`default_num_workers` (none for a single batch).
        on_batch: called with the number of images after each batch.
        on_progress: called with an :class:`EmbedProgress` after each batch.
        channels_last: run in channels-last layout; default on the CPU for convolutional
            networks not in training mode (a model being trained keeps its parameters as
            they are).
    """
    device = torch.device(device)
    n = len(dataset)
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if batch_size is None:
        batch_size = default_batch_size(int(dataset[0][0].shape[-1])) if n else DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if channels_last is None:
        channels_last = device.type == "cpu" and not model.training and _has_convolutions(model)
    was_training, was_channels_last = model.training, uses_channels_last(model)
    model.eval().to(device)
    if channels_last != was_channels_last:
        _to_layout(model, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = -(-n // batch_size)
    if num_workers is None:  # one batch: nothing to overlap its decoding with
        num_workers = default_num_workers(dataset, device) if batches > 1 else 0
    num_workers = min(num_workers, batches)  # no idle workers
    loader = DataLoader(
        _Guarded(dataset) if num_workers else dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate if num_workers else None,
        pin_memory=device.type == "cuda",
    )
    logger.info(
        "embedding %d images on %s: batches of %d, %d decoding worker(s)%s",
        n,
        device,
        batch_size,
        loader.num_workers,
        ", channels-last" if channels_last else "",
    )
    out, done, start = [], 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                if isinstance(batch, _Failed):
                    raise batch.error(batch.message)
                images = batch[0]
                x = images.to(device, non_blocking=True)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=fmt)
                out.append(model(x).float().cpu())
                done += len(images)
                if on_batch is not None:
                    on_batch(len(images))
                if on_progress is not None:
                    on_progress(EmbedProgress(done, n, time.perf_counter() - start))
    finally:
        if channels_last != was_channels_last:
            _to_layout(model, was_channels_last)
        model.train(was_training)
    if not out:
        dim = getattr(model, "output_dim", getattr(model, "embedding_dim", 0))
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def embed_images(
    model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Embeddings of a batch of already-transformed images ``(batch, 3, H, W)``, in the
    model's own memory layout (see :func:`uses_channels_last`)."""
    model.eval().to(device)
    x = images.to(device)
    if uses_channels_last(model) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(x).float().cpu().numpy()
