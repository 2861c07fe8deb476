r"""Regression losses: predictions against real-valued targets, as functions of the residual.

L1, MSE, Huber, Smooth L1 and Poisson NLL are ``torch.nn``'s, exposed as thin subclasses
(documentation and the empty-batch check only). Written here because torch has none of
them: RMSE, mean bias error and log-cosh.

Convention: the residual is :math:`r = \hat y - y` (prediction minus target).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_nonempty, check_reduction, reduce, safe_sqrt

#: Threshold between the quadratic and the linear part of the Huber loss (target units).
HUBER_DELTA = 1.0
#: Threshold of Smooth L1 (target units); Smooth L1 = Huber / beta.
SMOOTH_L1_BETA = 1.0
_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# Pure functions (the math written here)
# --------------------------------------------------------------------------------------


def rmse(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Square root of the reduced squared error; see :class:`RMSELoss`."""
    check_nonempty(input)
    check_reduction(reduction)
    return safe_sqrt(F.mse_loss(input, target, reduction=reduction))


def mean_bias_error(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Signed residual ``input - target`` reduced; see :class:`MeanBiasError`."""
    check_nonempty(input)
    return reduce(input - target, check_reduction(reduction))


def log_cosh(x: Tensor) -> Tensor:
    """``log(cosh(x))`` computed as ``|x| + softplus(-2|x|) - log 2``: finite for any ``x``."""
    a = torch.abs(x)
    return a + F.softplus(-2.0 * a) - _LOG2


def log_cosh_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Log-cosh of the residual; see :class:`LogCoshLoss`."""
    check_nonempty(input)
    return reduce(log_cosh(input - target), check_reduction(reduction))


# --------------------------------------------------------------------------------------
# Losses exposed from torch
# --------------------------------------------------------------------------------------


class L1Loss(nn.L1Loss):
    r"""Mean absolute error (MAE, L1) (``torch.nn`` implementation).

    .. math::
        \ell_j = |\hat y_j - y_j|

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input, target: ``(*)``, same shape, in target units.
        - output: scalar, or ``(*)``; target units.

    References:
        Hastie, Tibshirani and Friedman, "The Elements of Statistical Learning", 2009, 10.6.

    Relations:
        Robust to outliers but not smooth at 0: :class:`HuberLoss`, :class:`SmoothL1Loss`,
        :class:`LogCoshLoss` are the smooth compromises; estimates the median.

    Example:
        >>> L1Loss()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item()
        1.5
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class MSELoss(nn.MSELoss):
    r"""Mean squared error (MSE, L2) (``torch.nn`` implementation).

    .. math::
        \ell_j = (\hat y_j - y_j)^2

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input, target: ``(*)``, same shape.
        - output: scalar, or ``(*)``; squared target units.

    References:
        Gauss, "Theoria combinationis observationum", 1823 (least squares).

    Relations:
        Estimates the mean; sensitive to outliers (use :class:`HuberLoss`); :class:`RMSELoss`
        reports it in target units.

    Example:
        >>> MSELoss()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item()
        2.5
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class HuberLoss(nn.HuberLoss):
    r"""Huber loss: quadratic for small residuals, linear beyond delta (``torch.nn``).

    .. math::
        \ell_j = \begin{cases} \tfrac12 r_j^2 & |r_j| \le \delta \\
        \delta (|r_j| - \tfrac12 \delta) & \text{otherwise} \end{cases}

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        delta: :math:`\delta > 0`, in target units.

    Shape:
        - input, target: ``(*)``; output: scalar, or ``(*)``.

    References:
        Huber, "Robust Estimation of a Location Parameter", Ann. Math. Statist. 1964.

    Relations:
        ``HuberLoss(delta) == delta * SmoothL1Loss(beta=delta)``, so the two coincide at 1;
        :class:`LogCoshLoss` is a smooth look-alike with delta about 1.

    Example:
        >>> HuberLoss(delta=1.0)(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0])).item()
        1.3125
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class SmoothL1Loss(nn.SmoothL1Loss):
    r"""Smooth L1 loss: quadratic below beta, L1 above (``torch.nn`` implementation).

    .. math::
        \ell_j = \begin{cases} \tfrac{1}{2\beta} r_j^2 & |r_j| < \beta \\
        |r_j| - \tfrac12 \beta & \text{otherwise} \end{cases}

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        beta: :math:`\beta \ge 0`, in target units; 0 is :class:`L1Loss`.

    Shape:
        - input, target: ``(*)``; output: scalar, or ``(*)``.

    References:
        Girshick, "Fast R-CNN", ICCV 2015.

    Relations:
        Equal to :class:`HuberLoss` with ``delta = beta`` divided by beta.

    Example:
        >>> SmoothL1Loss(beta=1.0)(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0])).item()
        1.3125
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(input)
        return super().forward(input, target)


