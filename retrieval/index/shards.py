"""Sharded embedding: each process embeds its slice of a gallery and writes a shard.

``torchrun --nproc_per_node N -m retrieval embed SOURCE --model CKPT --shards DIR`` starts N
processes; process ``rank`` embeds the contiguous slice :func:`shard_range` of the gallery and
writes, atomically, two files in ``DIR``:

- ``shard-RRRRR-of-WWWWW.npy``: its embeddings, float32 ``(count, dim)``;
- ``shard-RRRRR-of-WWWWW.json``: ``format``/``version``, ``rank``, ``world_size``, ``start`` and
  ``stop`` (its slice of the gallery), ``total``, the gallery fingerprint, the model checkpoint's
  SHA-256 and path, the source, ``dim``, the class names, the SHA-256 of the ``.npy`` and per item
  its reference and label. The JSON is written last: a shard without it is not finished.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) the command is one process
writing ``shard-00000-of-00001``. With several, the processes join a ``torch.distributed``
process group (backend ``gloo``: only a few small objects are exchanged, the embedding itself
needs no communication, so gloo serves on GPU machines too) to check that every rank sees the
same gallery before embedding, and to wait for each other at the end.

``retrieval index build --from-shards DIR`` (:func:`build_index_from_shards`) checks that the
shards form one complete run, memory-maps their embeddings and builds the index part by part
(:meth:`retrieval.index.gallery.GalleryIndex.build_in_parts`): item ids are gallery positions,
as in an index built in one go, and IVF indexes share one trained coarse quantizer whose
inverted lists are merged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.datasets import ImageDataset
from retrieval.atomic import file_sha256, write_json, write_npy
from retrieval.errors import UserError
from retrieval.index.gallery import (
    DEFAULT_INDEX_TYPE,
    DEFAULT_MEMORY_BUDGET,
    GalleryIndex,
    GalleryPart,
)
from retrieval.model.embed import DEFAULT_BATCH_SIZE, embed_dataset
from retrieval.training.distributed import Rank, shard_range

logger = logging.getLogger(__name__)

FORMAT = "metric-retrieval-shard"
VERSION = 1
#: Backend of the process group (see the module docstring).
BACKEND = "gloo"
_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.json")


def shard_stem(rank: Rank) -> str:
    """``shard-RRRRR-of-WWWWW``: the shard files' name without the suffix."""
    return f"shard-{rank.rank:05d}-of-{rank.world_size:05d}"


def gallery_fingerprint(refs: Sequence[str], labels: np.ndarray, class_names: Sequence[str]) -> str:
    """SHA-256 of the gallery's references, labels and class names (its identity, not pixels)."""
    h = hashlib.sha256(json.dumps(list(class_names)).encode())
    for ref, label in zip(refs, labels, strict=True):
        h.update(f"{int(label)}\t{ref}\n".encode())
    return h.hexdigest()


