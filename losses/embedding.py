r"""Embedding losses with the uniform training-loop signature ``loss(embeddings, labels)``.

Every loss here takes ``embeddings`` of shape ``(batch, dim)`` and integer ``labels`` of shape
``(batch,)`` and forms its pairs, triplets or class proxies inside the batch. The ones backed
by pytorch-metric-learning also accept ``indices_tuple`` from a miner
(:mod:`losses.miners`): ``loss(embeddings, labels, miner(embeddings, labels))``.
Losses with learnable parameters (ArcFace, CosFace, proxies, GE2E's w and b) are modules whose
``parameters()`` must go to the optimizer; they are saved in ``state_dict()``.

Written here, because PML has no such loss: the contrastive loss in the exact
Hadsell-Chopra-LeCun form (PML's ``ContrastiveLoss`` uses un-squared hinges) and GE2E.
Everything else is PML's, through :class:`losses._pml.PMLLoss`: ``reduction='mean'`` keeps
PML's reducer for that loss (named in each docstring), ``'sum'`` sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from ._common import check_embeddings, check_reduction, reduce, safe_sqrt
from ._pml import PMLLoss, make_distance

#: Margin of the contrastive loss (Euclidean embedding units).
CONTRASTIVE_MARGIN = 1.0
#: Initial GE2E scale w and bias b (Wan et al., 2018).
GE2E_INIT_W = 10.0
GE2E_INIT_B = -5.0
#: ArcFace defaults: additive angular margin (radians) and logit scale.
ARCFACE_MARGIN = 0.5
ARCFACE_SCALE = 64.0


# --------------------------------------------------------------------------------------
# Pure functions (the math written here)
# --------------------------------------------------------------------------------------


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``(batch, batch)`` masks: positive pairs (same label, i != j), negative pairs."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = CONTRASTIVE_MARGIN,
    reduction: str = "mean",
) -> Tensor:
    """Hadsell-Chopra-LeCun loss over all pairs ``i < j``; see :class:`ContrastiveLoss`."""
    check_embeddings(embeddings, labels)
    check_reduction(reduction)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=embeddings.device)
    sq_dist = ((embeddings[i] - embeddings[j]) ** 2).sum(1)  # (n_pairs,)
    similar = labels[i] == labels[j]
    pull = 0.5 * sq_dist
    push = 0.5 * F.relu(margin - safe_sqrt(sq_dist)) ** 2
    loss = torch.where(similar, pull, push)
    if loss.numel() == 0:  # a single sample has no pair
        return embeddings.sum() * 0.0 if reduction != "none" else loss
    return reduce(loss, reduction)


def ge2e_loss(
    embeddings: Tensor,
    labels: Tensor,
    w: Tensor,
    b: Tensor,
    variant: str = "softmax",
    reduction: str = "mean",
) -> Tensor:
    """Generalized end-to-end loss against the class centroids; see :class:`GE2ELoss`."""
    check_embeddings(embeddings, labels)
    check_reduction(reduction)
    if variant not in ("softmax", "contrast"):
        raise ValueError(f"variant must be 'softmax' or 'contrast', got {variant!r}")
    _, inverse = labels.unique(return_inverse=True)  # (batch,) class index 0..K-1
    onehot = F.one_hot(inverse).to(embeddings.dtype)  # (batch, K)
    n_classes = onehot.shape[1]
    sums = onehot.T @ embeddings  # (K, dim)
    counts = onehot.sum(0)  # (K,)
    centroids = sums / counts.unsqueeze(1)
    own_count = counts[inverse] - 1  # members left once the sample is excluded
    own_centroid = (sums[inverse] - embeddings) / own_count.clamp_min(1).unsqueeze(1)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(centroids, dim=1).T  # (batch, K)
    cos_own = F.cosine_similarity(embeddings, own_centroid, dim=1)
    is_own = onehot.bool()
    cos = torch.where(is_own, cos_own.unsqueeze(1), cos)
    sim = w.clamp_min(1e-6) * cos + b  # (batch, K)
    sim_own = sim[is_own]
    if variant == "softmax":
        loss = torch.logsumexp(sim, dim=1) - sim_own
    else:
        hardest_other = torch.sigmoid(sim).masked_fill(is_own, float("-inf")).amax(1)
        loss = 1.0 - torch.sigmoid(sim_own) + hardest_other
    # anchors need a leave-one-out centroid and at least one other class
    valid = (own_count > 0) & (n_classes > 1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    return reduce(loss, reduction)


# --------------------------------------------------------------------------------------
# Losses written here
# --------------------------------------------------------------------------------------


class ContrastiveLoss(nn.Module):
    r"""Contrastive loss (Hadsell, Chopra, LeCun 2006) over every pair in the batch.

    Similar pairs are pulled together, dissimilar pairs pushed beyond a margin:

    .. math::
        \ell_{ij} = [y_i = y_j]\,\tfrac12 D_{ij}^2 + [y_i \ne y_j]\,\tfrac12 \max(0, m - D_{ij})^2,
        \qquad D_{ij} = \|x_i - x_j\|_2

    Written here: PML's ``ContrastiveLoss`` uses un-squared hinges
    :math:`[D - m_{pos}]_+, [m_{neg} - D]_+` and averages over non-zero pairs.

    Args:
        margin: :math:`m`, in embedding (Euclidean) units; embeddings are not normalised.
        reduction: over the :math:`B(B-1)/2` pairs, ``'mean'``, ``'sum'`` or ``'none'``
            (row-major order of ``torch.triu_indices``).

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``.
        - output: scalar, or ``(batch * (batch - 1) / 2,)``; squared embedding units.

    References:
        Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an Invariant
        Mapping", CVPR 2006.

    Relations:
        A single-class batch still pulls (its loss is the mean of :math:`D^2/2`).
        :class:`losses.energy.SquareSquareLoss` is the same idea on energies;
        :class:`losses.ranking.HingeEmbeddingLoss` takes precomputed pair distances.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
        >>> round(ContrastiveLoss(margin=1.0)(x, torch.tensor([0, 0, 1])).item(), 4)
        0.2083
    """

    def __init__(self, margin: float = CONTRASTIVE_MARGIN, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return contrastive_loss(embeddings, labels, self.margin, self.reduction)


class GE2ELoss(nn.Module):
    r"""Generalized end-to-end (GE2E) loss: each sample against every class centroid of the batch.

    Written here: not in torch or PML.

    .. math::
        S_{i,k} = w \cos(x_i, c_k) + b,\qquad
        \ell_i^{\text{softmax}} = -S_{i,y_i} + \log \sum_k e^{S_{i,k}},\qquad
        \ell_i^{\text{contrast}} = 1 - \sigma(S_{i,y_i}) + \max_{k \ne y_i} \sigma(S_{i,k})

    where :math:`c_k` is the mean embedding of class k in the batch and, for the sample's
    own class, the mean *without* the sample. Samples alone in their class (no
    leave-one-out centroid) are skipped; a single-class batch gives 0. Batches of N classes
    times M >= 2 samples are the intended input.

    Args:
        variant: ``'softmax'`` or ``'contrast'``.
        init_w: initial scale :math:`w` (kept > 0), learnable.
        init_b: initial bias :math:`b`, learnable.
        reduction: ``'mean'`` (over the samples that count), ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``.
        - learnable ``w``, ``b``: scalars.
        - output: scalar, or ``(batch,)``.

    References:
        Wan, Wang, Papir and Lopez Moreno, "Generalized End-to-End Loss for Speaker
        Verification", ICASSP 2018.

    Relations:
        A learnable-temperature :class:`ProxyNCALoss` whose proxies are batch centroids;
        :class:`NTXentLoss` compares samples to samples instead.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> loss = GE2ELoss()
        >>> round(loss(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.0002
    """

    def __init__(
        self,
        variant: str = "softmax",
        init_w: float = GE2E_INIT_W,
        init_b: float = GE2E_INIT_B,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if variant not in ("softmax", "contrast"):
            raise ValueError(f"variant must be 'softmax' or 'contrast', got {variant!r}")
        self.variant = variant
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return ge2e_loss(embeddings, labels, self.w, self.b, self.variant, self.reduction)


# --------------------------------------------------------------------------------------
# Losses exposed from pytorch-metric-learning
# --------------------------------------------------------------------------------------


class ArcFaceLoss(PMLLoss):
    r"""ArcFace: softmax cross-entropy with an additive angular margin on the target class.

    Exposes PML's ``ArcFaceLoss`` (which takes degrees); here the margin is in **radians**.

    .. math::
        \ell_i = -\log \frac{e^{s \cos(\theta_{y_i} + m)}}
        {e^{s \cos(\theta_{y_i} + m)} + \sum_{c \ne y_i} e^{s \cos\theta_c}},\qquad
        \cos\theta_c = \frac{x_i^\top W_c}{\|x_i\| \|W_c\|}

    (when :math:`\theta_{y_i} + m > \pi`, PML uses :math:`\cos\theta - m \sin m` to keep
    the target logit decreasing).

    Args:
        num_classes: number of classes C.
        embedding_size: dimension D.
        margin: :math:`m`, additive angular margin **in radians** (0.5 rad = 28.6 degrees).
        scale: :math:`s`, logit scale (unitless).
        reduction: ``'mean'`` (over samples), ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)``.
        - learnable ``weight``: ``(D, C)`` class centres.
        - output: scalar, or ``(batch,)``.

    References:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.

    Relations:
        :class:`CosFaceLoss` subtracts the margin from the cosine;
        :class:`losses.classification.LargeMarginSoftmaxLoss` multiplies the angle.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> loss = ArcFaceLoss(num_classes=3, embedding_size=4, margin=0.5, scale=16.0)
        >>> round(loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).item(), 4)
        15.0394
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = ARCFACE_MARGIN,
        scale: float = ARCFACE_SCALE,
        reduction: str = "mean",
    ) -> None:
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin is in radians and must lie in [0, pi/2), got {margin}")
        loss = pml_losses.ArcFaceLoss(
            num_classes=num_classes,
            embedding_size=embedding_size,
            margin=math.degrees(margin),
            scale=scale,
        )
        super().__init__(loss, reduction, per_sample=True)

    @property
    def weight(self) -> nn.Parameter:
        """Class centres :math:`W`, shape ``(embedding_size, num_classes)``."""
        return self.pml.W


