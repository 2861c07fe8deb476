"""Explicit-pair ranking losses: MNRL against a loop, torch-exposed ones against torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from losses import ranking as K


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b).item() / (a.norm().item() * b.norm().item())


def test_mnrl_matches_loop_with_hard_negatives():
    g = torch.Generator().manual_seed(0)
    a, p = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    n = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    scale = 5.0
    candidates = list(p) + [n[i, k] for i in range(3) for k in range(2)]
    expected = []
    for i in range(3):
        scores = [scale * _cos(a[i], c) for c in candidates]
        expected.append(-scores[i] + math.log(sum(math.exp(s) for s in scores)))
    got = K.MultipleNegativesRankingLoss(scale=scale, reduction="none")(a, p, n)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    without = K.MultipleNegativesRankingLoss(scale=scale)(a, p)
    assert without.item() < got.mean().item()  # hard negatives only add to the denominator


def test_mnrl_gradcheck_and_errors():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, y: K.multiple_negatives_ranking_loss(x, y, scale=3.0), (a, p))
    with pytest.raises(ValueError, match="positives"):
        K.MultipleNegativesRankingLoss()(a, p[:2])
    with pytest.raises(ValueError, match="empty"):
        K.MultipleNegativesRankingLoss()(a[:0], p[:0])
    single = K.MultipleNegativesRankingLoss()(a[:1], p[:1])  # one pair, no negative
    assert single.item() == 0.0


def test_torch_exposed_ranking_losses_equal_torch():
    g = torch.Generator().manual_seed(1)
    x1, x2, x3 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(
        K.TripletMarginLoss(margin=0.5, swap=True)(x1, x2, x3),
        F.triplet_margin_loss(x1, x2, x3, margin=0.5, swap=True),
    )
    torch.testing.assert_close(
        K.CosineEmbeddingLoss(margin=0.2)(x1, x2, y),
        F.cosine_embedding_loss(x1, x2, y, margin=0.2),
    )
    torch.testing.assert_close(
        K.MarginRankingLoss(margin=0.1)(x1[:, 0], x2[:, 0], y),
        F.margin_ranking_loss(x1[:, 0], x2[:, 0], y, margin=0.1),
    )
    d = (x1 - x2).norm(dim=1)
    torch.testing.assert_close(
        K.HingeEmbeddingLoss(margin=2.0)(d, y), F.hinge_embedding_loss(d, y, margin=2.0)
    )
