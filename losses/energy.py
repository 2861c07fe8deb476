r"""Energy-based losses for discrete answers (LeCun et al., "A Tutorial on Energy-Based
Learning", 2006).

An energy model scores every candidate answer; **lower energy is better**. The losses take
``energies`` of shape ``(batch, n_answers)`` and ``target``, the index of the correct
answer :math:`Y` per row, shape ``(batch,)``. Several losses are built on the *most
offending incorrect answer* :math:`\bar Y`, the wrong answer with the lowest energy
(:func:`most_offending_incorrect`). Written here: neither torch nor PML has these losses.
Negate logits to use a classifier as an energy model (:math:`E = -x`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_nonempty, check_reduction, reduce

#: Margin m of the hinge and square-square losses (energy units).
ENERGY_MARGIN = 1.0
#: Inverse temperature beta of the negative log-likelihood loss (1 / energy units).
NLL_BETA = 1.0
#: Weight gamma of the exponential term of the square-exponential loss.
SQUARE_EXP_GAMMA = 1.0
#: Relative margin delta of the LVQ2 loss (unitless).
LVQ2_DELTA = 1.0


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def _check_energies(energies: Tensor, target: Tensor, need_incorrect: bool) -> None:
    if energies.ndim != 2:
        raise ValueError(
            f"energies must have shape (batch, n_answers), got {tuple(energies.shape)}"
        )
    check_nonempty(energies, "energies")
    if target.shape != energies.shape[:1]:
        raise ValueError(
            f"target must have shape (batch,) = ({energies.shape[0]},), got {tuple(target.shape)}"
        )
    if need_incorrect and energies.shape[1] < 2:
        raise ValueError("this loss needs at least 2 answers per row (one correct, one wrong)")


def correct_energy(energies: Tensor, target: Tensor) -> Tensor:
    """Energy of the correct answer :math:`E(Y)`, shape ``(batch,)``."""
    return energies.gather(1, target.unsqueeze(1)).squeeze(1)


def most_offending_incorrect(energies: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    r"""Lowest-energy wrong answer per row, :math:`\bar Y = \arg\min_{y \ne Y} E(y)`.

    Args:
        energies: ``(batch, n_answers)``, lower is better.
        target: ``(batch,)`` index of the correct answer.

    Returns:
        ``(values, indices)``: :math:`E(\bar Y)` and :math:`\bar Y`, each ``(batch,)``.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9], [1.0, 3.0, 2.0]])
        >>> most_offending_incorrect(e, torch.tensor([1, 0]))
        (tensor([0.5000, 2.0000]), tensor([0, 2]))
    """
    _check_energies(energies, target, need_incorrect=True)
    is_correct = F.one_hot(target, energies.shape[1]).bool()
    values, indices = energies.masked_fill(is_correct, float("inf")).min(dim=1)
    return values, indices


def most_offending_incorrect_continuous(
    energies: Tensor, candidates: Tensor, correct: Tensor, epsilon: float
) -> tuple[Tensor, Tensor]:
    r"""Lowest-energy candidate farther than ``epsilon`` from the correct answer.

    For continuous answers "wrong" means :math:`\|y - Y\|_2 > \epsilon`:
    :math:`\bar Y = \arg\min_{y : \|y - Y\| > \epsilon} E(y)`.

    Args:
        energies: ``(batch, K)`` energies of K candidate answers.
        candidates: ``(K, D)`` shared or ``(batch, K, D)`` per-row candidate answers.
        correct: ``(batch, D)`` correct answers :math:`Y`.
        epsilon: radius (answer units) inside which a candidate counts as correct.

    Returns:
        ``(values, indices)``, each ``(batch,)``; indices point into the K candidates.

    Raises:
        ValueError: when a row has no candidate farther than ``epsilon``.

    Example:
        >>> cands = torch.tensor([[0.0], [0.05], [1.0], [2.0]])
        >>> e = torch.tensor([[0.1, 0.0, 0.3, 0.2]])
        >>> most_offending_incorrect_continuous(e, cands, torch.tensor([[0.0]]), epsilon=0.1)
        (tensor([0.2000]), tensor([3]))
    """
    check_nonempty(energies, "energies")
    if candidates.ndim == 2:
        candidates = candidates.unsqueeze(0).expand(energies.shape[0], -1, -1)
    if candidates.shape[:2] != energies.shape:
        raise ValueError(
            f"candidates {tuple(candidates.shape)} do not match energies {tuple(energies.shape)}"
        )
    dist = torch.linalg.vector_norm(candidates - correct.unsqueeze(1), dim=2)  # (batch, K)
    too_close = dist <= epsilon
    if bool(too_close.all(dim=1).any()):
        raise ValueError(f"a row has no candidate farther than epsilon={epsilon} from the answer")
    values, indices = energies.masked_fill(too_close, float("inf")).min(dim=1)
    return values, indices


def energy_loss(energies: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """:math:`E(Y)`; see :class:`EnergyLoss`."""
    _check_energies(energies, target, need_incorrect=False)
    return reduce(correct_energy(energies, target), check_reduction(reduction))


def nll_energy_loss(
    energies: Tensor, target: Tensor, beta: float = NLL_BETA, reduction: str = "mean"
) -> Tensor:
    """:math:`E(Y) + \\beta^{-1}\\log\\sum_y e^{-\\beta E(y)}`; see :class:`NLLEnergyLoss`."""
    _check_energies(energies, target, need_incorrect=False)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    free_energy = torch.logsumexp(-beta * energies, dim=1) / beta  # stable for any energies
    return reduce(correct_energy(energies, target) + free_energy, check_reduction(reduction))


def perceptron_loss(energies: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """:math:`E(Y) - \\min_y E(y)`; see :class:`PerceptronLoss`."""
    _check_energies(energies, target, need_incorrect=False)
    loss = correct_energy(energies, target) - energies.min(dim=1).values
    return reduce(loss, check_reduction(reduction))


def energy_hinge_loss(
    energies: Tensor, target: Tensor, margin: float = ENERGY_MARGIN, reduction: str = "mean"
) -> Tensor:
    r""":math:`\max(0, m + E(Y) - E(\bar Y))`; see :class:`EnergyHingeLoss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    loss = F.relu(margin + correct_energy(energies, target) - wrong)
    return reduce(loss, check_reduction(reduction))


def energy_log_loss(energies: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r""":math:`\log(1 + e^{E(Y) - E(\bar Y)})`; see :class:`EnergyLogLoss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    loss = F.softplus(correct_energy(energies, target) - wrong)
    return reduce(loss, check_reduction(reduction))


