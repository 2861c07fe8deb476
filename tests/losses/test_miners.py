"""Miners: registry, plugging into losses, batch-hard = most offending incorrect answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses import build_miner, most_offending_incorrect, registry
from losses.embedding import TripletLoss

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])


@pytest.mark.parametrize("name", registry.available_miners())
def test_every_miner_builds_and_feeds_a_loss(name):
    torch.manual_seed(0)
    x = torch.randn(8, 4, requires_grad=True)
    miner = build_miner(name)
    indices = miner(x, LABELS)
    assert all(t.ndim == 1 for t in indices)
    if len(indices) == 3:  # (anchors, positives, negatives)
        assert len({len(t) for t in indices}) == 1
    else:  # (anchors1, positives, anchors2, negatives)
        assert len(indices) == 4
        assert len(indices[0]) == len(indices[1]) and len(indices[2]) == len(indices[3])
    loss = TripletLoss(margin=0.2)(x, LABELS, indices)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_batch_hard_negative_is_the_most_offending_incorrect_answer():
    torch.manual_seed(1)
    x = torch.randn(8, 4)
    anchors, positives, negatives = build_miner("batch-hard")(x, LABELS)
    xn = F.normalize(x, dim=1)
    dist = torch.cdist(xn, xn)  # energies: distance from each anchor to every sample
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        # one "answer" per class: the closest member of each class is what a wrong answer costs
        energies = torch.stack([dist[a][LABELS == c].min() for c in range(3)]).unsqueeze(0)
        _, wrong_class = most_offending_incorrect(energies, LABELS[a : a + 1])
        assert LABELS[n].item() == wrong_class.item()
        same = (LABELS == LABELS[a]) & (torch.arange(8) != a)
        assert dist[a, p].item() == pytest.approx(dist[a][same].max().item(), abs=1e-6)


def test_semi_hard_triplets_satisfy_definition():
    torch.manual_seed(2)
    x = torch.randn(8, 4)
    a, p, n = build_miner("semi-hard", margin=0.5)(x, LABELS)
    xn = F.normalize(x, dim=1)
    d_ap = (xn[a] - xn[p]).norm(dim=1)
    d_an = (xn[a] - xn[n]).norm(dim=1)
    assert ((d_an > d_ap - 1e-6) & (d_an <= d_ap + 0.5 + 1e-6)).all()


def test_miner_registry_errors():
    with pytest.raises(ValueError, match="batch-hard"):
        build_miner("hardest")
    with pytest.raises(TypeError, match="margin"):
        build_miner("batch-hard", margin=0.1)
    with pytest.raises(ValueError, match="distance"):
        build_miner("batch-hard", distance="manhattan")