class CosFaceLoss(PMLLoss):
    r"""CosFace (large margin cosine loss): the margin is subtracted from the target cosine.

    Exposes PML's ``CosFaceLoss``.

    .. math::
        \ell_i = -\log \frac{e^{s (\cos\theta_{y_i} - m)}}
        {e^{s (\cos\theta_{y_i} - m)} + \sum_{c \ne y_i} e^{s \cos\theta_c}}

    Args:
        num_classes: number of classes C.
        embedding_size: dimension D.
        margin: :math:`m`, in cosine units.
        scale: :math:`s`, logit scale.
        reduction: ``'mean'`` (over samples), ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)``; learnable ``weight``: ``(D, C)``.
        - output: scalar, or ``(batch,)``.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.

    Relations:
        :class:`ArcFaceLoss` puts the margin on the angle.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> loss = CosFaceLoss(num_classes=3, embedding_size=4, scale=16.0)
        >>> round(loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).item(), 4)
        13.8735
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64.0,
        reduction: str = "mean",
    ) -> None:
        loss = pml_losses.CosFaceLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale
        )
        super().__init__(loss, reduction, per_sample=True)

    @property
    def weight(self) -> nn.Parameter:
        """Class centres :math:`W`, shape ``(embedding_size, num_classes)``."""
        return self.pml.W


class TripletLoss(PMLLoss):
    r"""Triplet margin loss over every valid triplet of a labelled batch (PML).

    .. math::
        \ell_{apn} = \max\bigl(0,\ d(x_a, x_p) - d(x_a, x_n) + m\bigr),\quad y_a = y_p \ne y_n

    ``'mean'`` averages over the triplets with a non-zero loss (PML's ``AvgNonZeroReducer``).

    Args:
        margin: :math:`m`, in distance units (``'l2'`` on normalised embeddings: [0, 2]).
        swap: use :math:`\min(d(a,n), d(p,n))` as the negative distance.
        smooth_loss: use :math:`\log(1 + e^{\cdot})` instead of the hinge.
        distance: ``'l2'`` (Euclidean on L2-normalised embeddings) or ``'cosine'``.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``; output: scalar.

    References:
        Weinberger and Saul, "Distance Metric Learning for Large Margin Nearest Neighbor
        Classification", JMLR 2009; Schroff et al., "FaceNet", CVPR 2015.

    Relations:
        :class:`losses.ranking.TripletMarginLoss` takes explicit triplets; with the
        ``"batch-hard"`` miner it is the batch-hard loss of Hermans et al. (2017).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
        >>> round(TripletLoss(margin=0.2)(x, torch.tensor([0, 0, 1])).item(), 4)
        0.0
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        distance: str = "l2",
        reduction: str = "mean",
    ) -> None:
        loss = pml_losses.TripletMarginLoss(
            margin=margin, swap=swap, smooth_loss=smooth_loss, distance=make_distance(distance)
        )
        super().__init__(loss, reduction, per_sample=False)