def square_square_loss(
    energies: Tensor, target: Tensor, margin: float = ENERGY_MARGIN, reduction: str = "mean"
) -> Tensor:
    r""":math:`E(Y)^2 + \max(0, m - E(\bar Y))^2`; see :class:`SquareSquareLoss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    loss = correct_energy(energies, target) ** 2 + F.relu(margin - wrong) ** 2
    return reduce(loss, check_reduction(reduction))


def square_exponential_loss(
    energies: Tensor, target: Tensor, gamma: float = SQUARE_EXP_GAMMA, reduction: str = "mean"
) -> Tensor:
    r""":math:`E(Y)^2 + \gamma e^{-E(\bar Y)}`; see :class:`SquareExponentialLoss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    loss = correct_energy(energies, target) ** 2 + gamma * torch.exp(-wrong)
    return reduce(loss, check_reduction(reduction))


def lvq2_loss(
    energies: Tensor, target: Tensor, delta: float = LVQ2_DELTA, reduction: str = "mean"
) -> Tensor:
    r""":math:`\min(1, \max(0, (E(Y) - E(\bar Y)) / (\delta E(\bar Y))))`; see :class:`LVQ2Loss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    if bool((wrong <= 0).any()):
        raise ValueError("LVQ2 needs positive energies (it divides by E(Ybar)); shift them")
    ratio = (correct_energy(energies, target) - wrong) / (delta * wrong)
    return reduce(ratio.clamp(0.0, 1.0), check_reduction(reduction))


