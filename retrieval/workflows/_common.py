"""What the workflows share: progress reporting, opening a source, embedding it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    import numpy as np

    from data.datasets import ImageDataset

logger = logging.getLogger(__name__)


#: ``progress(what, total)`` returns a function called with the number of items just done.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(what: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def open_images(
    spec: str,
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    image_size: int | None = None,
    labels: str = "from-folders",
) -> ImageDataset:
    """The images of a source (built-in, folder or CSV), filtered to ``classes``; ``labels``:
    ``from-folders`` or ``none`` (:func:`data.datasets.open_source`)."""
    from data.datasets import open_source, parse_classes

    ds = open_source(spec, split=split, root=data_root, draft_size=image_size, labels=labels)
    return ds.filter_classes(parse_classes(classes))


def embed(
    model,
    dataset: ImageDataset,
    preprocessing,
    device: str = "auto",
    what: str = "images",
    progress: ProgressFactory | None = None,
) -> np.ndarray:
    """Embeddings ``(n, dim)`` of every image of ``dataset`` with ``model``."""
    from retrieval.model.embed import embed_dataset, pick_device

    done = (progress or _no_progress)(f"embedding {what}", len(dataset))
    return embed_dataset(
        model,
        dataset.with_transform(preprocessing.transform()),
        device=pick_device(device),
        on_batch=done,
    )


class _RefStore:
    """Pixels of references (files or built-in items) on demand, for :class:`ImageDataset`."""

    def __init__(self, refs: Sequence[str]):
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, i: int):
        from data.datasets import read_ref

        return read_ref(self.refs[i])
