"""Typed records of what a model is and what it expects, as they cross modules.

A checkpoint stores them as plain dictionaries (``model_config``, see
:mod:`retrieval.model.checkpoint`) and an index manifest stores the preprocessing; these
records read and write exactly those dictionaries, so files written before load unchanged.
Importing this module is cheap (no torch): the command line reads them before it needs a
network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Length of the embedding head's output.
DEFAULT_EMBEDDING_DIM = 128
#: What a model outputs for indexing: the head's embedding or the features under it.
EMBEDDINGS = ("head", "features")
#: Stems: adapted to small (28-64 px) inputs, or the original ImageNet one.
STEMS = ("small", "imagenet")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: shorter side resized to ``image_size``, centre
    square crop, scaled to [0, 1], normalised per channel with ``mean`` and ``std``."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(int(values["image_size"]), tuple(values["mean"]), tuple(values["std"]))

    def as_dict(self) -> dict:
        """The dictionary stored in checkpoints and index manifests."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    def transform(self):
        """The evaluation transform: uint8 ``(3, H, W)`` -> normalised float ``(3, S, S)``."""
        from data.transforms import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)


@dataclass(frozen=True)
class ModelConfig:
    """What rebuilds a network and what it expects (a checkpoint's ``model_config``).

    Attributes:
        arch: backbone name (:data:`retrieval.model.networks.BACKBONES`).
        head_dim: length of the embedding head's output.
        embedding: what is indexed, ``head`` or ``features``.
        embedding_dim: length of the indexed vectors.
        image_size, mean, std: the preprocessing (:class:`Preprocessing`).
        stem: ``small`` or ``imagenet``.
        backbone_blocks: blocks of the backbone kept (None: all).
        pool_grid: side of the layout the last feature map is averaged over (None: 1, global).
    """

    arch: str
    head_dim: int
    embedding: str
    embedding_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem: str = "small"
    backbone_blocks: int | None = None
    pool_grid: int | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """From a checkpoint's ``model_config`` (older ones lack ``head_dim``, ``stem``)."""
        return cls(
            arch=str(values["arch"]),
            head_dim=int(values.get("head_dim", values["embedding_dim"])),
            embedding=str(values.get("embedding", "head")),
            embedding_dim=int(values["embedding_dim"]),
            image_size=int(values["image_size"]),
            mean=tuple(float(m) for m in values["mean"]),
            std=tuple(float(s) for s in values["std"]),
            stem=str(values.get("stem", "small")),
            backbone_blocks=(
                None if values.get("backbone_blocks") is None else int(values["backbone_blocks"])
            ),
            pool_grid=None if values.get("pool_grid") is None else int(values["pool_grid"]),
        )

    def as_dict(self) -> dict:
        """The dictionary stored in checkpoints."""
        out = {
            "arch": self.arch,
            "head_dim": self.head_dim,
            "embedding": self.embedding,
            "embedding_dim": self.embedding_dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "stem": self.stem,
        }
        if self.backbone_blocks is not None:  # only then: older checkpoints stay identical
            out["backbone_blocks"] = self.backbone_blocks
        if self.pool_grid is not None:
            out["pool_grid"] = self.pool_grid
        return out

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.mean, self.std)