class PoissonNLLLoss(nn.PoissonNLLLoss):
    r"""Negative log-likelihood of a Poisson target (``torch.nn`` implementation).

    .. math::
        \ell_j = \lambda_j - y_j \log \lambda_j \ [+\ y_j \log y_j - y_j + \tfrac12 \log(2\pi y_j)]

    with :math:`\lambda = e^{x}` when ``log_input`` (the term :math:`e^x - y x`), else
    :math:`\lambda = x` (then :math:`x - y \log(x + \text{eps})`); the bracket (Stirling)
    is added when ``full``.

    Args:
        log_input: the input is :math:`\log \lambda` (default) rather than :math:`\lambda`.
        full: add the Stirling approximation of :math:`\log y!`.
        eps: added inside the log when ``log_input=False``, avoids :math:`\log 0`.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input: ``(*)`` log-rates or rates; target: ``(*)`` counts; output: scalar or ``(*)``.

    References:
        McCullagh and Nelder, "Generalized Linear Models", 1989, chapter 6.

    Relations:
        For counts; :class:`MSELoss` assumes Gaussian noise instead.

    Example:
        >>> loss = PoissonNLLLoss(log_input=True)
        >>> round(loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])).item(), 4)
        0.8591
    """

    def forward(self, log_input: Tensor, target: Tensor) -> Tensor:
        check_nonempty(log_input)
        return super().forward(log_input, target)


# --------------------------------------------------------------------------------------
# Losses written here
# --------------------------------------------------------------------------------------


class RMSELoss(nn.Module):
    r"""Root mean squared error: MSE brought back to target units.

    Written here: torch has no RMSE. The square root is applied *after* the reduction, so
    ``'mean'`` is the usual RMSE, ``'sum'`` is the L2 norm of the residual and ``'none'``
    is :math:`|r_j|` per element. The gradient at a zero residual is set to 0 (not NaN).

    .. math::
        \text{RMSE} = \sqrt{\tfrac1n \textstyle\sum_j (\hat y_j - y_j)^2}

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input, target: ``(*)``; output: scalar, or ``(*)``; target units.

    References:
        Hyndman and Koehler, "Another look at measures of forecast accuracy", IJF 2006.

    Relations:
        Minimising it is minimising :class:`MSELoss` (prefer MSE for training; report RMSE).

    Example:
        >>> round(RMSELoss()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item(), 4)
        1.5811
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return rmse(input, target, self.reduction)


class MeanBiasError(nn.Module):
    r"""Mean bias error: the signed mean residual, a diagnostic of systematic over/under-shoot.

    Written here: torch has none. **Not a training objective**: it is unbounded below and
    positive and negative errors cancel; use it to check a model's bias next to
    :class:`L1Loss` or :class:`MSELoss`. Positive means the model over-predicts.

    .. math::
        \text{MBE} = \tfrac1n \textstyle\sum_j (\hat y_j - y_j)

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (signed residuals).

    Shape:
        - input, target: ``(*)``; output: scalar, or ``(*)``; target units.

    References:
        Willmott, "Some comments on the evaluation of model performance", BAMS 1982.

    Relations:
        :class:`L1Loss` is its unsigned counterpart; ``MBE == 0`` does not mean a good model.

    Example:
        >>> MeanBiasError()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item()
        -0.5
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mean_bias_error(input, target, self.reduction)


class LogCoshLoss(nn.Module):
    r"""Log-cosh loss: about :math:`r^2/2` near zero and :math:`|r| - \log 2` far out.

    Written here: torch has none. Computed as :math:`|r| + \operatorname{softplus}(-2|r|) -
    \log 2`, which stays finite where ``cosh`` overflows (|r| > 710 in float64).

    .. math::
        \ell_j = \log\cosh(\hat y_j - y_j)

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - input, target: ``(*)``; output: scalar, or ``(*)``; target units (far out).

    References:
        Chen et al., "Log Hyperbolic Cosine Loss Improves Variational Auto-Encoder", 2019.

    Relations:
        A twice-differentiable :class:`HuberLoss` with delta about 1.

    Example:
        >>> round(LogCoshLoss()(torch.tensor([0.0, 1000.0]), torch.tensor([0.0, 0.0])).item(), 4)
        499.6534
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return log_cosh_loss(input, target, self.reduction)
