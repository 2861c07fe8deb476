r"""Classification losses: scores (logits) or probabilities against class targets.

Torch and torchvision already implement most of this family; those are exposed here as thin
subclasses that only add documentation and an empty-batch check (the arithmetic is theirs).
Written here, because none of torch, torchvision or pytorch-metric-learning has them:
balanced sigmoid cross-entropy, multi-class focal loss, Poly-1, soft dice, the binary hinge
losses and the center loss. The large-margin softmax comes from pytorch-metric-learning.

Conventions: ``logits`` are raw scores of shape ``(batch, classes)``; integer ``target``
holds class ids of shape ``(batch,)``; ``reduction`` is ``'mean' | 'sum' | 'none'``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.ops
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from ._common import check_embeddings, check_nonempty, check_reduction, reduce
from ._pml import PMLLoss

#: Focal-loss defaults of Lin et al. (2017), used by both focal losses.
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
#: Poly-1 coefficient of Leng et al. (2022).
POLY_EPSILON = 1.0
#: Smoothing term added to numerator and denominator of the soft dice coefficient.
DICE_SMOOTH = 1.0
#: Margin of the binary hinge losses (SVM convention).
HINGE_MARGIN = 1.0
#: Margin m of the large-margin softmax (integer; 1 is plain softmax cross-entropy).
LSOFTMAX_MARGIN = 4


# --------------------------------------------------------------------------------------
# Pure functions (the math written here)
# --------------------------------------------------------------------------------------


def balanced_sigmoid_cross_entropy(
    logits: Tensor, target: Tensor, beta: float | None = None, reduction: str = "mean"
) -> Tensor:
    """Class-balanced BCE on logits; see :class:`BalancedSigmoidCrossEntropyLoss`."""
    check_nonempty(logits, "logits")
    check_reduction(reduction)
    target = target.to(logits.dtype)
    if beta is None:
        beta_t = 1.0 - target.mean()  # fraction of negatives |Y-| / |Y|
    else:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        beta_t = torch.as_tensor(beta, dtype=logits.dtype, device=logits.device)
    weight = beta_t * target + (1.0 - beta_t) * (1.0 - target)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return reduce(loss, reduction)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float | Tensor | None = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class focal loss on logits; see :class:`FocalLoss`."""
    check_nonempty(logits, "logits")
    check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)  # (batch,)
    one_minus_pt = -torch.expm1(log_pt)  # 1 - p_t, accurate when p_t is close to 1
    loss = -(one_minus_pt**gamma) * log_pt
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        if alpha_t.ndim == 1:
            alpha_t = alpha_t[target]
        loss = alpha_t * loss
    return reduce(loss, reduction)


def poly1_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = POLY_EPSILON, reduction: str = "mean"
) -> Tensor:
    """Poly-1 loss: cross-entropy plus ``epsilon * (1 - p_t)``; see :class:`PolyLoss`."""
    check_nonempty(logits, "logits")
    check_reduction(reduction)
    ce = F.cross_entropy(logits, target, reduction="none")  # (batch,) = -log p_t
    pt = torch.exp(-ce)
    return reduce(ce + epsilon * (1.0 - pt), reduction)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    mode: str = "binary",
    smooth: float = DICE_SMOOTH,
    reduction: str = "mean",
) -> Tensor:
    """Soft dice loss per sample; see :class:`DiceLoss`."""
    check_nonempty(logits, "logits")
    check_reduction(reduction)
    if mode == "binary":
        probs = torch.sigmoid(logits).flatten(1)  # (batch, elements)
        onehot = target.to(logits.dtype).flatten(1)
        inter = (probs * onehot).sum(1)
        dice = (2 * inter + smooth) / (probs.sum(1) + onehot.sum(1) + smooth)
    elif mode == "multiclass":
        n_classes = logits.shape[1]
        probs = torch.softmax(logits, dim=1).flatten(2)  # (batch, classes, elements)
        onehot = F.one_hot(target.flatten(1), n_classes).transpose(1, 2).to(logits.dtype)
        inter = (probs * onehot).sum(2)  # (batch, classes)
        dice = ((2 * inter + smooth) / (probs.sum(2) + onehot.sum(2) + smooth)).mean(1)
    else:
        raise ValueError(f"mode must be 'binary' or 'multiclass', got {mode!r}")
    return reduce(1.0 - dice, reduction)


