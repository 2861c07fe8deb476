"""Training objectives: an embedding loss of :mod:`losses` wired with the miner that fits it.

An :class:`Objective` maps a labelled batch of embeddings to a scalar loss. How the batch is
turned into the loss's input depends on what the loss takes (``TRAINING_LOSSES``):

- ``tuples`` — PML-backed losses taking ``(embeddings, labels, indices_tuple)``: the miner's
  pairs or triplets are passed through (``all``: every pair or triplet of the batch);
- ``classes`` — losses taking ``(embeddings, labels)`` only (GE2E; the proxy and
  classification losses ArcFace, CosFace, proxy-anchor, proxy-NCA, SoftTriple, whose class
  weights are learnable parameters of the objective, hence optimised and checkpointed);
- ``pairs`` — losses on explicit pairs: contrastive, cosine-embedding, hinge-embedding. A pair
  miner returns ``(a1, p, a2, n)``; positives get target 1, negatives -1 (``all``: every pair);
- ``triplets`` — torch's triplet-margin loss on explicit ``(anchor, positive, negative)``;
- ``mnrl`` — multiple-negatives ranking: each class's K images of the P x K batch are split
  into K/2 anchor/positive pairs; round r scores the r-th pair of every class against the
  positives of the other classes (in-batch negatives, never a same-class "negative").

Triplet losses take triplet miners, pair losses pair miners; a combination that makes no sense
is refused with a :class:`~retrieval.errors.UserError` naming the miners that fit.

Example:
    >>> import torch
    >>> obj = build_objective("contrastive")
    >>> obj.miner_name
    'pair-margin'
    >>> x = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    >>> obj(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).ndim
    0
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor, nn

import losses
from losses.embedding import contrastive_loss
from losses.ranking import multiple_negatives_ranking_loss
from retrieval.errors import UserError

#: The miner name meaning "no miner": every pair or triplet of the batch.
ALL = "all"
#: Miners returning ``(anchors, positives, negatives)``.
TRIPLET_MINERS = ("batch-hard", "semi-hard", "easy-hard", "triplet-margin", "distance-weighted")
#: Miners returning ``(anchors1, positives, anchors2, negatives)``.
PAIR_MINERS = ("pair-margin", "multi-similarity")
#: Miners whose ``margin`` is the configuration's triplet ``margin``.
MARGIN_MINERS = ("semi-hard", "triplet-margin")


@dataclass(frozen=True)
class LossEntry:
    """How a registry loss is trained: its registry name, its input kind, the miners that fit
    (``ALL`` first when the loss can use the whole batch) and the natural one."""

    registry: str
    input: str
    miners: tuple[str, ...]
    default_miner: str


def _tuples(registry: str, miners: tuple[str, ...], default: str) -> LossEntry:
    return LossEntry(registry, "tuples", (ALL, *miners), default)


#: Training name -> how it is wired. Names are the registry's, plus ``infonce`` for NT-Xent.
TRAINING_LOSSES: dict[str, LossEntry] = {
    "triplet": _tuples("triplet", TRIPLET_MINERS, "semi-hard"),
    "contrastive": LossEntry("contrastive", "pairs", (ALL, *PAIR_MINERS), "pair-margin"),
    "cosine-embedding": LossEntry("cosine-embedding", "pairs", (ALL, *PAIR_MINERS), "pair-margin"),
    "hinge-embedding": LossEntry("hinge-embedding", "pairs", (ALL, *PAIR_MINERS), "pair-margin"),
    "arcface": LossEntry("arcface", "classes", (ALL,), ALL),
    "infonce": _tuples("nt-xent", PAIR_MINERS, ALL),
    "multiple-negatives-ranking": LossEntry("multiple-negatives-ranking", "mnrl", (ALL,), ALL),
    "triplet-margin": LossEntry("triplet-margin", "triplets", (ALL, *TRIPLET_MINERS), "batch-hard"),
    "nt-xent": _tuples("nt-xent", PAIR_MINERS, ALL),
    "supcon": _tuples("supcon", PAIR_MINERS, ALL),
    "multi-similarity": _tuples("multi-similarity", PAIR_MINERS, "multi-similarity"),
    "circle": _tuples("circle", PAIR_MINERS, ALL),
    "lifted-structure": _tuples("lifted-structure", PAIR_MINERS, ALL),
    "n-pairs": _tuples("n-pairs", (), ALL),
    "ge2e": LossEntry("ge2e", "classes", (ALL,), ALL),
    "cosface": LossEntry("cosface", "classes", (ALL,), ALL),
    "proxy-anchor": LossEntry("proxy-anchor", "classes", (ALL,), ALL),
    "proxy-nca": LossEntry("proxy-nca", "classes", (ALL,), ALL),
    "soft-triple": LossEntry("soft-triple", "classes", (ALL,), ALL),
}
#: The seven losses of the results table (docs/results.md), in its order.
NAMED_LOSSES = (
    "triplet",
    "contrastive",
    "cosine-embedding",
    "hinge-embedding",
    "arcface",
    "infonce",
    "multiple-negatives-ranking",
)
#: Every miner name accepted by ``--miner``.
MINERS = (ALL, *TRIPLET_MINERS, *PAIR_MINERS)


def fitting_miners(loss: str) -> tuple[str, ...]:
    """The miners that make sense with training loss ``loss``."""
    return _entry(loss).miners


def _entry(loss: str) -> LossEntry:
    if loss not in TRAINING_LOSSES:
        raise UserError(
            f"unknown loss {loss!r}; trainable embedding losses: {', '.join(TRAINING_LOSSES)}"
        )
    return TRAINING_LOSSES[loss]


# ------------------------------------------------------------------------- batch -> loss input


def _pairs_of(miner: nn.Module | None, emb: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
    return miner(emb, labels) if miner is not None else lmu.get_all_pairs_indices(labels)


def _pair_targets(a1: Tensor, p: Tensor, a2: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Left and right indices of every mined pair, with target 1 (same class) or -1."""
    left, right = torch.cat([a1, a2]), torch.cat([p, n])
    y = torch.cat([torch.ones_like(a1), -torch.ones_like(a2)]).float()
    return left, right, y


