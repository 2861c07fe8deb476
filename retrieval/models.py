"""The embedding network: a backbone that maps images to features, and a head that maps features
to an L2-normalised embedding.

Backbones (``BACKBONES``):

- ``small``: a batch-normalised convnet for small inputs (28-64 px). It pools its last feature
  map to a coarse ``grid x grid`` layout instead of a global average, so the embedding keeps
  *where* things are — for silhouettes such as Fashion-MNIST's, layout is most of the signal.
- ``resnet18``: torchvision's ResNet-18 with a small-image stem (3x3 stride-1 first convolution,
  no max-pool), for 32-64 px inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

#: Length of the embedding vector.
DEFAULT_EMBEDDING_DIM = 128


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
        embedding_dim: length of the embedding.
        normalize: L2-normalise the output (cosine geometry).

    Shape:
        input ``(batch, 3, H, W)``, output ``(batch, embedding_dim)`` with unit norm.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
        normalize: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.normalize = normalize
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))  # (batch, embedding_dim)
        return F.normalize(z, dim=1) if self.normalize else z


def build_model(arch: str = "small", embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` on backbone ``arch`` (see ``BACKBONES``)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}")
    backbone, feature_dim = BACKBONES[arch]()
    return EmbeddingNet(backbone, feature_dim, embedding_dim)