def binary_hinge_loss(
    scores: Tensor,
    target: Tensor,
    margin: float = HINGE_MARGIN,
    squared: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """SVM hinge ``max(0, margin - y s)`` (optionally squared); labels ``y`` are +-1."""
    check_nonempty(scores, "scores")
    check_reduction(reduction)
    if not bool(((target == 1) | (target == -1)).all()):
        raise ValueError("binary hinge losses need targets in {-1, +1}; map 0/1 labels first")
    loss = F.relu(margin - target.to(scores.dtype) * scores)
    if squared:
        loss = loss**2
    return reduce(loss, reduction)


def center_loss(
    embeddings: Tensor, labels: Tensor, centers: Tensor, reduction: str = "mean"
) -> Tensor:
    """Half squared distance of each embedding to its class centre; see :class:`CenterLoss`."""
    check_embeddings(embeddings, labels)
    check_reduction(reduction)
    diff = embeddings - centers[labels]  # (batch, dim)
    return reduce(0.5 * (diff**2).sum(1), reduction)


# --------------------------------------------------------------------------------------
# Losses exposed from torch (documentation and the empty-batch check only)
# --------------------------------------------------------------------------------------


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r"""Softmax cross-entropy with class weights and label smoothing (``torch.nn`` implementation).

    .. math::
        \ell_i = -\sum_c w_c\, q_{ic} \log \frac{e^{x_{ic}}}{\sum_k e^{x_{ik}}},\qquad
        q_{ic} = (1-\varepsilon)\,[c = y_i] + \varepsilon / C

    Args:
        weight: per-class weights :math:`w_c`, shape ``(classes,)``, unitless.
        ignore_index: target value that is skipped.
        reduction: ``'mean'`` (weighted mean), ``'sum'`` or ``'none'``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`, probability mass spread uniformly.

    Shape:
        - input: ``(batch, classes)`` logits; target: ``(batch,)`` class ids.
        - output: scalar, or ``(batch,)`` with ``reduction='none'``.

    References:
        Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016 (label smoothing).

    Relations:
        :class:`NLLLoss` on ``log_softmax`` outputs is the same loss; :class:`FocalLoss` with
        ``gamma=0, alpha=None`` and :class:`PolyLoss` with ``epsilon=0`` reduce to it.

    Example:
        >>> loss = CrossEntropyLoss(label_smoothing=0.1)
        >>> round(loss(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])).item(), 4)
        0.3365
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class NLLLoss(nn.NLLLoss):
    r"""Negative log-likelihood of log-probabilities (``torch.nn`` implementation).

    .. math::
        \ell_i = -w_{y_i}\, x_{i, y_i}

    Args:
        weight: per-class weights, shape ``(classes,)``.
        ignore_index: target value that is skipped.
        reduction: ``'mean'`` (weighted mean), ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` log-probabilities (nats); target: ``(batch,)`` ids.
        - output: scalar, or ``(batch,)``.

    References:
        Bishop, "Pattern Recognition and Machine Learning", 2006, section 4.3.4.

    Relations:
        Use :class:`CrossEntropyLoss` on raw logits instead of ``log_softmax`` + NLL.

    Example:
        >>> logp = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
        >>> round(NLLLoss()(logp, torch.tensor([0])).item(), 4)
        0.3567
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class BCELoss(nn.BCELoss):
    r"""Binary cross-entropy on probabilities (``torch.nn`` implementation).

    .. math::
        \ell_i = -w_i\,[y_i \log p_i + (1 - y_i) \log(1 - p_i)]

    Args:
        weight: per-element rescaling weight, broadcastable to the input.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` probabilities in [0, 1]; target: same shape, in [0, 1].
        - output: scalar, or ``(*)``.

    References:
        Bishop, "Pattern Recognition and Machine Learning", 2006, section 4.3.2.

    Relations:
        Prefer :class:`BCEWithLogitsLoss` (numerically stable on logits).

    Example:
        >>> round(BCELoss()(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0])).item(), 4)
        0.1643
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    r"""Binary cross-entropy on logits with a positive-class weight (``torch.nn`` implementation).

    .. math::
        \ell_i = -w_i\,[p_w\, y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i))]

    Args:
        weight: per-element weight, broadcastable to the input.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        pos_weight: :math:`p_w`, weight of positives per class, shape ``(classes,)``;
            set it to ``#negatives / #positives`` to balance classes.

    Shape:
        - input: ``(*)`` logits; target: same shape, in [0, 1].
        - output: scalar, or ``(*)``.

    References:
        Bishop, "Pattern Recognition and Machine Learning", 2006, section 4.3.2.

    Relations:
        :class:`BalancedSigmoidCrossEntropyLoss` weights both classes (beta, 1-beta);
        :class:`BinaryFocalLoss` down-weights easy examples.

    Example:
        >>> loss = BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))
        >>> round(loss(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0])).item(), 4)
        0.6307
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class MultiMarginLoss(nn.MultiMarginLoss):
    r"""Multi-class hinge loss of Weston and Watkins / Crammer-Singer style (``torch.nn``).

    .. math::
        \ell_i = \frac{1}{C} \sum_{c \ne y_i} w_{y_i} \max(0, m - x_{i,y_i} + x_{ic})^p

    Args:
        p: 1 (hinge) or 2 (squared hinge).
        margin: :math:`m`, in score units.
        weight: per-class weights, shape ``(classes,)``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` scores; target: ``(batch,)`` ids.
        - output: scalar, or ``(batch,)``.

    References:
        Weston and Watkins, "Support Vector Machines for Multi-Class Pattern Recognition",
        ESANN 1999.

    Relations:
        The energy-based :class:`losses.energy.GeneralizedMarginLoss` with hinge ``H`` and
        ``E = -x`` sums the same terms; :class:`HingeLoss` is the two-class case on one score.

    Example:
        >>> x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
        >>> round(MultiMarginLoss()(x, torch.tensor([3])).item(), 4)
        0.325
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class MultiLabelMarginLoss(nn.MultiLabelMarginLoss):
    r"""Multi-label hinge loss over (positive, negative) class pairs (``torch.nn``).

    .. math::
        \ell_i = \sum_{j \in Y_i} \sum_{c \notin Y_i} \frac{\max(0, 1 - (x_{ij} - x_{ic}))}{C}

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` scores; target: ``(batch, classes)`` class ids of the
          positive labels, padded after the last one with ``-1``.
        - output: scalar, or ``(batch,)``.

    References:
        Zhang and Zhou, "Multilabel Neural Networks with Applications to Functional Genomics
        and Text Categorization", IEEE TKDE 2006.

    Relations:
        :class:`MultiLabelSoftMarginLoss` is the smooth per-class alternative.

    Example:
        >>> x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
        >>> y = torch.tensor([[3, 0, -1, 1]])
        >>> round(MultiLabelMarginLoss()(x, y).item(), 4)
        0.85
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class SoftMarginLoss(nn.SoftMarginLoss):
    r"""Two-class logistic loss on +-1 labels (``torch.nn`` implementation).

    .. math::
        \ell_i = \log(1 + e^{-y_i x_i})

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` scores; target: same shape, values +-1.
        - output: scalar, or ``(*)``.

    References:
        Hastie, Tibshirani and Friedman, "The Elements of Statistical Learning", 2009, 12.3.2.

    Relations:
        The smooth version of :class:`HingeLoss`; equal to :class:`BCEWithLogitsLoss` with
        targets ``(y + 1) / 2``.

    Example:
        >>> round(SoftMarginLoss()(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])).item(), 4)
        0.7201
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class MultiLabelSoftMarginLoss(nn.MultiLabelSoftMarginLoss):
    r"""Per-class logistic loss averaged over classes, for multi-label targets (``torch.nn``).

    .. math::
        \ell_i = -\frac{1}{C}\sum_c w_c\,[y_{ic}\log\sigma(x_{ic})
        + (1-y_{ic})\log(1-\sigma(x_{ic}))]

    Args:
        weight: per-class weights, shape ``(classes,)``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` logits; target: ``(batch, classes)`` in {0, 1}.
        - output: scalar, or ``(batch,)``.

    References:
        Tsoumakas and Katakis, "Multi-Label Classification: An Overview", IJDWM 2007.

    Relations:
        Same as :class:`BCEWithLogitsLoss` averaged over classes per sample.

    Example:
        >>> x = torch.tensor([[1.0, -1.0, 0.0]])
        >>> round(MultiLabelSoftMarginLoss()(x, torch.tensor([[1.0, 0.0, 1.0]])).item(), 4)
        0.4399
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class KLDivLoss(nn.KLDivLoss):
    r"""Kullback-Leibler divergence :math:`KL(q \| p)` from log-probabilities (``torch.nn``).

    .. math::
        \ell_i = \sum_c q_{ic} (\log q_{ic} - \log p_{ic})

    The default here is ``reduction='batchmean'`` (sum over classes, mean over the batch),
    the only reduction that matches the mathematical definition.

    Args:
        reduction: ``'batchmean'`` (default), ``'sum'``, ``'mean'`` (per element) or
            ``'none'``.
        log_target: whether the target :math:`q` is given as log-probabilities.

    Shape:
        - input: ``(batch, classes)`` log-probabilities :math:`\log p` (nats);
          target: same shape, probabilities :math:`q`.
        - output: scalar, or ``(batch, classes)`` with ``'none'``.

    References:
        Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015.

    Relations:
        :class:`CrossEntropyLoss` with soft targets differs by the (constant) entropy of q.

    Example:
        >>> logp = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> round(KLDivLoss()(logp, torch.tensor([[0.9, 0.1]])).item(), 4)
        0.3681
    """

    def __init__(self, reduction: str = "batchmean", log_target: bool = False) -> None:
        check_reduction(reduction, ("batchmean", "sum", "mean", "none"))
        super().__init__(reduction=reduction, log_target=log_target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


# --------------------------------------------------------------------------------------
# Losses written here
# --------------------------------------------------------------------------------------


class BalancedSigmoidCrossEntropyLoss(nn.Module):
    r"""Binary cross-entropy whose positives and negatives are weighted beta and 1-beta.

    Written here: torch's ``pos_weight`` rescales positives only; this is the HED form with
    a weight on each side, and beta can follow the batch.

    .. math::
        \ell_j = -\beta\, y_j \log\sigma(x_j) - (1-\beta)(1-y_j)\log(1-\sigma(x_j)),\qquad
        \beta = \frac{|Y_-|}{|Y|}\ \text{by default}

    Args:
        beta: weight of positives in [0, 1]; ``None`` (default) uses the fraction of
            negatives in the batch, so the rare class gets the large weight.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` logits; target: same shape, in {0, 1}.
        - output: scalar, or ``(*)``.

    References:
        Xie and Tu, "Holistically-Nested Edge Detection", ICCV 2015, eq. 2.

    Relations:
        ``beta=0.5`` is half of :class:`BCEWithLogitsLoss`; :class:`BinaryFocalLoss` also
        re-weights by difficulty; :class:`DiceLoss` is the overlap-based alternative.

    Example:
        >>> loss = BalancedSigmoidCrossEntropyLoss()
        >>> x, y = torch.tensor([2.0, -1.0, -2.0, 0.5]), torch.tensor([1.0, 0.0, 0.0, 0.0])
        >>> round(loss(x, y).item(), 4)
        0.1122
    """

    def __init__(self, beta: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.beta = beta
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return balanced_sigmoid_cross_entropy(input, target, self.beta, self.reduction)


class BinaryFocalLoss(nn.Module):
    r"""Sigmoid focal loss for binary or multi-label targets (``torchvision.ops`` implementation).

    .. math::
        \ell_j = -\alpha_t (1 - p_t)^\gamma \log p_t,\quad
        p_t = \begin{cases}\sigma(x_j) & y_j = 1\\ 1-\sigma(x_j) & y_j = 0\end{cases},\quad
        \alpha_t = \begin{cases}\alpha & y_j = 1\\ 1-\alpha & y_j = 0\end{cases}

    Args:
        alpha: weight of positives in [0, 1]; a negative value disables the weighting.
        gamma: focusing exponent (unitless, >= 0); 0 gives weighted BCE.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` logits; target: same shape, in {0, 1}.
        - output: scalar, or ``(*)``.

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Relations:
        ``gamma=0, alpha=-1`` is :class:`BCEWithLogitsLoss`; :class:`FocalLoss` is the
        softmax (multi-class) version.

    Example:
        >>> loss = BinaryFocalLoss()
        >>> round(loss(torch.tensor([3.0, -3.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])).item(), 4)
        0.0145
    """

    def __init__(
        self, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return torchvision.ops.sigmoid_focal_loss(
            input, target.to(input.dtype), self.alpha, self.gamma, self.reduction
        )


class FocalLoss(nn.Module):
    r"""Multi-class (softmax) focal loss: cross-entropy down-weighted on easy examples.

    Written here: torchvision only has the sigmoid (binary) focal loss.

    .. math::
        \ell_i = -\alpha_{y_i} (1 - p_{i,y_i})^\gamma \log p_{i,y_i},\qquad
        p_i = \operatorname{softmax}(x_i)

    Args:
        alpha: ``None`` (no weight), a float applied to every class, or per-class weights
            of shape ``(classes,)``. Default 0.25 as in the paper.
        gamma: focusing exponent (unitless, >= 0); 0 gives (alpha-weighted) cross-entropy.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` logits; target: ``(batch,)`` ids.
        - output: scalar, or ``(batch,)``.

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Relations:
        ``gamma=0, alpha=None`` is :class:`CrossEntropyLoss`; :class:`BinaryFocalLoss` for
        sigmoid outputs; :class:`PolyLoss` is another cross-entropy correction.

    Example:
        >>> loss = FocalLoss()
        >>> round(loss(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])).item(), 4)
        0.001
    """

    def __init__(
        self,
        alpha: float | Tensor | None = FOCAL_ALPHA,
        gamma: float = FOCAL_GAMMA,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma = gamma
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return focal_loss(input, target, self.alpha, self.gamma, self.reduction)


class PolyLoss(nn.Module):
    r"""Poly-1 loss: cross-entropy plus a tunable first polynomial term.

    Written here: not in torch, torchvision or PML.

    .. math::
        \ell_i = -\log p_{i,y_i} + \epsilon\,(1 - p_{i,y_i}),
        \qquad p_i = \operatorname{softmax}(x_i)

    Args:
        epsilon: coefficient of the first polynomial term (unitless, >= -1); 0 is
            cross-entropy, positive values push harder on confident-but-wrong samples.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(batch, classes)`` logits; target: ``(batch,)`` ids.
        - output: scalar, or ``(batch,)``.

    References:
        Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
        Functions", ICLR 2022.

    Relations:
        ``epsilon=0`` is :class:`CrossEntropyLoss`; :class:`FocalLoss` drops polynomial
        terms instead of adding one.

    Example:
        >>> loss = PolyLoss(epsilon=1.0)
        >>> round(loss(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])).item(), 4)
        0.3261
    """

    def __init__(self, epsilon: float = POLY_EPSILON, reduction: str = "mean") -> None:
        super().__init__()
        self.epsilon = epsilon
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return poly1_cross_entropy(input, target, self.epsilon, self.reduction)


class DiceLoss(nn.Module):
    r"""Soft dice loss (one minus the soft Sorensen-Dice overlap), binary or multi-class.

    Written here: not in torch, torchvision or PML.

    .. math::
        \ell_i = 1 - \frac{1}{|K|}\sum_{k \in K}
        \frac{2\sum_j p_{ijk} g_{ijk} + s}{\sum_j p_{ijk} + \sum_j g_{ijk} + s}

    with :math:`p = \sigma(x)` and one class :math:`K=\{1\}` in ``'binary'`` mode, and
    :math:`p = \operatorname{softmax}(x)` over the class dimension and one-hot targets
    :math:`g` in ``'multiclass'`` mode; :math:`j` runs over the remaining (pixel) positions.

    Args:
        mode: ``'binary'`` or ``'multiclass'``.
        smooth: :math:`s`, added to numerator and denominator (unitless, in pixel counts);
            keeps the loss defined on empty masks.
        reduction: over samples, ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - binary: input ``(batch, *)`` logits, target same shape in {0, 1}.
        - multiclass: input ``(batch, classes, *)`` logits, target ``(batch, *)`` ids.
        - output: scalar, or ``(batch,)``.

    References:
        Milletari, Navab and Ahmadi, "V-Net", 3DV 2016.

    Relations:
        Overlap-based, insensitive to class imbalance; often summed with
        :class:`BCEWithLogitsLoss` or :class:`CrossEntropyLoss`.

    Example:
        >>> loss = DiceLoss(mode="binary", smooth=1.0)
        >>> x = torch.tensor([[4.0, 4.0, -4.0, -4.0]])
        >>> round(loss(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]])).item(), 4)
        0.0144
    """

    def __init__(
        self, mode: str = "binary", smooth: float = DICE_SMOOTH, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if mode not in ("binary", "multiclass"):
            raise ValueError(f"mode must be 'binary' or 'multiclass', got {mode!r}")
        self.mode = mode
        self.smooth = smooth
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return soft_dice_loss(input, target, self.mode, self.smooth, self.reduction)


class HingeLoss(nn.Module):
    r"""Binary SVM hinge loss on one score per sample with labels +-1.

    Written here: torch's ``HingeEmbeddingLoss`` acts on distances, not on scores.

    .. math::
        \ell_i = \max(0,\ m - y_i s_i)

    Args:
        margin: :math:`m`, in score units (1 for the standard SVM).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` scores; target: same shape, values in {-1, +1}.
        - output: scalar, or ``(*)``.

    References:
        Cortes and Vapnik, "Support-Vector Networks", Machine Learning 1995.

    Relations:
        :class:`SquaredHingeLoss` is differentiable at the hinge; :class:`SoftMarginLoss` is
        the logistic version; :class:`MultiMarginLoss` for many classes.

    Example:
        >>> round(HingeLoss()(torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1, 1, 1])).item(), 4)
        0.8333
    """

    def __init__(self, margin: float = HINGE_MARGIN, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_hinge_loss(input, target, self.margin, False, self.reduction)


class SquaredHingeLoss(nn.Module):
    r"""Binary squared hinge loss (L2-SVM) with labels +-1.

    Written here: not in torch, torchvision or PML.

    .. math::
        \ell_i = \max(0,\ m - y_i s_i)^2

    Args:
        margin: :math:`m`, in score units.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` scores; target: same shape, values in {-1, +1}.
        - output: scalar, or ``(*)``.

    References:
        Tang, "Deep Learning using Linear Support Vector Machines", ICML workshop 2013.

    Relations:
        Smooth version of :class:`HingeLoss`; :class:`MultiMarginLoss` with ``p=2`` for many
        classes.

    Example:
        >>> x = torch.tensor([2.0, 0.5, -1.0])
        >>> round(SquaredHingeLoss()(x, torch.tensor([1, 1, 1])).item(), 4)
        1.4167
    """

    def __init__(self, margin: float = HINGE_MARGIN, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_hinge_loss(input, target, self.margin, True, self.reduction)


class LargeMarginSoftmaxLoss(PMLLoss):
    r"""Large-margin softmax (L-Softmax): the target angle is multiplied by an integer m.

    Exposes pytorch-metric-learning's ``LargeMarginSoftmaxLoss``; it owns the last linear
    layer :math:`W`, so call it on embeddings, not on logits.

    .. math::
        \ell_i = -\log \frac{e^{\|W_{y_i}\|\|x_i\|\psi(\theta_{y_i})}}
        {e^{\|W_{y_i}\|\|x_i\|\psi(\theta_{y_i})}
        + \sum_{c \ne y_i} e^{\|W_c\|\|x_i\|\cos\theta_c}},
        \quad \psi(\theta) = (-1)^k \cos(m\theta) - 2k,
        \ \theta \in [\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}]

    Args:
        num_classes: number of classes C.
        embedding_size: dimension D of the embeddings.
        margin: integer :math:`m \ge 1`; 1 is plain softmax cross-entropy on :math:`x W`.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)`` ids.
        - learnable ``weight``: ``(D, C)``.
        - output: scalar, or ``(batch,)``.

    References:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016.

    Relations:
        :class:`losses.embedding.ArcFaceLoss` adds the margin to the angle instead and
        normalises the weights; :class:`CrossEntropyLoss` is ``m=1``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> loss = LargeMarginSoftmaxLoss(num_classes=3, embedding_size=4, margin=2)
        >>> value = loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> value.shape, bool(value > 0)
        (torch.Size([]), True)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = LSOFTMAX_MARGIN,
        reduction: str = "mean",
    ) -> None:
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin m must be an integer >= 1, got {margin}")
        loss = pml_losses.LargeMarginSoftmaxLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=int(margin)
        )
        super().__init__(loss, reduction, per_sample=True)

    @property
    def weight(self) -> nn.Parameter:
        """Class weights :math:`W`, shape ``(embedding_size, num_classes)``."""
        return self.pml.W