def _contrastive_on_pairs(
    loss: nn.Module, emb: Tensor, labels: Tensor, left: Tensor, right: Tensor
) -> Tensor:
    """The contrastive loss of the chosen pairs: the per-pair losses of ``contrastive_loss``
    (row-major ``i < j`` order), indexed by the pairs' positions."""
    per_pair = contrastive_loss(emb, labels, loss.margin, reduction="none")  # (B(B-1)/2,)
    i, j = torch.minimum(left, right), torch.maximum(left, right)
    b = len(labels)
    pos = i * b - i * (i + 1) // 2 + (j - i - 1)
    return per_pair[pos].mean()


def _forward_pairs(loss, miner, emb: Tensor, labels: Tensor) -> Tensor:
    left, right, y = _pair_targets(*_pairs_of(miner, emb, labels))
    if left.numel() == 0:  # the miner found nothing informative
        return emb.sum() * 0.0
    if isinstance(loss, losses.ContrastiveLoss):
        return _contrastive_on_pairs(loss, emb, labels, left, right)
    if isinstance(loss, losses.HingeEmbeddingLoss):
        distance = (emb[left] - emb[right]).pow(2).sum(1).clamp_min(1e-12).sqrt()  # (pairs,)
        return loss(distance, y)
    return loss(emb[left], emb[right], y)  # cosine-embedding


def _forward_triplets(loss, miner, emb: Tensor, labels: Tensor) -> Tensor:
    found = miner(emb, labels) if miner is not None else lmu.get_all_triplets_indices(labels)
    a, p, n = lmu.convert_to_triplets(found, labels) if len(found) == 4 else found
    if a.numel() == 0:
        return emb.sum() * 0.0
    return loss(emb[a], emb[p], emb[n])


def _forward_tuples(loss, miner, emb: Tensor, labels: Tensor) -> Tensor:
    return loss(emb, labels, miner(emb, labels) if miner is not None else None)


def _forward_classes(loss, miner, emb: Tensor, labels: Tensor) -> Tensor:
    return loss(emb, labels)


