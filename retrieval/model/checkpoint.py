"""Checkpoints: the model's weights with everything needed to rebuild and use it.

A checkpoint is a ``torch.save`` dictionary of tensors and plain values only, so it loads with
``torch.load(..., weights_only=True)`` (no pickle from a user's file):

- ``format`` / ``version``: identify the file;
- ``model``: the :class:`~retrieval.model.networks.EmbeddingNet` state dict;
- ``model_config``: ``arch``, ``head_dim`` (the embedding head's size), ``embedding``
  (``head`` or ``features``: what is indexed), ``embedding_dim`` (length of the indexed
  vectors), ``image_size``, ``mean``, ``std``, ``stem`` (``small`` when absent), and only
  when set ``backbone_blocks`` (blocks kept) and ``pool_grid`` (side of the pooled grid);
- ``config``: the resolved training configuration;
- ``class_names``: names of the training classes;
- any extra entries the trainer adds: ``epoch``, ``metrics``; in ``last.pt`` also the
  training state ``train_config``, ``optimizer``, ``scheduler``, ``scaler``, ``loss`` (the
  loss's learnable parameters), ``rng``, ``sampler``, ``history``, ``best``, ``bad_epochs``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_path, file_sha256  # noqa: F401 (re-exported)
from retrieval.errors import UserError
from retrieval.model.networks import DEFAULT_BACKBONE_IMAGE_SIZE, EmbeddingNet, build_model

FORMAT = "metric-retrieval-checkpoint"
VERSION = 1


def save_checkpoint(
    path: str | os.PathLike, model: EmbeddingNet, model_config: dict, **entries: Any
) -> None:
    """Write a checkpoint atomically (see the module docstring for its content)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model_config),
        **entries,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_file(path: str | os.PathLike) -> Any:
    """What ``torch.save`` wrote to ``path``, read safely (``weights_only=True``).

    Raises:
        UserError: no such file, or not a ``torch.save`` file of tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file (train one with `retrieval train`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: never do that for a file of unknown
        # origin, it would run the code a pickle carries
        raise UserError(
            f"{path} is not a readable checkpoint: it is not a torch.save file, or it holds "
            "objects other than tensors and plain values (refused for safety)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any file may be given: torch.load of junk raises
        # IndexError, KeyError, ValueError ... depending on the bytes; all mean "not ours"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first[:200]})") from None


def check_checkpoint(state: Any, path: str | os.PathLike) -> dict:
    """``state`` when it is a checkpoint this version reads; UserError otherwise."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a metric-retrieval checkpoint")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer metric-retrieval; upgrade to read it")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (``weights_only=True``); clear errors for anything else."""
    return check_checkpoint(read_file(path), path)


def model_from_checkpoint(state: dict) -> EmbeddingNet:
    """Rebuild the model of a loaded checkpoint, in eval mode."""
    cfg = state["model_config"]
    try:
        model = build_model(
            cfg["arch"],
            cfg.get("head_dim", cfg["embedding_dim"]),
            cfg.get("embedding", "head"),
            stem=cfg.get("stem", "small"),
            image_size=cfg.get("image_size", DEFAULT_BACKBONE_IMAGE_SIZE),
            backbone_blocks=cfg.get("backbone_blocks"),
            pool_grid=cfg.get("pool_grid"),
        )
    except ValueError as exc:
        raise UserError(f"cannot rebuild the checkpoint's model: {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit backbone {cfg['arch']!r}: {exc}") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[EmbeddingNet, dict]:
    """``(model, checkpoint)`` from a checkpoint file; the model is on the CPU in eval mode."""
    state = load_checkpoint(path)
    return model_from_checkpoint(state), state


def preprocessing(state: dict):
    """The evaluation transform a checkpoint's model expects."""
    from retrieval.model.spec import Preprocessing

    return Preprocessing.from_dict(state["model_config"]).transform()
