"""Embedding losses ``loss(embeddings, labels)``: reference loops, PML equality, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from losses import embedding as M
from losses import registry

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0])


def _emb(seed: int = 0, n: int = 7, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_contrastive_matches_hadsell_formula():
    x, m = _emb(), 1.5
    total, n = 0.0, 0
    for i in range(len(LABELS)):
        for j in range(i + 1, len(LABELS)):
            d = (x[i] - x[j]).norm().item()
            total += 0.5 * d * d if LABELS[i] == LABELS[j] else 0.5 * max(0.0, m - d) ** 2
            n += 1
    assert M.ContrastiveLoss(margin=m)(x, LABELS).item() == pytest.approx(total / n, abs=1e-9)


def _ge2e_reference(x: torch.Tensor, y: torch.Tensor, w: float, b: float, variant: str):
    classes = sorted(set(y.tolist()))
    losses = []
    for i in range(len(y)):
        own = [k for k in range(len(y)) if y[k] == y[i] and k != i]
        if not own or len(classes) < 2:
            continue
        sims = {}
        for c in classes:
            members = [k for k in range(len(y)) if y[k] == c and (c != y[i] or k != i)]
            centroid = sum(x[k] for k in members) / len(members)
            sims[c] = w * F.cosine_similarity(x[i], centroid, dim=0).item() + b
        if variant == "softmax":
            losses.append(-sims[y[i].item()] + math.log(sum(math.exp(s) for s in sims.values())))
        else:
            sig = {c: 1 / (1 + math.exp(-s)) for c, s in sims.items()}
            others = max(v for c, v in sig.items() if c != y[i].item())
            losses.append(1 - sig[y[i].item()] + others)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("variant", ["softmax", "contrast"])
def test_ge2e_matches_loop_and_has_parameters(variant):
    x = _emb(1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 alone: skipped as an anchor
    loss = M.GE2ELoss(variant=variant, init_w=3.0, init_b=-1.0).double()
    expected = _ge2e_reference(x, y, 3.0, -1.0, variant)
    assert loss(x, y).item() == pytest.approx(expected, abs=1e-6)
    assert {"w", "b"} <= set(dict(loss.named_parameters()))
    loss(x, y).backward()
    assert loss.w.grad is not None and loss.b.grad is not None


def test_gradcheck_losses_written_here():
    x = _emb(2, n=5, d=3).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 1])
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z: M.contrastive_loss(z, y, margin=3.0), (x,))
    assert gradcheck(lambda z, ww, bb: M.ge2e_loss(z, y, ww, bb, "softmax"), (x, w, b))
    assert gradcheck(lambda z, ww, bb: M.ge2e_loss(z, y, ww, bb, "contrast"), (x, w, b))


def test_arcface_margin_is_in_radians_and_matches_formula():
    torch.manual_seed(0)
    m, s = 0.3, 8.0
    loss = M.ArcFaceLoss(num_classes=3, embedding_size=4, margin=m, scale=s).double()
    x = _emb(3)
    got = loss(x, LABELS).item()
    w = loss.weight.detach()
    total = 0.0
    for i in range(len(LABELS)):
        logits = []
        for c in range(3):
            cos = _cos = (x[i] @ w[:, c]).item() / (x[i].norm().item() * w[:, c].norm().item())
            if c == LABELS[i]:
                theta = math.acos(_cos)
                cos = math.cos(theta + m) if theta + m <= math.pi else _cos - m * math.sin(m)
            logits.append(s * cos)
        total += -logits[LABELS[i]] + math.log(sum(math.exp(v) for v in logits))
    assert got == pytest.approx(total / len(LABELS), abs=1e-6)
    with pytest.raises(ValueError, match="radians"):
        M.ArcFaceLoss(3, 4, margin=28.6)


def test_nt_xent_matches_loop():
    x, tau = _emb(4), 0.5
    xn = F.normalize(x, dim=1)
    terms = []
    for a in range(len(LABELS)):
        for p in range(len(LABELS)):
            if a == p or LABELS[a] != LABELS[p]:
                continue
            pos = math.exp((xn[a] @ xn[p]).item() / tau)
            neg = sum(
                math.exp((xn[a] @ xn[n]).item() / tau)
                for n in range(len(LABELS))
                if LABELS[n] != LABELS[a]
            )
            terms.append(-math.log(pos / (pos + neg)))
    got = M.NTXentLoss(temperature=tau)(x, LABELS).item()
    assert got == pytest.approx(sum(terms) / len(terms), abs=1e-6)


def test_triplet_matches_loop_average_over_nonzero():
    x, margin = _emb(5), 0.3
    xn = F.normalize(x, dim=1)
    losses = []
    for a in range(len(LABELS)):
        for p in range(len(LABELS)):
            for n in range(len(LABELS)):
                if a != p and LABELS[a] == LABELS[p] and LABELS[n] != LABELS[a]:
                    d_ap = (xn[a] - xn[p]).norm().item()
                    d_an = (xn[a] - xn[n]).norm().item()
                    losses.append(max(0.0, d_ap - d_an + margin))
    nonzero = [v for v in losses if v > 0]
    got = M.TripletLoss(margin=margin)(x, LABELS).item()
    assert got == pytest.approx(sum(nonzero) / len(nonzero), abs=1e-6)
    summed = M.TripletLoss(margin=margin, reduction="sum")(x, LABELS).item()
    assert summed == pytest.approx(sum(losses), abs=1e-6)


# Losses whose formula needs a negative pair or another class: 0 on a single-class batch.
# The others keep a pull term (contrastive, multi-similarity, lifted structure) or compare to
# learnable class vectors (proxies, ArcFace, ...), so they are only required to be finite.
ZERO_ON_ONE_CLASS = {"ge2e", "triplet", "nt-xent", "supcon", "circle", "n-pairs"}


@pytest.mark.parametrize("name", list(registry.available("embedding")))
def test_single_class_batch_is_finite_and_zero_where_math_says(name):
    cls = registry.LOSSES[name][1]
    kwargs = (
        {"num_classes": 3, "embedding_size": 4}
        if "num_classes" in cls.__init__.__code__.co_varnames
        else {}
    )
    loss = cls(**kwargs)
    x = torch.randn(5, 4, requires_grad=True)
    value = loss(x, torch.zeros(5, dtype=torch.long))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    if name in ZERO_ON_ONE_CLASS:
        assert value.item() == 0.0
    with pytest.raises(ValueError, match="empty"):
        loss(torch.empty(0, 4), torch.empty(0, dtype=torch.long))


def test_learnable_parameters_reach_optimizer_and_checkpoint():
    loss = M.ProxyAnchorLoss(num_classes=3, embedding_size=4)
    before = loss.proxies.detach().clone()
    opt = torch.optim.SGD(loss.parameters(), lr=1.0)
    loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    opt.step()
    assert not torch.equal(before, loss.proxies.detach())
    state = loss.state_dict()
    fresh = M.ProxyAnchorLoss(num_classes=3, embedding_size=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.proxies, loss.proxies)
    arcface = M.ArcFaceLoss(3, 4)
    assert any(p is arcface.weight for p in arcface.parameters())
    assert "pml.W" in arcface.state_dict()


def test_per_sample_reduction_and_unsupported_none():
    loss = M.CosFaceLoss(num_classes=3, embedding_size=4, reduction="none")
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    per_sample = loss(x, y)
    assert per_sample.shape == (6,)
    mean = M.CosFaceLoss(num_classes=3, embedding_size=4)
    mean.load_state_dict(loss.state_dict())
    torch.testing.assert_close(mean(x, y), per_sample.mean())
    with pytest.raises(ValueError, match="reduction"):
        M.TripletLoss(reduction="none")
    with pytest.raises(ValueError, match="labels"):
        M.TripletLoss()(x, y[:3])
