"""Every trainable loss with every miner that fits it; refused combinations; MNRL pairing."""

from __future__ import annotations

import pytest
import torch

from retrieval.errors import UserError
from retrieval.training.objectives import (
    ALL,
    MINERS,
    NAMED_LOSSES,
    TRAINING_LOSSES,
    build_objective,
    mnrl_rounds,
    pair_cosine,
)

CASES = [(loss, miner) for loss, entry in TRAINING_LOSSES.items() for miner in entry.miners]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    return x.requires_grad_(), torch.arange(4).repeat_interleave(4)


@pytest.mark.parametrize("loss,miner", CASES)
def test_every_loss_and_fitting_miner_gives_a_finite_loss_with_gradients(loss, miner):
    x, y = _batch()
    objective = build_objective(loss, miner, margin=0.2, num_classes=4, embedding_size=8)
    value = objective(x, y)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert objective.miner_name == miner


def test_the_named_losses_all_exist_with_a_natural_miner():
    assert set(NAMED_LOSSES) <= set(TRAINING_LOSSES)
    natural = {n: TRAINING_LOSSES[n].default_miner for n in NAMED_LOSSES}
    assert natural["triplet"] == "semi-hard"
    for pair_loss in ("contrastive", "cosine-embedding", "hinge-embedding"):
        assert natural[pair_loss] == "pair-margin"


@pytest.mark.parametrize("loss", ["arcface", "cosface", "proxy-anchor", "soft-triple"])
def test_class_weights_are_parameters_of_the_objective(loss):
    objective = build_objective(loss, num_classes=5, embedding_size=8)
    names = [n for n, _ in objective.named_parameters()]
    assert names, "the proxies must reach the optimizer"
    assert set(objective.state_dict()) >= set(names)


@pytest.mark.parametrize(
    "loss,miner,fits",
    [
        ("contrastive", "batch-hard", "all, pair-margin, multi-similarity"),
        ("triplet", "pair-margin", "batch-hard, semi-hard"),
        ("arcface", "semi-hard", "miners that fit: all"),
        ("multiple-negatives-ranking", "multi-similarity", "miners that fit: all"),
        ("infonce", "distance-weighted", "pair-margin, multi-similarity"),
    ],
)
def test_a_miner_that_does_not_fit_is_refused_naming_those_that_do(loss, miner, fits):
    with pytest.raises(UserError, match=f"does not fit loss '{loss}'") as err:
        build_objective(loss, miner, num_classes=4, embedding_size=8)
    assert fits in str(err.value)


def test_unknown_names_and_arguments_are_refused():
    with pytest.raises(UserError, match="unknown loss 'focal'"):
        build_objective("focal")  # a classification loss: not an embedding objective
    with pytest.raises(UserError, match="unknown miner"):
        build_objective("triplet", "hardest")
    with pytest.raises(UserError, match="unknown arguments"):
        build_objective("triplet", loss_args={"margn": 0.1})
    assert set(MINERS) >= {
        ALL,
        "batch-hard",
        "semi-hard",
        "easy-hard",
        "pair-margin",
        "multi-similarity",
        "distance-weighted",
    }


def test_mnrl_rounds_pair_same_class_images_and_never_repeat_a_class_in_a_round():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 0, 1])
    for anchors, positives in mnrl_rounds(labels):
        assert torch.equal(labels[anchors], labels[positives])
        assert len(set(labels[anchors].tolist())) == len(anchors)


def test_mnrl_is_low_when_pairs_match_and_others_are_apart():
    y = torch.arange(4).repeat_interleave(2)
    good = torch.eye(4).repeat_interleave(2, dim=0)  # each class its own direction
    bad = torch.nn.functional.normalize(torch.ones(8, 4) + 0.01 * torch.randn(8, 4), dim=1)
    objective = build_objective("multiple-negatives-ranking")
    assert objective(good, y) < 1e-3 < objective(bad, y)


def test_pair_cosine_detects_identical_embeddings():
    same = torch.ones(10, 4)
    assert pair_cosine(same) == pytest.approx(1.0)
    assert abs(pair_cosine(torch.eye(4))) < 1e-6