def mnrl_rounds(labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Anchor and positive indices of the MNRL rounds of a batch.

    Each class's images are split in order into pairs ``(2k, 2k+1)``; round ``r`` holds the
    ``r``-th pair of every class that has one, so a round has at most one pair per class.

    Example:
        >>> [(a.tolist(), p.tolist()) for a, p in mnrl_rounds(torch.tensor([0, 0, 1, 1, 0, 0]))]
        [([0, 2], [1, 3]), ([4], [5])]
    """
    per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    rounds = []
    for r in range(max(len(ix) for ix in per_class) // 2):
        pairs = [(ix[2 * r], ix[2 * r + 1]) for ix in per_class if len(ix) >= 2 * r + 2]
        rounds.append((torch.stack([a for a, _ in pairs]), torch.stack([p for _, p in pairs])))
    return rounds


def _forward_mnrl(loss, miner, emb: Tensor, labels: Tensor) -> Tensor:
    rounds = [(a, p) for a, p in mnrl_rounds(labels) if len(a) >= 2]
    if not rounds:
        return emb.sum() * 0.0
    values = [multiple_negatives_ranking_loss(emb[a], emb[p], scale=loss.scale) for a, p in rounds]
    return torch.stack(values).mean()


_FORWARDS: dict[str, Callable[..., Tensor]] = {
    "tuples": _forward_tuples,
    "classes": _forward_classes,
    "pairs": _forward_pairs,
    "triplets": _forward_triplets,
    "mnrl": _forward_mnrl,
}


class Objective(nn.Module):
    """A loss, its miner and the way a batch reaches them; the loss's learnable parameters
    (ArcFace's class weights, proxies) are this module's parameters.

    Args:
        name: the training loss name (``TRAINING_LOSSES``).
        loss: the loss module.
        miner: the miner module, or None for every pair or triplet.
        miner_name: the miner's name (``ALL`` when None).

    Shape:
        embeddings ``(batch, dim)``, labels ``(batch,)`` -> scalar.
    """

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None, miner_name: str):
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner
        self.miner_name = miner_name
        self._forward = _FORWARDS[_entry(name).input]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._forward(self.loss, self.miner, embeddings, labels)


def _accepts(cls_or_fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(cls_or_fn).parameters


def build_objective(
    loss: str = "triplet",
    miner: str | None = None,
    *,
    margin: float | None = None,
    loss_args: dict[str, Any] | None = None,
    miner_args: dict[str, Any] | None = None,
    num_classes: int | None = None,
    embedding_size: int | None = None,
) -> Objective:
    """The objective for training loss ``loss`` with ``miner`` (None: the loss's natural one).

    Args:
        loss: a name of ``TRAINING_LOSSES``.
        miner: a name of ``MINERS`` that fits the loss, or None.
        margin: the triplet margin (distance units) for ``triplet`` / ``triplet-margin`` and
            the semi-hard and triplet-margin miners, unless ``loss_args`` / ``miner_args`` set it.
        loss_args: keyword arguments of the loss (see docs/losses.md).
        miner_args: keyword arguments of the miner (see losses.miners).
        num_classes: classes of the training labels (0..C-1), for proxy and class losses.
        embedding_size: length of the embeddings the loss sees, for proxy and class losses.

    Raises:
        UserError: unknown loss or miner, a miner that does not fit, bad arguments.
    """
    entry = _entry(loss)
    chosen = entry.default_miner if miner is None else miner
    if chosen not in MINERS:
        raise UserError(f"unknown miner {chosen!r}; miners: {', '.join(MINERS)}")
    if chosen not in entry.miners:
        if any(m in TRIPLET_MINERS for m in entry.miners):
            why = "it trains on triplets"
        elif any(m in PAIR_MINERS for m in entry.miners):
            why = "it trains on pairs"
        else:
            why = "it forms its own pairs or class comparisons"
        raise UserError(
            f"miner {chosen!r} does not fit loss {loss!r} ({why}); miners that fit: "
            f"{', '.join(entry.miners)}"
        )
    largs = dict(loss_args or {})
    margs = dict(miner_args or {})
    cls = losses.registry.LOSSES[entry.registry][1]
    if _accepts(cls.__init__, "num_classes"):
        if num_classes is None or embedding_size is None:
            raise UserError(f"loss {loss!r} needs num_classes and embedding_size")
        largs.setdefault("num_classes", num_classes)
        largs.setdefault("embedding_size", embedding_size)
    if margin is not None and loss in ("triplet", "triplet-margin"):
        largs.setdefault("margin", margin)
    if margin is not None and chosen in MARGIN_MINERS:
        margs.setdefault("margin", margin)
    try:
        loss_fn = losses.build_loss(entry.registry, **largs)
        miner_fn = None if chosen == ALL else losses.build_miner(chosen, **margs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"loss {loss!r} with miner {chosen!r}: {exc}") from None
    return Objective(loss, loss_fn, miner_fn, chosen)


def pair_cosine(embeddings: Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of ``embeddings`` ``(n, dim)``: near 1
    when the embeddings have collapsed to one direction."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    x = F.normalize(embeddings.float(), dim=1)
    total = x.sum(0)
    return float((total @ total - n) / (n * (n - 1)))
