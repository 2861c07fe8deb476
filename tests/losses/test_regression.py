"""Regression losses against loops, torch, and the Huber / log-cosh properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from losses import regression as R

FAST = settings(max_examples=30, deadline=None)
values = st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=6)


def test_rmse_and_mbe_match_loops():
    p = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    t = torch.tensor([0.0, 4.0, -3.5], dtype=torch.float64)
    r = [a - b for a, b in zip(p.tolist(), t.tolist(), strict=True)]
    assert R.RMSELoss()(p, t).item() == pytest.approx(math.sqrt(sum(x * x for x in r) / 3))
    assert R.RMSELoss("sum")(p, t).item() == pytest.approx(math.sqrt(sum(x * x for x in r)))
    torch.testing.assert_close(R.RMSELoss("none")(p, t), (p - t).abs())
    assert R.MeanBiasError()(p, t).item() == pytest.approx(sum(r) / 3)  # signed
    assert R.MeanBiasError()(p + 10, p).item() == pytest.approx(10.0)


def test_rmse_gradient_is_finite_at_zero_residual():
    p = torch.zeros(3, requires_grad=True)
    R.RMSELoss()(p, torch.zeros(3)).backward()
    assert torch.equal(p.grad, torch.zeros(3))


def test_log_cosh_matches_definition_and_is_finite_far_out():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(R.log_cosh(x), torch.log(torch.cosh(x)), atol=1e-12, rtol=0)
    big = torch.tensor([1e4, -1e30], requires_grad=True)  # cosh overflows float32 here
    out = R.LogCoshLoss("none")(big, torch.zeros(2))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()
    assert out[0].item() == pytest.approx(1e4 - math.log(2), rel=1e-6)


@FAST
@given(st.floats(-1e-2, 1e-2, allow_nan=False))
def test_log_cosh_is_half_square_near_zero(x):
    assert R.log_cosh(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(
        x * x / 2, abs=1e-9
    )


@FAST
@given(st.floats(20, 1e6))
def test_log_cosh_is_abs_minus_log2_far_out(x):
    for v in (x, -x):
        got = R.log_cosh(torch.tensor(v, dtype=torch.float64)).item()
        assert got == pytest.approx(abs(v) - math.log(2), rel=1e-12, abs=1e-12)


@FAST
@given(values)
def test_huber_delta1_equals_smooth_l1_beta1(vals):
    p = torch.tensor(vals, dtype=torch.float64)
    t = torch.zeros_like(p)
    torch.testing.assert_close(
        R.HuberLoss(delta=1.0)(p, t), R.SmoothL1Loss(beta=1.0)(p, t), atol=1e-6, rtol=0
    )
    assert R.LogCoshLoss()(p, t).item() >= 0
    assert R.RMSELoss()(p, t).item() >= 0


def test_huber_matches_loop_and_torch_exposed_equal_torch():
    p = torch.tensor([0.2, -3.0, 1.5], dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64)
    d = 1.3
    expected = [0.5 * r * r if abs(r) <= d else d * (abs(r) - 0.5 * d) for r in p.tolist()]
    assert R.HuberLoss(delta=d)(p, t).item() == pytest.approx(sum(expected) / 3, abs=1e-9)
    torch.testing.assert_close(R.L1Loss()(p, t), F.l1_loss(p, t))
    torch.testing.assert_close(R.MSELoss()(p, t), F.mse_loss(p, t))
    counts = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        R.PoissonNLLLoss(log_input=True, full=True)(p, counts),
        F.poisson_nll_loss(p, counts, log_input=True, full=True),
    )


def test_gradcheck_regression_losses_written_here():
    p = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.4, -1.0], dtype=torch.float64)
    assert gradcheck(lambda z: R.rmse(z, t), (p,))
    assert gradcheck(lambda z: R.mean_bias_error(z, t), (p,))
    assert gradcheck(lambda z: R.log_cosh_loss(z, t, "sum"), (p,))