class NTXentLoss(PMLLoss):
    r"""NT-Xent / InfoNCE: softmax of each positive pair against the anchor's negatives (PML).

    .. math::
        \ell_{ap} = -\log \frac{e^{s_{ap}/\tau}}
        {e^{s_{ap}/\tau} + \sum_{n: y_n \ne y_a} e^{s_{an}/\tau}},
        \qquad s = \text{cosine similarity}

    ``'mean'`` averages over positive pairs. A batch without negatives gives 0.

    Args:
        temperature: :math:`\tau > 0`, in cosine units.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)`` (two views of an image share a
          label); output: scalar.

    References:
        Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
        (SimCLR), ICML 2020; van den Oord et al., "Representation Learning with Contrastive
        Predictive Coding", 2018 (InfoNCE).

    Relations:
        Also called InfoNCE; :class:`SupConLoss` puts all positives in one term;
        :class:`losses.ranking.MultipleNegativesRankingLoss` for (anchor, positive) columns.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(NTXentLoss(temperature=0.5)(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.2965
    """

    def __init__(self, temperature: float = 0.07, reduction: str = "mean") -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(pml_losses.NTXentLoss(temperature=temperature), reduction, False)


class SupConLoss(PMLLoss):
    r"""Supervised contrastive loss: all same-label samples are positives of an anchor (PML).

    .. math::
        \ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
        \log \frac{e^{s_{ip}/\tau}}{\sum_{a \ne i} e^{s_{ia}/\tau}},\qquad s = \text{cosine}

    ``'mean'`` averages over anchors that have a positive.

    Args:
        temperature: :math:`\tau > 0`.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``; output: scalar.

    References:
        Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.

    Relations:
        The label-aware :class:`NTXentLoss`.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(SupConLoss(temperature=0.5)(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.2965
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(pml_losses.SupConLoss(temperature=temperature), reduction, False)


class MultiSimilarityLoss(PMLLoss):
    r"""Multi-similarity loss: soft weighting of positive and negative pairs (PML).

    .. math::
        \ell_i = \frac{1}{\alpha}
        \log\Bigl(1 + \sum_{p \in P_i} e^{-\alpha (S_{ip} - \lambda)}\Bigr)
        + \frac{1}{\beta} \log\Bigl(1 + \sum_{n \in N_i} e^{\beta (S_{in} - \lambda)}\Bigr)

    with cosine similarities :math:`S`; ``'mean'`` averages over anchors.

    Args:
        alpha: positive-pair weight scale :math:`\alpha`.
        beta: negative-pair weight scale :math:`\beta`.
        base: similarity offset :math:`\lambda`, cosine units.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``; output: scalar.

    References:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
        Learning", CVPR 2019.

    Relations:
        Use with the ``"multi-similarity"`` miner (as in the paper); :class:`CircleLoss`
        re-weights similarly.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(MultiSimilarityLoss()(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.1583
    """

    def __init__(
        self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, reduction: str = "mean"
    ) -> None:
        loss = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
        super().__init__(loss, reduction, per_sample=False)


class CircleLoss(PMLLoss):
    r"""Circle loss: pair similarities re-weighted by how far they are from their optimum (PML).

    .. math::
        \ell_i = \log\Bigl(1 + \sum_{n} e^{\gamma \alpha_n (s_n - \Delta_n)}
        \sum_{p} e^{-\gamma \alpha_p (s_p - \Delta_p)}\Bigr),\quad
        \alpha_p = [1 + m - s_p]_+,\ \alpha_n = [s_n + m]_+,\ \Delta_p = 1 - m,\ \Delta_n = m

    with cosine similarities; ``'mean'`` averages over anchors with a non-zero loss.

    Args:
        m: relaxation margin, cosine units.
        gamma: scale :math:`\gamma`.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``; output: scalar.

    References:
        Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
        CVPR 2020.

    Relations:
        :class:`MultiSimilarityLoss`; with one positive and one negative it is a smooth
        triplet loss.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(CircleLoss()(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.0
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, reduction: str = "mean") -> None:
        super().__init__(pml_losses.CircleLoss(m=m, gamma=gamma), reduction, per_sample=False)


class ProxyAnchorLoss(PMLLoss):
    r"""Proxy-anchor loss: each class proxy is an anchor against the batch (PML).

    .. math::
        \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Bigl(1 + \sum_{x \in X_p^+}
        e^{-\alpha (s(x, p) - \delta)}\Bigr) + \frac{1}{|P|} \sum_{p \in P}
        \log\Bigl(1 + \sum_{x \in X_p^-} e^{\alpha (s(x, p) + \delta)}\Bigr)

    :math:`P^+`: proxies of classes present in the batch; :math:`s`: cosine similarity.

    Args:
        num_classes: number of classes (proxies).
        embedding_size: dimension D.
        margin: :math:`\delta`, cosine units.
        alpha: scale :math:`\alpha`.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)``; learnable ``proxies``:
          ``(num_classes, D)``; output: scalar.

    References:
        Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.

    Relations:
        :class:`ProxyNCALoss` uses proxies as negatives of samples instead; give the
        proxies a larger learning rate (the paper uses 100x).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> loss = ProxyAnchorLoss(num_classes=3, embedding_size=4)
        >>> round(loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).item(), 4)
        34.2529
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        reduction: str = "mean",
    ) -> None:
        loss = pml_losses.ProxyAnchorLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=margin, alpha=alpha
        )
        super().__init__(loss, reduction, per_sample=False)

    @property
    def proxies(self) -> nn.Parameter:
        """Class proxies, shape ``(num_classes, embedding_size)``."""
        return self.pml.proxies


class ProxyNCALoss(PMLLoss):
    r"""Proxy-NCA: softmax over distances from a sample to learnable class proxies (PML).

    .. math::
        \ell_i = -\log \frac{e^{-s\, d(x_i, p_{y_i})}}{\sum_{c} e^{-s\, d(x_i, p_c)}}

    with squared Euclidean distances between L2-normalised vectors; ``'mean'`` over samples.

    Args:
        num_classes: number of classes (proxies).
        embedding_size: dimension D.
        softmax_scale: :math:`s`, inverse temperature.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)``; learnable ``proxies``:
          ``(num_classes, D)``; output: scalar.

    References:
        Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies", ICCV 2017.

    Relations:
        :class:`ProxyAnchorLoss` converges faster; :class:`ArcFaceLoss` adds a margin.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> loss = ProxyNCALoss(num_classes=3, embedding_size=4)
        >>> round(loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).item(), 4)
        1.6427
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        softmax_scale: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        loss = pml_losses.ProxyNCALoss(
            num_classes=num_classes, embedding_size=embedding_size, softmax_scale=softmax_scale
        )
        super().__init__(loss, reduction, per_sample=False)

    @property
    def proxies(self) -> nn.Parameter:
        """Class proxies, shape ``(num_classes, embedding_size)``."""
        return self.pml.proxies


class SoftTripleLoss(PMLLoss):
    r"""SoftTriple: softmax over classes represented by several learnable centres each (PML).

    .. math::
        S_{i,c} = \sum_k \frac{e^{s_{ick}/\gamma}}{\sum_{k'} e^{s_{ick'}/\gamma}} s_{ick},\qquad
        \ell_i = -\log \frac{e^{\lambda (S_{i,y_i} - \delta)}}
        {e^{\lambda (S_{i,y_i} - \delta)} + \sum_{c \ne y_i} e^{\lambda S_{i,c}}}

    with cosine similarities :math:`s_{ick}` to centre k of class c; ``'mean'`` over samples.

    Args:
        num_classes: number of classes.
        embedding_size: dimension D.
        centers_per_class: K centres per class.
        la: :math:`\lambda`, logit scale.
        gamma: :math:`\gamma`, temperature of the soft assignment to centres.
        margin: :math:`\delta`, cosine units.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)``; learnable ``fc``:
          ``(D, num_classes * centers_per_class)``; output: scalar or ``(batch,)``.

    References:
        Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling",
        ICCV 2019.

    Relations:
        ``centers_per_class=1`` is a normalised softmax with margin (like
        :class:`CosFaceLoss`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> loss = SoftTripleLoss(num_classes=3, embedding_size=4, centers_per_class=2)
        >>> round(loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).item(), 4)
        11.9477
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        reduction: str = "mean",
    ) -> None:
        loss = pml_losses.SoftTripleLoss(
            num_classes=num_classes,
            embedding_size=embedding_size,
            centers_per_class=centers_per_class,
            la=la,
            gamma=gamma,
            margin=margin,
        )
        super().__init__(loss, reduction, per_sample=True)


class NPairsLoss(PMLLoss):
    r"""N-pair loss: one positive pair per class, the other classes' positives as negatives (PML).

    .. math::
        \ell_i = \log\Bigl(1 + \sum_{j \ne i} e^{x_i^\top p_j - x_i^\top p_i}\Bigr)

    Computed as softmax cross-entropy over dot products (PML); ``'mean'`` over anchors.

    Args:
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)`` with pairs of equal labels;
          output: scalar.

    References:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
        NIPS 2016.

    Relations:
        :class:`NTXentLoss` adds a temperature and cosine similarity.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(NPairsLoss()(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.346
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(pml_losses.NPairsLoss(), reduction, per_sample=False)


class LiftedStructureLoss(PMLLoss):
    r"""Generalized lifted structure loss: log-sum-exp of positive and negative margins (PML).

    .. math::
        \ell_i = \Bigl[\log \sum_{p \in P_i} e^{d_{ip} - m_+} +
        \log \sum_{n \in N_i} e^{m_- - d_{in}}\Bigr]_+

    with Euclidean distances between L2-normalised embeddings; ``'mean'`` over anchors.

    Args:
        neg_margin: :math:`m_-`, distance units.
        pos_margin: :math:`m_+`, distance units.
        reduction: ``'mean'`` or ``'sum'``.

    Shape:
        - embeddings: ``(batch, dim)``; labels: ``(batch,)``; output: scalar.

    References:
        Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person
        Re-Identification", 2017 (generalized form); Oh Song et al., "Deep Metric Learning
        via Lifted Structured Feature Embedding", CVPR 2016.

    Relations:
        A smooth all-pairs :class:`TripletLoss`.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> round(LiftedStructureLoss()(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.4718
    """

    def __init__(
        self, neg_margin: float = 1.0, pos_margin: float = 0.0, reduction: str = "mean"
    ) -> None:
        loss = pml_losses.GeneralizedLiftedStructureLoss(
            neg_margin=neg_margin, pos_margin=pos_margin
        )
        super().__init__(loss, reduction, per_sample=False)
