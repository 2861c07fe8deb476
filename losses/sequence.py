r"""Sequence losses and distances: CTC, exact edit distance, and a differentiable edit distance.

CTC is ``torch.nn.CTCLoss`` (thin subclass: documentation and the empty-batch check).
Written here, because neither torch nor PML has them: the exact batched Levenshtein distance
and error rate (metrics, not differentiable) and a soft-min relaxation of the edit-distance
recursion that can be trained through.

Padded batches: sequences are right-padded tensors with a length per row; padding values are
ignored. Insertions, deletions and substitutions all cost 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_nonempty, check_reduction, reduce

#: Soft-min temperature of the differentiable edit distance (edit-operation units).
SOFT_EDIT_TEMPERATURE = 0.1


def _lengths(lengths: Tensor | None, batch: int, max_len: int, name: str) -> Tensor:
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"{name} must lie in [0, {max_len}], got {lengths.tolist()}")
    return lengths


def edit_distance(
    hypotheses: Tensor,
    references: Tensor,
    hypothesis_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
) -> Tensor:
    r"""Exact Levenshtein distance per row of two padded batches of token sequences.

    .. math::
        D_{i,j} = \min(D_{i-1,j} + 1,\ D_{i,j-1} + 1,\ D_{i-1,j-1} + [h_i \ne r_j]),\quad
        D_{i,0} = i,\ D_{0,j} = j

    Vectorised over the batch and over each row of the table (the in-row dependency is a
    cumulative minimum), so it costs one small tensor step per hypothesis position.

    Args:
        hypotheses: ``(batch, T)`` integer tokens.
        references: ``(batch, S)`` integer tokens.
        hypothesis_lengths: ``(batch,)`` true lengths; default all ``T``.
        reference_lengths: ``(batch,)`` true lengths; default all ``S``.

    Returns:
        ``(batch,)`` int64 number of edits.

    Example:
        >>> hyp = torch.tensor([[1, 2, 3, 0], [5, 5, 5, 5]])
        >>> ref = torch.tensor([[1, 3, 3], [5, 5, 0]])
        >>> edit_distance(hyp, ref, torch.tensor([3, 4]), torch.tensor([3, 2]))
        tensor([1, 2])
    """
    if hypotheses.ndim != 2 or references.ndim != 2:
        raise ValueError("hypotheses and references must be (batch, length) tensors")
    if hypotheses.shape[0] != references.shape[0]:
        raise ValueError("hypotheses and references must have the same batch size")
    check_nonempty(hypotheses.new_empty(hypotheses.shape[0]), "hypotheses")
    batch, max_t = hypotheses.shape
    max_s = references.shape[1]
    hyp_len = _lengths(hypothesis_lengths, batch, max_t, "hypothesis_lengths")
    ref_len = _lengths(reference_lengths, batch, max_s, "reference_lengths")
    hyp, ref = hypotheses.cpu(), references.cpu()
    cols = torch.arange(max_s + 1)
    row = cols.expand(batch, -1).clone()  # D[0, j] = j
    result = torch.where(hyp_len == 0, ref_len, 0)
    for i in range(1, max_t + 1):
        mismatch = (hyp[:, i - 1 : i] != ref).long()  # (batch, S)
        step = torch.empty_like(row)
        step[:, 0] = i
        step[:, 1:] = torch.minimum(row[:, 1:] + 1, row[:, :-1] + mismatch)
        row = torch.cummin(step - cols, dim=1).values + cols  # insertions along the row
        done = hyp_len == i
        result = torch.where(done, row.gather(1, ref_len.unsqueeze(1)).squeeze(1), result)
    return result


def error_rate(
    hypotheses: Tensor,
    references: Tensor,
    hypothesis_lengths: Tensor | None = None,
    reference_lengths: Tensor | None = None,
    reduction: str = "none",
) -> Tensor:
    r"""Edit distance normalised by the reference length (WER on words, CER on characters).

    .. math::
        \text{ER}_b = \frac{\operatorname{lev}(h_b, r_b)}{|r_b|}

    With ``reduction='mean'`` this is the corpus rate :math:`\sum_b \operatorname{lev}_b /
    \sum_b |r_b|` (the standard WER), not the mean of the per-row rates.

    Args:
        hypotheses, references, hypothesis_lengths, reference_lengths: as in
            :func:`edit_distance`.
        reduction: ``'none'`` (per row, default) or ``'mean'`` (corpus rate).

    Returns:
        ``(batch,)`` or scalar float rates; can exceed 1 (many insertions).

    Raises:
        ValueError: on an empty reference (the rate is undefined).

    Example:
        >>> error_rate(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 3, 3, 4]]))
        tensor([0.5000])
    """
    check_reduction(reduction, ("none", "mean"))
    dist = edit_distance(hypotheses, references, hypothesis_lengths, reference_lengths)
    ref_len = _lengths(reference_lengths, references.shape[0], references.shape[1], "lengths")
    if bool((ref_len == 0).any()):
        raise ValueError("error rate is undefined for an empty reference; drop those rows")
    if reduction == "mean":
        return dist.sum().to(torch.get_default_dtype()) / ref_len.sum()
    return dist.to(torch.get_default_dtype()) / ref_len


def soft_edit_distance(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | None = None,
    target_lengths: Tensor | None = None,
    temperature: float = SOFT_EDIT_TEMPERATURE,
) -> Tensor:
    """Differentiable edit distance per row; see :class:`SoftEditDistanceLoss`."""
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be (batch, time, classes), got {tuple(log_probs.shape)}")
    check_nonempty(log_probs, "log_probs")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, max_t, n_classes = log_probs.shape
    max_s = targets.shape[1]
    in_len = _lengths(input_lengths, batch, max_t, "input_lengths").to(log_probs.device)
    tgt_len = _lengths(target_lengths, batch, max_s, "target_lengths").to(log_probs.device)
    gamma = temperature
    # A finite stand-in for +inf: far enough above every reachable cost that exp(-big/gamma)
    # vanishes next to them, while keeping log-sum-exp gradients finite (no inf - inf).
    big = float(max_t + max_s + 2) + (2.0 * (max_t + max_s) + 1000.0) * gamma
    safe_targets = targets.clamp(0, n_classes - 1).unsqueeze(1).expand(batch, max_t, max_s)
    sub = 1.0 - torch.exp(log_probs.gather(2, safe_targets))  # (batch, T, S) 1 - p_t(y_s)
    sub = F.pad(sub, (1, 0, 1, 0), value=big)  # (batch, T+1, S+1), sub[:, i, j] for cell i, j
    rows = torch.arange(max_t + 1, device=log_probs.device)
    big_col = log_probs.new_full((batch, 1), big)
    prev2 = log_probs.new_full((batch, max_t + 1), big)  # anti-diagonal k-2, indexed by i
    prev1 = torch.cat([log_probs.new_zeros(batch, 1), prev2[:, 1:]], dim=1)  # k = 0
    diagonals = [prev1]
    for k in range(1, max_t + max_s + 1):
        cols = k - rows
        valid = (cols >= 0) & (cols <= max_s)
        deletion = torch.cat([big_col, prev1[:, :-1]], dim=1) + 1.0  # from (i-1, j)
        insertion = prev1 + 1.0  # from (i, j-1)
        substitution = (
            torch.cat([big_col, prev2[:, :-1]], dim=1) + sub[:, rows, cols.clamp(0, max_s)]
        )
        options = torch.stack([deletion, insertion, substitution])  # (3, batch, T+1)
        cur = -gamma * torch.logsumexp(-options / gamma, dim=0)
        cur = torch.where(valid, cur, torch.full_like(cur, big))
        diagonals.append(cur)
        prev2, prev1 = prev1, cur
    table = torch.stack(diagonals, dim=1)  # (batch, T+S+1, T+1)
    return table[torch.arange(batch, device=log_probs.device), in_len + tgt_len, in_len]


class CTCLoss(nn.CTCLoss):
    r"""Connectionist temporal classification loss (``torch.nn`` implementation).

    .. math::
        \ell_b = -\log \sum_{\pi \in \mathcal{B}^{-1}(y_b)} \prod_t p_t(\pi_t)

    where :math:`\mathcal{B}` removes repeats then blanks from a frame-level path :math:`\pi`.

    Args:
        blank: index of the blank class.
        reduction: ``'mean'`` (each loss divided by its target length, then batch mean),
            ``'sum'`` or ``'none'``.
        zero_infinity: replace infinite losses (input too short for the target) by 0.

    Shape:
        - log_probs: ``(time, batch, classes)`` log-softmax outputs (nats), time first.
        - targets: ``(batch, S)`` padded ids (no blank); input_lengths, target_lengths:
          ``(batch,)``.
        - output: scalar, or ``(batch,)``.

    References:
        Graves et al., "Connectionist Temporal Classification", ICML 2006.

    Relations:
        Needs monotonic alignment with input at least as long as the target;
        :class:`SoftEditDistanceLoss` compares a frame sequence to a target of any length.

    Example:
        >>> log_probs = torch.log_softmax(torch.zeros(4, 1, 3), dim=2)
        >>> targets, lengths = torch.tensor([[1, 2]]), torch.tensor([2])
        >>> round(CTCLoss()(log_probs, targets, torch.tensor([4]), lengths).item(), 4)
        0.8432
    """

    def forward(
        self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor
    ) -> Tensor:
        if log_probs.ndim == 3:
            check_nonempty(log_probs.transpose(0, 1), "log_probs")
        return super().forward(log_probs, targets, input_lengths, target_lengths)


class SoftEditDistanceLoss(nn.Module):
    r"""Differentiable edit distance between per-frame class scores and a target sequence.

    Written here: no library has it. The Levenshtein recursion with the hard minimum replaced
    by a soft minimum at temperature :math:`\gamma` and the 0/1 substitution cost replaced by
    one minus the probability of the target token:

    .. math::
        D_{i,j} = \operatorname{softmin}_\gamma\bigl(D_{i-1,j} + 1,\ D_{i,j-1} + 1,\
        D_{i-1,j-1} + 1 - p_i(y_j)\bigr),\qquad
        \operatorname{softmin}_\gamma(a) = -\gamma \log \textstyle\sum_k e^{-a_k/\gamma}

    with :math:`D_{i,0} = i, D_{0,j} = j`; the loss is :math:`D_{T,S}`. On one-hot inputs it
    tends to the exact :func:`edit_distance` as :math:`\gamma \to 0` (from below: the soft
    minimum is at most the minimum, by at most :math:`\gamma \log 3` per step). Computed on
    anti-diagonals: ``T + S`` tensor steps.

    Args:
        temperature: :math:`\gamma > 0`, in edit-operation units; small values are closer to
            the exact distance, large values give smoother gradients.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Shape:
        - log_probs: ``(batch, T, classes)`` log-probabilities, **batch first**.
        - targets: ``(batch, S)`` padded ids; input_lengths, target_lengths: ``(batch,)``,
          default the full lengths.
        - output: scalar, or ``(batch,)``; edit-operation units.

    References:
        Cuturi and Blondel, "Soft-DTW: a Differentiable Loss Function for Time-Series",
        ICML 2017 (the soft-min relaxation); Levenshtein, "Binary codes capable of correcting
        deletions, insertions and reversals", 1966.

    Relations:
        :class:`CTCLoss` marginalises over alignments instead; :func:`edit_distance` and
        :func:`error_rate` are the exact metrics to report.

    Example:
        >>> onehot = torch.eye(3)[torch.tensor([[0, 1, 2]])]  # frames "0 1 2"
        >>> log_probs = torch.log(onehot.clamp_min(1e-12))
        >>> loss = SoftEditDistanceLoss(temperature=0.01)
        >>> round(loss(log_probs, torch.tensor([[0, 2]])).item(), 2)
        1.0
    """

    def __init__(self, temperature: float = SOFT_EDIT_TEMPERATURE, reduction: str = "mean") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.reduction = check_reduction(reduction)

    def forward(
        self,
        log_probs: Tensor,
        targets: Tensor,
        input_lengths: Tensor | None = None,
        target_lengths: Tensor | None = None,
    ) -> Tensor:
        loss = soft_edit_distance(
            log_probs, targets, input_lengths, target_lengths, self.temperature
        )
        return reduce(loss, self.reduction)
