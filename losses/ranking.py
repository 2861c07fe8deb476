r"""Ranking losses on explicit pairs and triplets (torch-style signatures).

These take the compared items directly (``loss(x1, x2, y)``, ``loss(anchor, positive,
negative)``), unlike :mod:`losses.embedding` whose losses take ``(embeddings, labels)`` and
form the pairs themselves. Margin ranking, triplet margin, hinge embedding and cosine
embedding are ``torch.nn``'s (thin subclasses: documentation and the empty-batch check).
Written here: the multiple-negatives ranking loss (sentence-transformers has it, but it is
not a dependency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_nonempty, check_reduction

#: Scale (1 / temperature) of the multiple-negatives ranking loss, as in sentence-transformers.
MNRL_SCALE = 20.0


def multiple_negatives_ranking_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    scale: float = MNRL_SCALE,
    reduction: str = "mean",
) -> Tensor:
    """In-batch softmax ranking of positives; see :class:`MultipleNegativesRankingLoss`."""
    check_nonempty(anchors, "anchors")
    check_reduction(reduction)
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives {tuple(positives.shape)} must match anchors {tuple(anchors.shape)}"
        )
    candidates = positives  # (batch, dim)
    if negatives is not None:
        if negatives.ndim == 2:
            negatives = negatives.unsqueeze(1)
        if negatives.shape[0] != anchors.shape[0] or negatives.shape[2] != anchors.shape[1]:
            raise ValueError(
                "negatives must be (batch, dim) or (batch, n_negatives, dim), "
                f"got {tuple(negatives.shape)}"
            )
        candidates = torch.cat([positives, negatives.reshape(-1, anchors.shape[1])])
    scores = scale * F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T
    target = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(scores, target, reduction=reduction)


class MarginRankingLoss(nn.MarginRankingLoss):
    r"""Hinge on the ordering of two scores (``torch.nn`` implementation).

    .. math::
        \ell_i = \max(0,\ -y_i (x_{1i} - x_{2i}) + m)

    Args:
        margin: :math:`m`, in score units.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input1, input2: ``(batch,)`` scores; target: ``(batch,)``, +1 if input1 should
          rank higher, -1 otherwise.
        - output: scalar, or ``(batch,)``.

    References:
        Herbrich, Graepel and Obermayer, "Large Margin Rank Boundaries for Ordinal
        Regression", 2000.

    Relations:
        :class:`losses.classification.HingeLoss` on the score difference;
        :class:`TripletMarginLoss` ranks distances instead of scores.

    Example:
        >>> x1, x2 = torch.tensor([0.8, 0.1]), torch.tensor([0.5, 0.4])
        >>> round(MarginRankingLoss(margin=0.5)(x1, x2, torch.tensor([1.0, 1.0])).item(), 4)
        0.5
    """

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input1, "input1")
        return super().forward(input1, input2, target)


class TripletMarginLoss(nn.TripletMarginLoss):
    r"""Triplet loss on explicit (anchor, positive, negative) triplets (``torch.nn``).

    .. math::
        \ell_i = \max\bigl(0,\ d(a_i, p_i) - d(a_i, n_i) + m\bigr),\quad
        d(x, y) = \|x - y + \epsilon\|_p

    Args:
        margin: :math:`m`, in embedding distance units.
        p: norm degree of the distance.
        eps: small constant inside the norm for stability.
        swap: use :math:`\min(d(a,n), d(p,n))` as the negative distance (Balntas et al.).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - anchor, positive, negative: ``(batch, dim)``.
        - output: scalar, or ``(batch,)``.

    References:
        Schroff, Kalenichenko and Philbin, "FaceNet", CVPR 2015; Balntas et al., "Learning
        local feature descriptors with triplets and shallow convolutional neural networks",
        BMVC 2016 (swap).

    Relations:
        :class:`losses.embedding.TripletLoss` forms the triplets from ``(embeddings,
        labels)``; :mod:`losses.miners` picks hard ones.

    Example:
        >>> a, p = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
        >>> n = torch.tensor([[0.0, 1.5]])
        >>> round(TripletMarginLoss(margin=1.0)(a, p, n).item(), 4)
        0.5
    """

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        check_nonempty(anchor, "anchor")
        return super().forward(anchor, positive, negative)


class HingeEmbeddingLoss(nn.HingeEmbeddingLoss):
    r"""Hinge on a distance: small for similar pairs, above a margin for dissimilar (``torch.nn``).

    .. math::
        \ell_i = \begin{cases} x_i & y_i = 1 \\ \max(0, m - x_i) & y_i = -1 \end{cases}

    Args:
        margin: :math:`m`, in the units of the input distance.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` distances (for example an L1 pair distance); target: ``(*)``, +-1.
        - output: scalar, or ``(*)``.

    References:
        Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an Invariant
        Mapping", CVPR 2006 (un-squared form).

    Relations:
        :class:`losses.embedding.ContrastiveLoss` is the squared version computed from
        embeddings; :class:`CosineEmbeddingLoss` uses cosine similarity.

    Example:
        >>> d = torch.tensor([0.2, 0.3])
        >>> round(HingeEmbeddingLoss(margin=1.0)(d, torch.tensor([1.0, -1.0])).item(), 4)
        0.45
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class CosineEmbeddingLoss(nn.CosineEmbeddingLoss):
    r"""Pair loss on cosine similarity (``torch.nn`` implementation).

    .. math::
        \ell_i = \begin{cases} 1 - \cos(x_{1i}, x_{2i}) & y_i = 1 \\
        \max(0, \cos(x_{1i}, x_{2i}) - m) & y_i = -1 \end{cases}

    Args:
        margin: :math:`m \in [-1, 1]`, cosine units; 0 to 0.5 is typical.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input1, input2: ``(batch, dim)``; target: ``(batch,)``, +-1.
        - output: scalar, or ``(batch,)``.

    References:
        Hadsell, Chopra and LeCun, CVPR 2006 (the contrastive idea, here on cosines).

    Relations:
        :class:`HingeEmbeddingLoss` takes precomputed distances; batch-level versions are in
        :mod:`losses.embedding`.

    Example:
        >>> x1, x2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
        >>> round(CosineEmbeddingLoss()(x1, x2, torch.tensor([1.0, -1.0])).item(), 4)
        0.5
    """

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input1, "input1")
        return super().forward(input1, input2, target)


class MultipleNegativesRankingLoss(nn.Module):
    r"""Multiple-negatives ranking loss (MNRL): softmax over in-batch candidates for each anchor.

    Written here: sentence-transformers has it but is not a dependency; PML's NT-Xent works
    on labelled batches, not on (anchor, positive) columns.

    .. math::
        \ell_i = -\log \frac{e^{s \cos(a_i, p_i)}}
        {\sum_j e^{s \cos(a_i, p_j)} + \sum_{j,k} e^{s \cos(a_i, n_{jk})}}

    Every other row's positive (and every hard negative of every row) is a negative.

    Args:
        scale: :math:`s = 1/\tau`, inverse temperature (1 / cosine units); 20 by default.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - anchors, positives: ``(batch, dim)``; negatives (optional hard negatives):
          ``(batch, dim)`` or ``(batch, n_negatives, dim)``.
        - output: scalar, or ``(batch,)``.

    References:
        Henderson et al., "Efficient Natural Language Response Suggestion for Smart Reply",
        2017; van den Oord et al., "Representation Learning with Contrastive Predictive
        Coding", 2018 (InfoNCE).

    Relations:
        MNRL is InfoNCE with in-batch negatives (also "in-batch softmax"); for labelled
        batches use :class:`losses.embedding.NTXentLoss`. Larger batches give more negatives.

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = MultipleNegativesRankingLoss(scale=1.0)
        >>> round(loss(a, a).item(), 4)
        0.3133
    """

    def __init__(self, scale: float = MNRL_SCALE, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = scale
        self.reduction = check_reduction(reduction)

    def forward(
        self, anchors: Tensor, positives: Tensor, negatives: Tensor | None = None
    ) -> Tensor:
        return multiple_negatives_ranking_loss(
            anchors, positives, negatives, self.scale, self.reduction
        )
