r"""Batch miners: pick informative pairs or triplets of a labelled batch (PML's miners).

A miner maps ``(embeddings, labels)`` to an ``indices_tuple`` that the embedding losses take as
their third argument::

    miner = build_miner("batch-hard")
    loss = TripletLoss(margin=0.2)
    value = loss(embeddings, labels, miner(embeddings, labels))

All miners are PML's; the builders below only fix their names, defaults and distance
(``"l2"``: Euclidean on L2-normalised embeddings, ``"cosine"``: cosine similarity).
Triplet miners return ``(anchors, positives, negatives)``; pair miners return
``(anchors1, positives, anchors2, negatives)``.

The batch-hard negative of an anchor is the *most offending incorrect answer* of
:func:`losses.energy.most_offending_incorrect` with distances as energies.
"""

from __future__ import annotations

from pytorch_metric_learning import miners as pml_miners

from ._pml import make_distance

#: Margin of the triplet-margin and semi-hard miners (distance units).
TRIPLET_MINER_MARGIN = 0.2


def batch_hard(distance: str = "l2") -> pml_miners.BatchHardMiner:
    r"""Hardest positive and hardest negative per anchor (Hermans et al., 2017).

    .. math::
        p^*(a) = \arg\max_{p: y_p = y_a} d(a, p),\qquad n^*(a) = \arg\min_{n: y_n \ne y_a} d(a, n)

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 1.0], [0.0, 0.9], [1.0, 0.0], [0.7, 0.7]])
        >>> a, p, n = batch_hard()(x, torch.tensor([0, 0, 1, 1]))
        >>> a.tolist(), n.tolist()
        ([0, 1, 2, 3], [3, 3, 0, 0])
    """
    return pml_miners.BatchHardMiner(distance=make_distance(distance))


def easy_hard(distance: str = "l2") -> pml_miners.BatchEasyHardMiner:
    """Easiest (closest) positive and hardest negative per anchor (Xuan et al., WACV 2020)."""
    return pml_miners.BatchEasyHardMiner(
        pos_strategy="easy", neg_strategy="hard", distance=make_distance(distance)
    )


def semi_hard(
    margin: float = TRIPLET_MINER_MARGIN, distance: str = "l2"
) -> pml_miners.TripletMarginMiner:
    r"""All semi-hard triplets: :math:`d(a,p) < d(a,n) < d(a,p) + m` (Schroff et al., 2015)."""
    return pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets="semihard", distance=make_distance(distance)
    )


def triplet_margin(
    margin: float = TRIPLET_MINER_MARGIN, type_of_triplets: str = "all", distance: str = "l2"
) -> pml_miners.TripletMarginMiner:
    r"""Triplets violating the margin, :math:`d(a,n) - d(a,p) \le m`; ``type_of_triplets`` is
    ``'all'``, ``'hard'`` (:math:`d(a,n) < d(a,p)`), ``'semihard'`` or ``'easy'``."""
    return pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets=type_of_triplets, distance=make_distance(distance)
    )


def pair_margin(
    pos_margin: float = 0.2, neg_margin: float = 0.8, distance: str = "l2"
) -> pml_miners.PairMarginMiner:
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``."""
    return pml_miners.PairMarginMiner(
        pos_margin=pos_margin, neg_margin=neg_margin, distance=make_distance(distance)
    )


def multi_similarity(epsilon: float = 0.1) -> pml_miners.MultiSimilarityMiner:
    r"""Pairs chosen by relative cosine similarity (Wang et al., CVPR 2019): negatives with
    :math:`s_{an} + \epsilon > \min_p s_{ap}`, positives with
    :math:`s_{ap} - \epsilon < \max_n s_{an}`."""
    return pml_miners.MultiSimilarityMiner(epsilon=epsilon)


def distance_weighted(
    cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> pml_miners.DistanceWeightedMiner:
    """Negatives sampled with weight inverse to the density of distances on the sphere
    (Wu et al., ICCV 2017); needs L2-normalised embeddings."""
    return pml_miners.DistanceWeightedMiner(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff)
