"""One test over every registry entry: build, run forward and backward, reject empty batches."""

from __future__ import annotations

import inspect

import pytest
import torch

import losses
from losses import registry

N, C, D = 6, 3, 4
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def _logits_target(n: int = N):
    return _x(n, C), LABELS[:n].clone()


def _pm1(n: int) -> torch.Tensor:
    return torch.tensor([1.0, -1.0] * (n // 2) + [1.0] * (n % 2))


def _ctc(n: int):
    log_probs = _x(5, n, C)
    return (
        log_probs.log_softmax(2),
        torch.ones(n, 2, dtype=torch.long),
        torch.full((n,), 5),
        torch.full((n,), 2),
    ), [log_probs]


def _soft_edit(n: int):
    scores = _x(n, 4, C)
    return (scores.log_softmax(2), torch.ones(n, 2, dtype=torch.long)), [scores]


def _inputs(name: str, n: int = N):
    """Positional call arguments and the leaf tensors that must receive a gradient."""
    family = registry.LOSSES[name][0]
    if family == "embedding" or name in ("center", "large-margin-softmax"):
        x = _x(n, D)
        return (x, LABELS[:n].clone()), [x]
    if family == "energy":
        e = torch.rand(n, C).add(0.1).requires_grad_()  # positive (LVQ2)
        return (e, LABELS[:n].clone()), [e]
    if family == "regression":
        p = _x(n)
        return (p, torch.rand(n) * 3), [p]
    if name == "nll":
        x = _x(n, C)
        return (x.log_softmax(1), LABELS[:n].clone()), [x]
    if name == "ctc":
        return _ctc(n)
    if name == "soft-edit-distance":
        return _soft_edit(n)
    if name in ("cross-entropy", "focal", "poly1", "multi-margin"):
        x, y = _logits_target(n)
        return (x, y), [x]
    if name == "bce":
        x = _x(n)
        return (torch.sigmoid(x), (torch.arange(n) % 2).float()), [x]
    if name in ("bce-with-logits", "balanced-bce", "binary-focal"):
        x = _x(n)
        return (x, (torch.arange(n) % 2).float()), [x]
    if name in ("hinge", "squared-hinge", "soft-margin"):
        x = _x(n)
        return (x, _pm1(n)), [x]
    if name == "dice":
        x = _x(n, 5)
        return (x, (torch.rand(n, 5) > 0.5).float()), [x]
    if name == "multilabel-margin":
        x = _x(n, C)
        return (x, torch.tensor([[0, 2, -1]] * n)), [x]
    if name == "multilabel-soft-margin":
        x = _x(n, C)
        return (x, (torch.rand(n, C) > 0.5).float()), [x]
    if name == "kl-div":
        x = _x(n, C)
        return (x.log_softmax(1), torch.softmax(torch.randn(n, C), 1)), [x]
    if name == "margin-ranking":
        a, b = _x(n), _x(n)
        return (a, b, _pm1(n)), [a, b]
    if name == "triplet-margin":
        a, p, q = _x(n, D), _x(n, D), _x(n, D)
        return (a, p, q), [a, p, q]
    if name == "hinge-embedding":
        d = _x(n)
        return (d.abs(), _pm1(n)), [d]
    if name == "cosine-embedding":
        a, b = _x(n, D), _x(n, D)
        return (a, b, _pm1(n)), [a, b]
    if name == "multiple-negatives-ranking":
        a, p = _x(n, D), _x(n, D)
        return (a, p), [a, p]
    raise KeyError(f"no test inputs for registry entry {name!r}: add them here")


def _build(name: str) -> torch.nn.Module:
    cls = registry.LOSSES[name][1]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"num_classes": C, "embedding_size": D} if "num_classes" in params else {}
    return losses.build_loss(name, **kwargs)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_every_loss_runs_forward_and_backward(name):
    torch.manual_seed(0)
    loss = _build(name)
    assert isinstance(loss, torch.nn.Module)
    args, leaves = _inputs(name)
    value = loss(*args)
    assert value.ndim == 0 and torch.isfinite(value), name
    value.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
    for p in loss.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_every_loss_rejects_an_empty_batch(name):
    loss = _build(name)
    args, _ = _inputs(name, n=0) if name != "ctc" else _ctc(0)
    with pytest.raises(ValueError, match="empty"):
        loss(*args)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_every_loss_is_documented(name):
    doc = inspect.getdoc(registry.LOSSES[name][1]) or ""
    for section in (".. math::", "Args:", "Shape:", "References:", "Relations:", "Example:"):
        assert section in doc, f"{name}: docstring lacks {section}"


def test_available_lists_every_family_and_filters():
    everything = losses.available()
    assert set(everything.values()) == set(registry.FAMILIES)
    assert everything["arcface"] == "embedding" and everything["perceptron"] == "energy"
    assert set(losses.available("regression")) == {
        n for n, f in everything.items() if f == "regression"
    }
    with pytest.raises(ValueError, match="family"):
        losses.available("vision")


def test_unknown_name_lists_valid_names_and_unknown_kwarg_raises():
    with pytest.raises(ValueError) as info:
        losses.build_loss("arc-face")
    assert "arcface" in str(info.value) and "focal" in str(info.value)
    with pytest.raises(TypeError, match="gama"):
        losses.build_loss("focal", gama=2.0)
    with pytest.raises(TypeError, match="margin"):
        losses.build_loss("nt-xent", margin=0.1)
    assert losses.build_loss("huber", delta=2.0).delta == 2.0


@pytest.mark.parametrize(
    "build,name,kwargs,message",
    [
        (registry.build_loss, "triplet", {"margin": "abc"}, "margin must be a number, got 'abc'"),
        (registry.build_loss, "triplet", {"margin": True}, "margin must be a number, got True"),
        (registry.build_loss, "triplet", {"swap": "maybe"}, "swap must be true or false"),
        (registry.build_miner, "semi-hard", {"margin": "x"}, "margin must be a number"),
    ],
)
def test_an_argument_of_the_wrong_kind_is_refused_when_built(build, name, kwargs, message):
    with pytest.raises(TypeError, match=message):
        build(name, **kwargs)
    # a whole number where the default is a fraction is a number
    assert build(name, **{k: 1 for k in kwargs if k == "margin"}) is not None


def test_registering_a_duplicate_name_raises():
    with pytest.raises(ValueError, match="duplicate"):
        registry._register(dict(registry.LOSSES), "focal", ("classification", object))
