"""Energy-based losses against per-sample loops and the properties of LeCun et al. (2006)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from losses import energy as E
from losses.classification import MultiMarginLoss

FAST = settings(max_examples=30, deadline=None)
energy_rows = st.lists(
    st.lists(st.floats(0.01, 10, allow_nan=False), min_size=3, max_size=3),
    min_size=1,
    max_size=4,
)

ENERGIES = torch.tensor([[0.5, 0.2, 0.9, 1.4], [2.0, 3.0, 0.7, 1.1]], dtype=torch.float64)
TARGET = torch.tensor([1, 3])


def _rows():
    for e, y in zip(ENERGIES.tolist(), TARGET.tolist(), strict=True):
        wrong = min(v for k, v in enumerate(e) if k != y)
        yield e, y, e[y], wrong


def _loop(fn):
    return torch.tensor([fn(*r) for r in _rows()], dtype=torch.float64)


REFERENCES = {
    E.EnergyLoss: lambda e, y, ey, eb: ey,
    E.PerceptronLoss: lambda e, y, ey, eb: ey - min(e),
    E.EnergyHingeLoss: lambda e, y, ey, eb: max(0.0, 1.0 + ey - eb),
    E.EnergyLogLoss: lambda e, y, ey, eb: math.log(1 + math.exp(ey - eb)),
    E.SquareSquareLoss: lambda e, y, ey, eb: ey**2 + max(0.0, 1.0 - eb) ** 2,
    E.SquareExponentialLoss: lambda e, y, ey, eb: ey**2 + math.exp(-eb),
    E.LVQ2Loss: lambda e, y, ey, eb: min(1.0, max(0.0, (ey - eb) / eb)),
    E.MCELoss: lambda e, y, ey, eb: 1 / (1 + math.exp(-(ey - eb))),
    E.NLLEnergyLoss: lambda e, y, ey, eb: ey + math.log(sum(math.exp(-v) for v in e)),
    E.GeneralizedMarginLoss: lambda e, y, ey, eb: sum(
        max(0.0, ey - v + 1.0) for k, v in enumerate(e) if k != y
    ),
}


@pytest.mark.parametrize("cls", list(REFERENCES), ids=lambda c: c.__name__)
def test_matches_per_sample_loop(cls):
    got = cls(reduction="none")(ENERGIES, TARGET)
    torch.testing.assert_close(got, _loop(REFERENCES[cls]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", list(REFERENCES), ids=lambda c: c.__name__)
def test_gradcheck(cls):
    e = (ENERGIES + 0.013).clone().requires_grad_()  # away from hinge kinks and ties
    loss = cls()
    assert gradcheck(lambda z: loss(z, TARGET), (e,))


def test_most_offending_incorrect_discrete_and_continuous():
    values, idx = E.most_offending_incorrect(ENERGIES, TARGET)
    assert idx.tolist() == [0, 2] and values.tolist() == [0.5, 0.7]
    cands = torch.tensor([[0.0, 0.0], [0.05, 0.0], [1.0, 0.0], [0.0, 2.0]])
    e = torch.tensor([[0.0, -1.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0]])
    correct = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    values, idx = E.most_offending_incorrect_continuous(e, cands, correct, epsilon=0.1)
    assert idx.tolist()[0] == 3 and values.tolist()[0] == pytest.approx(0.2)
    assert idx.tolist()[1] != 2  # the correct answer itself is excluded
    with pytest.raises(ValueError, match="epsilon"):
        E.most_offending_incorrect_continuous(e[:1], cands, correct[:1], epsilon=10.0)


def test_generalized_margin_with_matrix_and_relation_to_multi_margin():
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    got = E.GeneralizedMarginLoss(margin_matrix=torch.full((3, 3), 0.7, dtype=torch.float64))(-x, y)
    torch.testing.assert_close(got, 3 * MultiMarginLoss(margin=0.7)(x, y), atol=1e-6, rtol=0)
    cost = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    loss = E.GeneralizedMarginLoss(margin_matrix=cost, h=F.softplus, reduction="none")
    e = torch.tensor([[0.0, 0.0, 0.0]])
    expected = math.log(1 + math.e) + math.log(1 + math.e**2)
    assert loss(e, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="margin_matrix"):
        E.GeneralizedMarginLoss(margin_matrix=torch.ones(2, 2))(e, torch.tensor([0]))


@FAST
@given(energy_rows, st.integers(0, 2), st.floats(0.1, 3))
def test_perceptron_and_hinge_zero_exactly_when_correct_wins(rows, y, margin):
    e = torch.tensor(rows, dtype=torch.float64)
    t = torch.full((len(rows),), y)
    perc = E.PerceptronLoss("none")(e, t)
    hinge = E.EnergyHingeLoss(margin, "none")(e, t)
    for i, row in enumerate(rows):
        others = [v for k, v in enumerate(row) if k != y]
        assert perc[i].item() >= 0
        assert (perc[i].item() == 0) == (row[y] <= min(others))
        assert hinge[i].item() >= 0
        assert (hinge[i].item() == 0) == (min(others) - row[y] >= margin)


@FAST
@given(energy_rows, st.integers(0, 2))
def test_nll_tends_to_perceptron_and_losses_are_nonnegative(rows, y):
    e = torch.tensor(rows, dtype=torch.float64)
    t = torch.full((len(rows),), y)
    perc = E.perceptron_loss(e, t, "none")
    gaps = []
    for beta in (1.0, 10.0, 100.0, 1000.0):
        nll = E.nll_energy_loss(e, t, beta, "none")
        assert (nll >= perc - 1e-12).all()
        assert (nll - perc <= math.log(3) / beta + 1e-12).all()
        gaps.append((nll - perc).max().item())
    assert gaps[-1] <= gaps[0]
    for cls in (E.EnergyLogLoss, E.SquareSquareLoss, E.SquareExponentialLoss, E.LVQ2Loss):
        assert (cls(reduction="none")(e, t) >= 0).all()
    mce = E.MCELoss("none")(e, t)
    assert ((mce > 0) & (mce < 1)).all()


def test_extreme_energies_stay_finite():
    e = torch.tensor([[1e4, -1e4, 0.0], [3e38, 1.0, -3e38]], requires_grad=True)
    t = torch.tensor([0, 1])
    for cls in (E.NLLEnergyLoss, E.PerceptronLoss, E.EnergyHingeLoss, E.EnergyLogLoss, E.MCELoss):
        e.grad = None
        value = cls()(e, t)
        value.backward()
        assert torch.isfinite(value), cls.__name__
        assert torch.isfinite(e.grad).all(), cls.__name__
    nll = E.NLLEnergyLoss(beta=50.0)(torch.tensor([[1e4, 0.0]]), torch.tensor([1]))
    assert torch.isfinite(nll)


def test_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        E.PerceptronLoss()(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="2 answers"):
        E.EnergyHingeLoss()(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        E.LVQ2Loss()(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="beta"):
        E.NLLEnergyLoss(beta=0.0)