def embed_shard(
    model: nn.Module,
    dataset: ImageDataset,
    directory: str | os.PathLike,
    rank: Rank,
    model_sha256: str,
    model_path: str = "",
    source: str = "",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Embed this rank's slice of ``dataset`` and write its shard; returns the JSON path.

    Call inside :func:`retrieval.training.distributed.process_group` when
    ``rank.world_size > 1``: the ranks first compare gallery fingerprints (a folder that
    changed between the ranks' listings would make their slices overlap or miss images), and
    wait for each other once their shards are written.

    Raises:
        UserError: the ranks see different galleries.
    """
    directory = Path(directory)
    fingerprint = gallery_fingerprint(dataset.refs, dataset.labels, dataset.class_names)
    if rank.world_size > 1:
        seen: list[str | None] = [None] * rank.world_size
        dist.all_gather_object(seen, fingerprint)
        if len(set(seen)) != 1:
            raise UserError(
                "the processes see different galleries (did the folder change while they "
                "started?); run again"
            )
    span = shard_range(len(dataset), rank)
    part = dataset.subset(np.arange(span.start, span.stop))
    logger.info(
        "rank %d/%d: embedding items %d-%d", rank.rank, rank.world_size, span.start, span.stop
    )
    emb = embed_dataset(model, part, batch_size=batch_size, device=device, on_batch=on_batch)
    stem = directory / shard_stem(rank)
    npy = stem.with_suffix(".npy")
    write_npy(npy, emb)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank.rank,
        "world_size": rank.world_size,
        "start": span.start,
        "stop": span.stop,
        "total": len(dataset),
        "gallery_sha256": fingerprint,
        "model_sha256": model_sha256,
        "model_path": model_path,
        "source": source,
        "dim": int(emb.shape[1]),
        "class_names": list(dataset.class_names),
        "embeddings_sha256": file_sha256(npy),
        "items": [{"ref": r, "label": int(y)} for r, y in zip(part.refs, part.labels, strict=True)],
    }
    out = stem.with_suffix(".json")
    write_json(out, meta)
    if rank.world_size > 1:
        dist.barrier()
    return out


@dataclass
class Shard:
    """One shard read back: its metadata and the path of its embeddings."""

    json_path: Path
    npy_path: Path
    meta: dict

    @property
    def refs(self) -> list[str]:
        return [str(it["ref"]) for it in self.meta["items"]]

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(it["label"]) for it in self.meta["items"]], dtype=np.int64)

    def vectors(self) -> np.ndarray:
        """The embeddings, memory-mapped (read from disk as they are used)."""
        return np.load(self.npy_path, mmap_mode="r", allow_pickle=False)


_SAME = ("world_size", "total", "gallery_sha256", "model_sha256", "dim", "class_names")


def read_shards(directory: str | os.PathLike, verify_checksums: bool = True) -> list[Shard]:
    """The shards of one complete ``embed --shards`` run in ``directory``, in rank order.

    Raises:
        UserError: no shards, shards of different runs (process counts, galleries or models),
            a missing rank, or damaged files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"{directory}: no such folder of shards (write them with `retrieval "
            "embed SOURCE --model CKPT --shards DIR`)"
        )
    shards = []
    for path in sorted(directory.iterdir()):
        if not _NAME.fullmatch(path.name):
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError("not a shard")
            if int(meta.get("version", 0)) > VERSION:
                raise UserError(f"{path} was written by a newer metric-retrieval; upgrade")
            missing = [k for k in (*_SAME, "rank", "start", "stop", "items") if k not in meta]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path} is damaged ({str(exc)[:200]}); embed again") from None
        shards.append(Shard(path, path.with_suffix(".npy"), meta))
    if not shards:
        raise UserError(f"{directory} holds no shard-*-of-*.json files")
    for key in _SAME:
        values = {json.dumps(s.meta[key]) for s in shards}
        if len(values) > 1:
            raise UserError(
                f"{directory} mixes shards of different runs (their {key} differ); keep the "
                "shards of one run only (delete the others, or embed into an empty folder)"
            )
    world_size = shards[0].meta["world_size"]
    ranks = [s.meta["rank"] for s in shards]
    absent = sorted(set(range(world_size)) - set(ranks))
    if absent:
        raise UserError(
            f"{directory}: rank {', '.join(map(str, absent))} of {world_size} has not written "
            "its shard (still running, or failed); run the embedding again"
        )
    shards.sort(key=lambda s: s.meta["rank"])
    total, dim = shards[0].meta["total"], shards[0].meta["dim"]
    expected = 0
    for s in shards:
        span = shard_range(total, Rank(s.meta["rank"], world_size))
        count = s.meta["stop"] - s.meta["start"]
        if (s.meta["start"], s.meta["stop"]) != (span.start, span.stop) or (
            len(s.meta["items"]) != count
        ):
            raise UserError(f"{s.json_path} is damaged (its slice does not fit); embed again")
        if not s.npy_path.is_file() or (
            verify_checksums and file_sha256(s.npy_path) != s.meta["embeddings_sha256"]
        ):
            raise UserError(f"{s.npy_path} is missing or damaged (checksum mismatch); embed again")
        if s.vectors().shape != (count, dim):
            raise UserError(f"{s.npy_path} does not hold {count} vectors of dimension {dim}")
        expected += count
    if expected != total:
        raise UserError(f"{directory}: the shards hold {expected} of {total} items; embed again")
    return shards


def build_index_from_shards(
    directory: str | os.PathLike,
    model_sha256: str,
    model_path: str = "",
    preprocessing: dict | None = None,
    metric: str = "cosine",
    index_type: str = DEFAULT_INDEX_TYPE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    seed: int = 0,
    on_disk: str | os.PathLike | None = None,
) -> GalleryIndex:
    """Build one index of all the shards in ``directory`` (see the module docstring).

    Args:
        model_sha256: of the checkpoint the index is for; the shards must be its embeddings.
        on_disk: work folder for an on-disk IVF index (see
            :meth:`~retrieval.index.gallery.GalleryIndex.build_in_parts`).

    Raises:
        UserError: see :func:`read_shards`; shards embedded with another model.
    """
    shards = read_shards(directory)
    meta = shards[0].meta
    if meta["model_sha256"] != model_sha256:
        raise UserError(
            f"the shards in {directory} were embedded with another model (checkpoint "
            f"{meta['model_path'] or '?'}, sha256 {meta['model_sha256'][:12]}); use that "
            "checkpoint, or embed again with this one"
        )
    parts = [GalleryPart(s.vectors(), s.refs, s.labels) for s in shards]
    logger.info("building from %d shards, %d vectors", len(parts), meta["total"])
    return GalleryIndex.build_in_parts(
        parts,
        meta["class_names"],
        metric=metric,
        model_sha256=model_sha256,
        model_path=model_path,
        preprocessing=preprocessing,
        index_type=index_type,
        memory_budget=memory_budget,
        seed=seed,
        on_disk=on_disk,
    )