class CenterLoss(nn.Module):
    r"""Center loss: pulls each embedding to a learnable centre of its class.

    Written here: PML has no center loss. Use it *beside* a softmax loss (the centres alone
    collapse). The centres are an ``nn.Parameter``: give them to the optimizer (the paper
    uses a separate learning rate alpha for them) and they are saved in ``state_dict()``.

    .. math::
        \ell_i = \tfrac{1}{2} \| x_i - c_{y_i} \|_2^2

    Args:
        num_classes: number of classes C.
        embedding_size: dimension D of the embeddings.
        reduction: ``'mean'`` (the paper sums; mean keeps the scale batch-independent),
            ``'sum'`` or ``'none'``.

    Shape:
        - embeddings: ``(batch, D)``; labels: ``(batch,)`` ids.
        - learnable ``centers``: ``(C, D)``, in embedding units.
        - output: scalar, or ``(batch,)``; squared embedding units.

    References:
        Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
        ECCV 2016.

    Relations:
        Not a pair loss: a single-class batch still pulls toward its centre. Pair with
        :class:`CrossEntropyLoss`; :class:`losses.embedding.ProxyAnchorLoss` also learns one
        vector per class but pushes the other classes away.

    Example:
        >>> loss = CenterLoss(num_classes=2, embedding_size=2)
        >>> with torch.no_grad():
        ...     _ = loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
        >>> loss(x, torch.tensor([0, 1])).item()
        1.25
    """

    def __init__(self, num_classes: int, embedding_size: int, reduction: str = "mean") -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_size))
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return center_loss(embeddings, labels, self.centers, self.reduction)
