"""Adapter that exposes pytorch-metric-learning losses behind the package conventions.

PML losses reduce through *reducer* objects; here they take a torch-style ``reduction``
string instead, check their inputs (empty batch -> ``ValueError``) and keep PML's own
``forward(embeddings, labels, indices_tuple=None)`` so miners still plug in.
The PML module is held as a sub-module (composition), so its learnable parameters
(proxies, class weights) are seen by ``parameters()`` and ``state_dict()``.
"""

from __future__ import annotations

from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor, nn

from ._common import check_embeddings, check_reduction

#: Names accepted wherever a loss or miner takes a ``distance`` argument.
DISTANCES: tuple[str, ...] = ("l2", "cosine")


def make_distance(name: str) -> pml_distances.BaseDistance:
    """Build a PML distance from a short name.

    ``"l2"``: Euclidean distance between L2-normalised embeddings (PML's default);
    ``"cosine"``: cosine similarity (larger means closer).
    """
    if name == "l2":
        return pml_distances.LpDistance(normalize_embeddings=True, p=2)
    if name == "cosine":
        return pml_distances.CosineSimilarity()
    raise ValueError(f"distance must be one of {list(DISTANCES)}, got {name!r}")


class PMLLoss(nn.Module):
    """Hold a PML loss; map ``reduction`` onto PML reducers.

    ``'mean'`` keeps the loss's own PML reducer (for example the mean over triplets with a
    non-zero loss for the triplet loss, as in the papers); ``'sum'`` sums the per-pair,
    per-triplet or per-sample losses; ``'none'`` is available only for losses with exactly
    one loss per sample (``per_sample=True``) and returns shape ``(batch,)``.
    """

    def __init__(self, loss: BaseMetricLossFunction, reduction: str, per_sample: bool) -> None:
        super().__init__()
        allowed = ("mean", "sum", "none") if per_sample else ("mean", "sum")
        self.reduction = check_reduction(reduction, allowed)
        if reduction == "sum":
            loss.set_reducer(pml_reducers.SumReducer())
        elif reduction == "none":
            loss.set_reducer(pml_reducers.DoNothingReducer())
        self.pml = loss

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """Loss of ``embeddings`` ``(batch, dim)`` with integer ``labels`` ``(batch,)``.

        ``indices_tuple`` is the output of a miner (see :mod:`losses.miners`).
        """
        check_embeddings(embeddings, labels)
        out = self.pml(embeddings, labels, indices_tuple)
        if self.reduction == "none":
            losses = out["loss"]["losses"]
            if not isinstance(losses, Tensor):  # PML's "no valid sample" zero
                return embeddings.new_zeros(embeddings.shape[0]) + 0 * embeddings.sum()
            return losses
        return out
