"""The embedding network: a backbone that maps images to features, and a head that maps features
to an L2-normalised embedding.

Backbones (``BACKBONES``):

- ``small``: a batch-normalised convnet for small inputs (28-64 px). It pools its last feature
  map to a coarse ``grid x grid`` layout instead of a global average, so the embedding keeps
  *where* things are — for silhouettes such as Fashion-MNIST's, layout is most of the signal.
- ``resnet18``: torchvision's ResNet-18 with a small-image stem (3x3 stride-1 first convolution,
  no max-pool), for 32-64 px inputs.

What is indexed (``embedding``):

- ``head`` (default): the L2-normalised output of the embedding head, ``embedding_dim`` long;
- ``features``: the L2-normalised backbone features under the head. The head is then a
  *projection head* used by the training loss only, as in SimCLR (Chen et al., 2020): the loss
  bends the head towards the training classes, while the features under it keep more of what
  separates classes never seen in training. On Fashion-MNIST's unseen classes 5-9 this is the
  difference between a model that transfers and one that does not (README, "Results").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

#: Length of the embedding head's output.
DEFAULT_EMBEDDING_DIM = 128
#: What a model outputs for indexing: the head's embedding or the features under it.
EMBEDDINGS = ("head", "features")


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


def _resnet18_small() -> tuple[nn.Module, int]:
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def _small() -> tuple[nn.Module, int]:
    net = SmallConvNet()
    return net, net.out_features


#: name -> factory returning ``(backbone, feature_dim)``.
BACKBONES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "small": _small,
    "resnet18": _resnet18_small,
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
    arch: str = "small", embedding_dim: int = DEFAULT_EMBEDDING_DIM, embedding: str = "head"
) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` on backbone ``arch`` (see ``BACKBONES``)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}")
    backbone, feature_dim = BACKBONES[arch]()
    return EmbeddingNet(backbone, feature_dim, embedding_dim, embedding)