def mce_loss(energies: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r""":math:`\sigma(E(Y) - E(\bar Y))`; see :class:`MCELoss`."""
    wrong, _ = most_offending_incorrect(energies, target)
    loss = torch.sigmoid(correct_energy(energies, target) - wrong)
    return reduce(loss, check_reduction(reduction))


def generalized_margin_loss(
    energies: Tensor,
    target: Tensor,
    margin_matrix: Tensor | None = None,
    h: Callable[[Tensor], Tensor] = F.relu,
    reduction: str = "mean",
) -> Tensor:
    r""":math:`\sum_{y \ne Y} H(E(Y) - E(y) + C(Y, y))`; see :class:`GeneralizedMarginLoss`."""
    _check_energies(energies, target, need_incorrect=True)
    n_answers = energies.shape[1]
    if margin_matrix is None:
        margins = energies.new_ones(energies.shape)  # C(Y, y) = 1
    else:
        if margin_matrix.shape != (n_answers, n_answers):
            raise ValueError(
                f"margin_matrix must be ({n_answers}, {n_answers}), got "
                f"{tuple(margin_matrix.shape)}"
            )
        margins = margin_matrix.to(energies)[target]  # (batch, n_answers): C(Y_i, y)
    terms = h(correct_energy(energies, target).unsqueeze(1) - energies + margins)
    is_wrong = ~F.one_hot(target, n_answers).bool()
    loss = (terms * is_wrong).sum(dim=1)
    return reduce(loss, check_reduction(reduction))


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class EnergyLoss(nn.Module):
    r"""Energy loss: push down the energy of the correct answer, nothing else.

    .. math::
        \ell_i = E(Y_i)

    Only safe for architectures whose energy cannot collapse to a constant (for example
    when pushing one answer down pulls the others up, as with a softmax).

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        LeCun et al., "A Tutorial on Energy-Based Learning", 2006, section 2.2.1.

    Relations:
        Use a contrastive loss (:class:`EnergyHingeLoss`, :class:`NLLEnergyLoss`) when the
        energy surface can flatten.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(EnergyLoss()(e, torch.tensor([1])).item(), 4)
        0.2
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return energy_loss(energies, target, self.reduction)


class NLLEnergyLoss(nn.Module):
    r"""Negative log-likelihood of a Gibbs distribution over the answers, inverse temperature beta.

    .. math::
        \ell_i = E(Y_i) + \frac{1}{\beta} \log \sum_y e^{-\beta E(y)}

    Computed with log-sum-exp, finite for any energies. Always :math:`\ge` the perceptron
    loss and within :math:`\log(n_\text{answers})/\beta` of it, so it tends to
    :class:`PerceptronLoss` as :math:`\beta \to \infty`.

    Args:
        beta: inverse temperature :math:`\beta > 0` (1 / energy units).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        LeCun et al., "A Tutorial on Energy-Based Learning", 2006, section 2.2.4.

    Relations:
        With :math:`E = -x` and :math:`\beta = 1` it is
        :class:`losses.classification.CrossEntropyLoss` on logits :math:`x`;
        :class:`PerceptronLoss` is its zero-temperature limit.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(NLLEnergyLoss(beta=1.0)(e, torch.tensor([1])).item(), 4)
        0.8053
    """

    def __init__(self, beta: float = NLL_BETA, reduction: str = "mean") -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return nll_energy_loss(energies, target, self.beta, self.reduction)


class PerceptronLoss(nn.Module):
    r"""Perceptron loss: energy of the correct answer above the lowest energy.

    .. math::
        \ell_i = E(Y_i) - \min_y E(y) \;\ge 0

    Zero exactly when the correct answer has the lowest energy (ties included); it has no
    margin, so a flat energy surface also gives 0.

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        Rosenblatt, "The Perceptron", Psychological Review 1958; LeCun et al., 2006,
        section 2.2.2.

    Relations:
        :class:`EnergyHingeLoss` adds a margin; :class:`NLLEnergyLoss` is its finite-beta
        smoothing.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(PerceptronLoss()(e, torch.tensor([0])).item(), 4)
        0.3
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return perceptron_loss(energies, target, self.reduction)


class EnergyHingeLoss(nn.Module):
    r"""Generalized margin hinge: the correct answer must beat the most offending wrong one by m.

    .. math::
        \ell_i = \max\bigl(0,\ m + E(Y_i) - E(\bar Y_i)\bigr)

    Zero exactly when :math:`E(\bar Y_i) - E(Y_i) \ge m`.

    Args:
        margin: :math:`m \ge 0`, in energy units.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        LeCun et al., "A Tutorial on Energy-Based Learning", 2006, section 2.2.3.

    Relations:
        The batch-hard triplet loss is this loss with distances as energies
        (:mod:`losses.miners` ``"batch-hard"``); :class:`EnergyLogLoss` is its soft version.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(EnergyHingeLoss(margin=1.0)(e, torch.tensor([1])).item(), 4)
        0.7
    """

    def __init__(self, margin: float = ENERGY_MARGIN, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return energy_hinge_loss(energies, target, self.margin, self.reduction)


class EnergyLogLoss(nn.Module):
    r"""Soft hinge on the gap to the most offending incorrect answer.

    .. math::
        \ell_i = \log\bigl(1 + e^{E(Y_i) - E(\bar Y_i)}\bigr)

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        LeCun et al., "A Tutorial on Energy-Based Learning", 2006, section 2.2.3.

    Relations:
        Smooth :class:`EnergyHingeLoss` with an infinite soft margin.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(EnergyLogLoss()(e, torch.tensor([1])).item(), 4)
        0.5544
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return energy_log_loss(energies, target, self.reduction)


class SquareSquareLoss(nn.Module):
    r"""Square-square loss: correct energy to 0, most offending wrong energy above m.

    .. math::
        \ell_i = E(Y_i)^2 + \max\bigl(0,\ m - E(\bar Y_i)\bigr)^2

    Meant for non-negative energies (distances).

    Args:
        margin: :math:`m`, in energy units.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``; squared energy units.

    References:
        Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an Invariant
        Mapping", CVPR 2006; LeCun et al., 2006, section 2.2.3.

    Relations:
        The energy form of :class:`losses.embedding.ContrastiveLoss`.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(SquareSquareLoss()(e, torch.tensor([1])).item(), 4)
        0.29
    """

    def __init__(self, margin: float = ENERGY_MARGIN, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return square_square_loss(energies, target, self.margin, self.reduction)


class SquareExponentialLoss(nn.Module):
    r"""Square-exponential loss: correct energy to 0, wrong energy pushed up exponentially.

    .. math::
        \ell_i = E(Y_i)^2 + \gamma\, e^{-E(\bar Y_i)}

    Args:
        gamma: :math:`\gamma > 0`, weight of the push term (squared energy units).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        Osadchy, Miller and LeCun, "Synergistic Face Detection and Pose Estimation with
        Energy-Based Models", NIPS 2005; LeCun et al., 2006, section 2.2.3.

    Relations:
        :class:`SquareSquareLoss` stops pushing beyond the margin; this never stops.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(SquareExponentialLoss()(e, torch.tensor([1])).item(), 4)
        0.6465
    """

    def __init__(self, gamma: float = SQUARE_EXP_GAMMA, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = gamma
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return square_exponential_loss(energies, target, self.gamma, self.reduction)


class LVQ2Loss(nn.Module):
    r"""LVQ2 loss: relative energy gap to the most offending answer, clipped to [0, 1].

    .. math::
        \ell_i = \min\Bigl(1,\ \max\Bigl(0,\
        \frac{E(Y_i) - E(\bar Y_i)}{\delta\, E(\bar Y_i)}\Bigr)\Bigr)

    Needs positive energies (distances to prototypes); raises ``ValueError`` otherwise.
    It has no margin: zero as soon as the correct answer wins.

    Args:
        delta: :math:`\delta > 0`, relative width of the linear zone (unitless).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``, positive; target: ``(batch,)``; output:
          scalar or ``(batch,)``, unitless.

    References:
        Kohonen, "Improved versions of learning vector quantization", IJCNN 1990;
        LeCun et al., 2006, section 2.2.3.

    Relations:
        :class:`MCELoss` is another saturating loss; :class:`EnergyHingeLoss` has a margin.

    Example:
        >>> e = torch.tensor([[0.5, 0.4, 0.9]])
        >>> round(LVQ2Loss()(e, torch.tensor([0])).item(), 4)
        0.25
    """

    def __init__(self, delta: float = LVQ2_DELTA, reduction: str = "mean") -> None:
        super().__init__()
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.delta = delta
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return lvq2_loss(energies, target, self.delta, self.reduction)


class MCELoss(nn.Module):
    r"""Minimum classification error loss: a sigmoid of the gap to the most offending answer.

    .. math::
        \ell_i = \sigma\bigl(E(Y_i) - E(\bar Y_i)\bigr)

    A smooth count of errors: bounded in (0, 1), so outliers cannot dominate.

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``, unitless.

    References:
        Juang, Chou and Lee, "Minimum classification error rate methods for speech
        recognition", IEEE TSAP 1997; LeCun et al., 2006, section 2.2.3.

    Relations:
        :class:`EnergyLogLoss` is unbounded where this saturates.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> round(MCELoss()(e, torch.tensor([1])).item(), 4)
        0.4256
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return mce_loss(energies, target, self.reduction)


class GeneralizedMarginLoss(nn.Module):
    r"""General margin loss over all wrong answers with an answer-dependent margin matrix.

    .. math::
        \ell_i = \sum_{y \ne Y_i} H\bigl(E(Y_i) - E(y) + C(Y_i, y)\bigr)

    Args:
        margin_matrix: :math:`C`, shape ``(n_answers, n_answers)``, energy units; row
            :math:`Y` holds the margin required against each wrong answer (for example a
            task cost). ``None`` uses 1 everywhere. Registered as a buffer.
        h: monotonically increasing :math:`H`; default ``F.relu`` (hinge); ``F.softplus``
            gives the log loss.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - energies: ``(batch, n_answers)``; target: ``(batch,)``; output: scalar or
          ``(batch,)``.

    References:
        LeCun et al., "A Tutorial on Energy-Based Learning", 2006, section 2.2.3 (eq. 13);
        Taskar et al., "Max-Margin Markov Networks", NIPS 2003.

    Relations:
        With :math:`E = -x`, hinge H and constant margin it is ``C *``
        :class:`losses.classification.MultiMarginLoss`; :class:`EnergyHingeLoss` keeps only
        the most offending term.

    Example:
        >>> e = torch.tensor([[0.5, 0.2, 0.9]])
        >>> GeneralizedMarginLoss()(e, torch.tensor([1])).item()
        1.0
    """

    def __init__(
        self,
        margin_matrix: Tensor | None = None,
        h: Callable[[Tensor], Tensor] = F.relu,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.register_buffer("margin_matrix", margin_matrix)
        self.h = h
        self.reduction = check_reduction(reduction)

    def forward(self, energies: Tensor, target: Tensor) -> Tensor:
        return generalized_margin_loss(energies, target, self.margin_matrix, self.h, self.reduction)
