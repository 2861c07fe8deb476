"""Classification losses against per-sample reference loops, torch, and their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from losses import classification as C

FAST = settings(max_examples=25, deadline=None)
logit = st.floats(-20, 20, allow_nan=False, allow_infinity=False)


def rows(n_rows: int, n_cols: int):
    return st.lists(
        st.lists(logit, min_size=n_cols, max_size=n_cols), min_size=n_rows, max_size=n_rows
    )


def _logits(seed: int = 0, n: int = 5, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def test_focal_matches_per_sample_loop():
    x, y = _logits()
    alpha, gamma = 0.25, 2.0
    expected = []
    for i in range(len(y)):
        z = [math.exp(v) for v in x[i].tolist()]
        p = z[y[i]] / sum(z)
        expected.append(-alpha * (1 - p) ** gamma * math.log(p))
    got = C.FocalLoss(alpha, gamma, reduction="none")(x, y)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_focal_per_class_alpha():
    x, y = _logits()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    got = C.FocalLoss(alpha, gamma=0.0, reduction="none")(x, y)
    expected = alpha[y] * F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_binary_focal_matches_loop_and_bce_at_gamma0():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(7, generator=g) > 0.5).double()
    got = C.BinaryFocalLoss(alpha=0.25, gamma=2.0, reduction="none")(x, t)
    for i in range(7):
        p = 1 / (1 + math.exp(-x[i].item()))
        pt = p if t[i] == 1 else 1 - p
        at = 0.25 if t[i] == 1 else 0.75
        assert got[i].item() == pytest.approx(-at * (1 - pt) ** 2 * math.log(pt), abs=1e-6)
    plain = C.BinaryFocalLoss(alpha=-1, gamma=0.0)(x, t)
    torch.testing.assert_close(plain, F.binary_cross_entropy_with_logits(x, t), atol=1e-6, rtol=0)


def test_poly_matches_loop():
    x, y = _logits(2)
    got = C.PolyLoss(epsilon=2.0, reduction="none")(x, y)
    for i in range(len(y)):
        z = [math.exp(v) for v in x[i].tolist()]
        p = z[y[i]] / sum(z)
        assert got[i].item() == pytest.approx(-math.log(p) + 2.0 * (1 - p), abs=1e-6)


def test_balanced_bce_matches_loop_with_batch_beta():
    x = torch.tensor([2.0, -1.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    beta = 3 / 5  # fraction of negatives
    expected = []
    for xi, ti in zip(x.tolist(), t.tolist(), strict=True):
        s = 1 / (1 + math.exp(-xi))
        expected.append(-beta * math.log(s) if ti == 1 else -(1 - beta) * math.log(1 - s))
    got = C.BalancedSigmoidCrossEntropyLoss(reduction="none")(x, t)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="beta"):
        C.BalancedSigmoidCrossEntropyLoss(beta=1.5)(x, t)


def test_dice_binary_and_multiclass_match_loops():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64)
    t = (torch.rand(2, 6, generator=g) > 0.5).double()
    got = C.DiceLoss("binary", smooth=1.0, reduction="none")(x, t)
    for b in range(2):
        p = torch.sigmoid(x[b]).tolist()
        inter = sum(pi * ti for pi, ti in zip(p, t[b].tolist(), strict=True))
        dice = (2 * inter + 1) / (sum(p) + t[b].sum().item() + 1)
        assert got[b].item() == pytest.approx(1 - dice, abs=1e-6)
    xm = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    tm = torch.randint(0, 3, (2, 5), generator=g)
    got = C.DiceLoss("multiclass", smooth=0.5, reduction="none")(xm, tm)
    for b in range(2):
        probs = torch.softmax(xm[b], dim=0)
        dices = []
        for c in range(3):
            g_c = [1.0 if v == c else 0.0 for v in tm[b].tolist()]
            p_c = probs[c].tolist()
            inter = sum(a * bb for a, bb in zip(p_c, g_c, strict=True))
            dices.append((2 * inter + 0.5) / (sum(p_c) + sum(g_c) + 0.5))
        assert got[b].item() == pytest.approx(1 - sum(dices) / 3, abs=1e-6)


def test_dice_perfect_prediction_is_near_zero_and_bad_mode_raises():
    x = torch.tensor([[30.0, -30.0]])
    assert C.DiceLoss()(x, torch.tensor([[1.0, 0.0]])).item() < 1e-6
    with pytest.raises(ValueError, match="mode"):
        C.DiceLoss(mode="soft")


def test_hinge_losses_match_loop_and_reject_01_labels():
    s = torch.tensor([2.0, 0.5, -1.0, -0.2], dtype=torch.float64)
    y = torch.tensor([1, 1, 1, -1])
    expected = [max(0.0, 1 - yi * si) for si, yi in zip(s.tolist(), y.tolist(), strict=True)]
    torch.testing.assert_close(
        C.HingeLoss(reduction="none")(s, y), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        C.SquaredHingeLoss(reduction="none")(s, y),
        torch.tensor([e**2 for e in expected], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="-1, \\+1"):
        C.HingeLoss()(s, torch.tensor([1, 0, 1, 0]))


def test_center_loss_loop_and_parameters():
    loss = C.CenterLoss(num_classes=3, embedding_size=2).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 1])
    expected = sum(0.5 * ((x[i] - loss.centers[y[i]]) ** 2).sum().item() for i in range(4)) / 4
    assert loss(x, y).item() == pytest.approx(expected, abs=1e-9)
    assert "centers" in dict(loss.named_parameters())
    assert "centers" in loss.state_dict()


def _lsoftmax_reference(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, m: int) -> float:
    total = 0.0
    for i in range(len(y)):
        logits = []
        for c in range(w.shape[1]):
            norm = x[i].norm().item() * w[:, c].norm().item()
            cos = (x[i] @ w[:, c]).item() / norm
            if c == y[i]:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                k = min(math.floor(theta * m / math.pi), m - 1)
                logits.append(norm * ((-1) ** k * math.cos(m * theta) - 2 * k))
            else:
                logits.append(norm * cos)
        lse = math.log(sum(math.exp(v) for v in logits))
        total += lse - logits[y[i]]
    return total / len(y)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_large_margin_softmax_matches_paper_formula(m):
    torch.manual_seed(m)
    loss = C.LargeMarginSoftmaxLoss(num_classes=3, embedding_size=4, margin=m).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    got = loss(x, y).item()
    assert got == pytest.approx(_lsoftmax_reference(x, y, loss.weight.detach(), m), abs=1e-6)
    assert any(p is loss.weight for p in loss.parameters())


def test_large_margin_softmax_rejects_non_integer_margin():
    with pytest.raises(ValueError, match="integer"):
        C.LargeMarginSoftmaxLoss(3, 4, margin=1.5)


@FAST
@given(rows(3, 4), st.lists(st.integers(0, 3), min_size=3, max_size=3))
def test_focal_gamma0_and_poly_eps0_equal_cross_entropy(values, labels):
    x, y = torch.tensor(values, dtype=torch.float64), torch.tensor(labels)
    ce = F.cross_entropy(x, y)
    torch.testing.assert_close(C.FocalLoss(alpha=None, gamma=0.0)(x, y), ce, atol=1e-6, rtol=0)
    torch.testing.assert_close(C.PolyLoss(epsilon=0.0)(x, y), ce, atol=1e-6, rtol=0)
    assert C.FocalLoss()(x, y).item() >= 0
    assert C.PolyLoss()(x, y).item() >= 0


@FAST
@given(st.integers(0, 1000))
def test_lsoftmax_m1_equals_softmax_cross_entropy(seed):
    torch.manual_seed(seed)
    loss = C.LargeMarginSoftmaxLoss(num_classes=4, embedding_size=3, margin=1).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    expected = F.cross_entropy(x @ loss.weight.detach(), y)
    torch.testing.assert_close(loss(x, y), expected, atol=1e-6, rtol=0)


@FAST
@given(rows(2, 3), st.floats(0, 1))
def test_dice_and_hinge_are_bounded_below(values, smooth):
    x = torch.tensor(values, dtype=torch.float64)
    t = (x > 0.3).double()
    assert 0 <= C.DiceLoss(smooth=smooth + 1e-3)(x, t).item() <= 1
    assert C.SquaredHingeLoss()(x, t * 2 - 1).item() >= 0


@pytest.mark.parametrize(
    "cls, ours_args, torch_fn",
    [
        (
            C.CrossEntropyLoss,
            {"label_smoothing": 0.1},
            lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
        ),
        (
            C.MultiMarginLoss,
            {"p": 2, "margin": 0.5},
            lambda x, y: F.multi_margin_loss(x, y, p=2, margin=0.5),
        ),
        (C.NLLLoss, {}, lambda x, y: F.nll_loss(x.log_softmax(1), y)),
    ],
)
def test_torch_exposed_losses_equal_torch(cls, ours_args, torch_fn):
    x, y = _logits(4)
    inp = x.log_softmax(1) if cls is C.NLLLoss else x
    torch.testing.assert_close(cls(**ours_args)(inp, y), torch_fn(x, y), atol=1e-6, rtol=0)
    assert issubclass(cls, torch.nn.Module)


def test_kl_div_defaults_to_batchmean_and_matches_loop():
    logp = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    expected = (
        sum(
            q[i, c].item() * (math.log(q[i, c].item()) - logp[i, c].item())
            for i in range(3)
            for c in range(4)
        )
        / 3
    )
    assert C.KLDivLoss()(logp, q).item() == pytest.approx(expected, abs=1e-9)


def test_extreme_logits_stay_finite():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    y = torch.tensor([1, 1])
    for loss in (C.FocalLoss(), C.PolyLoss(), C.CrossEntropyLoss()):
        xx = x.clone().requires_grad_()
        value = loss(xx, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(xx.grad).all()
    xb = torch.tensor([1e4, -1e4]).requires_grad_()
    value = C.BalancedSigmoidCrossEntropyLoss()(xb, torch.tensor([0.0, 1.0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(xb.grad).all()


def test_gradcheck_losses_written_here():
    x, y = _logits(5, n=3, c=3)
    x.requires_grad_()
    assert gradcheck(lambda z: C.focal_loss(z, y), (x,))
    assert gradcheck(lambda z: C.poly1_cross_entropy(z, y, 1.5), (x,))
    assert gradcheck(lambda z: C.soft_dice_loss(z.unsqueeze(0), y.unsqueeze(0), "multiclass"), (x,))
    t = torch.tensor([[1.0, 0.0, 1.0]] * 3, dtype=torch.float64)
    assert gradcheck(lambda z: C.soft_dice_loss(z, t, "binary"), (x,))
    assert gradcheck(lambda z: C.balanced_sigmoid_cross_entropy(z, t), (x,))
    s = torch.tensor([0.3, -0.4, 2.5], dtype=torch.float64, requires_grad=True)
    ys = torch.tensor([1, 1, -1])
    assert gradcheck(lambda z: C.binary_hinge_loss(z, ys, squared=True), (s,))
    centers = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z, c: C.center_loss(z, y, c), (x, centers))
