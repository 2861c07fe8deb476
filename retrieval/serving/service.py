"""Searching an index with images, shared by the command line and the server.

:class:`SearchService` pairs an index folder with the model its vectors came from (checked by
SHA-256 when loading), embeds query images, searches, and adds or removes images, persisting
every change before it returns.

Concurrency (the server calls it from many threads): searches share a read lock, changes take
the write lock only while the in-memory index changes, so no search ever sees a half-applied
change. Changes are serialised by a writer mutex and saved (atomically, under the read lock, so
searches continue meanwhile) before the call returns: a change that was acknowledged survives a
restart. If saving fails, the in-memory index is reloaded from the folder, so memory and disk
agree again. Between processes, :func:`~retrieval.index.lock.index_lock` keeps two writers (a
server and ``retrieval index add``, say) from overwriting each other's changes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from data import images
from data.datasets import read_ref
from data.errors import DataError
from retrieval.errors import UserError
from retrieval.index.gallery import GalleryIndex, Hit, Item, UnknownIdError, read_manifest
from retrieval.index.lock import index_lock  # noqa: F401  re-exported: its users import it here
from retrieval.model.checkpoint import file_sha256, load_model, preprocessing
from retrieval.model.embed import embed_images, pick_device

logger = logging.getLogger(__name__)

#: Label given to added images when none is given.
UNLABELLED = "unlabelled"
#: Images embedded per forward pass.
EMBED_BATCH = 64


# ------------------------------------------------------------------------------ images


def decode_image(data: bytes, what: str = "the upload") -> tuple[torch.Tensor, str]:
    """Decode image bytes to a uint8 ``(3, H, W)`` RGB tensor and PIL's format name.

    The guards of :func:`data.images.decode_image` apply (decompression bombs, corrupt data).

    Raises:
        DataError: empty, not an image, corrupt or truncated, or too large.
    """
    if not data:
        raise DataError(f"{what} is empty")
    rgb, fmt = images.decode_image(io.BytesIO(data), what)
    return pil_to_tensor(rgb), fmt


# ------------------------------------------------------------------------------ locks


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------ the service


class SearchService:
    """An index folder and the model that embeds its queries; safe to share between threads.

    Args:
        index_dir: folder from ``retrieval index build``.
        model_path: checkpoint; default the one recorded in the index's manifest.
        device: where the model runs (``auto`` | ``cpu`` | ``cuda`` | ``mps``).
        mmap: memory-map the index (read-only).
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        mmap: bool = False,
    ):
        self.index_dir = Path(index_dir)
        manifest = read_manifest(self.index_dir)
        path = Path(model_path) if model_path is not None else Path(manifest.model_path)
        if model_path is None and not path.is_file():
            raise UserError(f"the index's model {path} is gone; pass --model CHECKPOINT")
        self.model, state = load_model(path)
        self.model_path = path
        self.transform = preprocessing(state)
        self.image_size = int(state["model_config"]["image_size"])
        self.device = pick_device(device)
        self.index = GalleryIndex.load(
            self.index_dir,
            model_sha256=file_sha256(path),
            dim=state["model_config"]["embedding_dim"],
            mmap=mmap,
        )
        self._rw = ReadWriteLock()
        self._writer = threading.Lock()

    @property
    def read_only(self) -> bool:
        return self.index.read_only

    # ---------------------------------------------------------------------------- reading

    def embed(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Embeddings ``(n, dim)`` of uint8 ``(3, H, W)`` images (any sizes)."""
        out = []
        for start in range(0, len(images), EMBED_BATCH):
            batch = torch.stack(
                [self.transform(img) for img in images[start : start + EMBED_BATCH]]
            )
            out.append(embed_images(self.model, batch, self.device))
        if not out:
            return np.zeros((0, self.index.manifest.dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def search_vectors(
        self, xq: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> list[list[Hit]]:
        """Hits per query vector (one batched FAISS search)."""
        with self._rw.read():
            d, i = self.index.search(xq, k, nprobe=nprobe, ef_search=ef_search)
            return [self.index.hits(d[q], i[q]) for q in range(len(xq))]

    def search(
        self,
        images: Sequence[torch.Tensor],
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> list[list[Hit]]:
        """Hits per query image."""
        return self.search_vectors(self.embed(images), k, nprobe, ef_search)

    def item(self, item_id: int) -> Item:
        """The item with this id.

        Raises:
            UnknownIdError: no such item.
        """
        with self._rw.read():
            it = self.index.items.get(int(item_id))
            if it is None:
                raise UnknownIdError(f"no item with id {item_id} in this index")
            return Item(it.id, it.ref, it.label, it.added)

    def label_name(self, label: int) -> str:
        with self._rw.read():
            return self.index.class_names[label]

    def image(self, item_id: int) -> torch.Tensor:
        """Pixels of an indexed item, uint8 ``(3, H, W)`` (read from its reference)."""
        return read_ref(self.item(item_id).ref)

    def stats(self) -> dict:
        with self._rw.read():
            out = self.index.describe()
            out["model_sha256"] = self.index.manifest.model_sha256
            out["model_path"] = str(self.model_path)
            out["updated"] = self.index.manifest.updated
            return out

    def __len__(self) -> int:
        return len(self.index)

    # ---------------------------------------------------------------------------- changes

    def add(
        self, images: Sequence[torch.Tensor], refs: Sequence[str], labels: Sequence[str]
    ) -> list[int]:
        """Embed and add images; returns their ids once the index folder is saved."""
        return self.add_vectors(self.embed(images), refs, labels)

    def add_vectors(self, xb: np.ndarray, refs: Sequence[str], labels: Sequence[str]) -> list[int]:
        """Add embeddings with their references and label names; saved before returning."""
        if not (len(xb) == len(refs) == len(labels)):
            raise ValueError("xb, refs and labels must have the same length")
        with self._writer:
            with self._rw.write():
                label_ids = [self.index.label_id(name) for name in labels]
                ids = self.index.add(xb, refs, label_ids)
            self._persist()
        return ids.tolist()

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id; saved before returning.

        Raises:
            UserError: an unknown id (nothing is removed).
        """
        with self._writer:
            with self._rw.write():
                n = self.index.remove(ids)
            self._persist()
        return n

    def _persist(self) -> None:
        """Commit the change to the index folder (its journal, or a new snapshot); on failure
        reload the folder, so memory matches disk again."""
        t0 = time.perf_counter()
        try:
            with self._rw.read():
                self.index.commit(self.index_dir)
        except BaseException:
            logger.exception("saving %s failed; reloading the last saved state", self.index_dir)
            reloaded = GalleryIndex.load(self.index_dir)
            with self._rw.write():
                self.index = reloaded
            raise
        logger.debug("saved %s in %.3f s", self.index_dir, time.perf_counter() - t0)
