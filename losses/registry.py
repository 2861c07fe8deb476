"""Registries of losses and miners: plain dicts from a stable name to a builder.

``build_loss(name, **kwargs)`` and ``build_miner(name, **kwargs)`` raise ``ValueError`` on an
unknown name (listing the valid ones) and ``TypeError`` on an unknown keyword argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from . import classification, embedding, energy, miners, ranking, regression, sequence

#: Loss families, in the order of the documentation.
FAMILIES: tuple[str, ...] = (
    "classification",
    "regression",
    "ranking",
    "embedding",
    "sequence",
    "energy",
)

#: name -> (family, loss class)
LOSSES: dict[str, tuple[str, type[nn.Module]]] = {}
#: name -> miner builder
MINERS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict, name: str, value: Any) -> None:
    if name in table:
        raise ValueError(f"duplicate registry name {name!r}")
    table[name] = value


for _family, _entries in {
    "classification": {
        "cross-entropy": classification.CrossEntropyLoss,
        "nll": classification.NLLLoss,
        "bce": classification.BCELoss,
        "bce-with-logits": classification.BCEWithLogitsLoss,
        "balanced-bce": classification.BalancedSigmoidCrossEntropyLoss,
        "binary-focal": classification.BinaryFocalLoss,
        "focal": classification.FocalLoss,
        "poly1": classification.PolyLoss,
        "dice": classification.DiceLoss,
        "hinge": classification.HingeLoss,
        "squared-hinge": classification.SquaredHingeLoss,
        "multi-margin": classification.MultiMarginLoss,
        "multilabel-margin": classification.MultiLabelMarginLoss,
        "soft-margin": classification.SoftMarginLoss,
        "multilabel-soft-margin": classification.MultiLabelSoftMarginLoss,
        "kl-div": classification.KLDivLoss,
        "large-margin-softmax": classification.LargeMarginSoftmaxLoss,
        "center": classification.CenterLoss,
    },
    "regression": {
        "l1": regression.L1Loss,
        "mse": regression.MSELoss,
        "rmse": regression.RMSELoss,
        "mean-bias-error": regression.MeanBiasError,
        "huber": regression.HuberLoss,
        "smooth-l1": regression.SmoothL1Loss,
        "log-cosh": regression.LogCoshLoss,
        "poisson-nll": regression.PoissonNLLLoss,
    },
    "ranking": {
        "margin-ranking": ranking.MarginRankingLoss,
        "triplet-margin": ranking.TripletMarginLoss,
        "hinge-embedding": ranking.HingeEmbeddingLoss,
        "cosine-embedding": ranking.CosineEmbeddingLoss,
        "multiple-negatives-ranking": ranking.MultipleNegativesRankingLoss,
    },
    "embedding": {
        "contrastive": embedding.ContrastiveLoss,
        "ge2e": embedding.GE2ELoss,
        "arcface": embedding.ArcFaceLoss,
        "cosface": embedding.CosFaceLoss,
        "triplet": embedding.TripletLoss,
        "nt-xent": embedding.NTXentLoss,
        "supcon": embedding.SupConLoss,
        "multi-similarity": embedding.MultiSimilarityLoss,
        "circle": embedding.CircleLoss,
        "proxy-anchor": embedding.ProxyAnchorLoss,
        "proxy-nca": embedding.ProxyNCALoss,
        "soft-triple": embedding.SoftTripleLoss,
        "n-pairs": embedding.NPairsLoss,
        "lifted-structure": embedding.LiftedStructureLoss,
    },
    "sequence": {
        "ctc": sequence.CTCLoss,
        "soft-edit-distance": sequence.SoftEditDistanceLoss,
    },
    "energy": {
        "energy": energy.EnergyLoss,
        "energy-nll": energy.NLLEnergyLoss,
        "perceptron": energy.PerceptronLoss,
        "energy-hinge": energy.EnergyHingeLoss,
        "energy-log": energy.EnergyLogLoss,
        "square-square": energy.SquareSquareLoss,
        "square-exponential": energy.SquareExponentialLoss,
        "lvq2": energy.LVQ2Loss,
        "mce": energy.MCELoss,
        "generalized-margin": energy.GeneralizedMarginLoss,
    },
}.items():
    for _name, _cls in _entries.items():
        _register(LOSSES, _name, (_family, _cls))

for _name, _builder in {
    "batch-hard": miners.batch_hard,
    "easy-hard": miners.easy_hard,
    "semi-hard": miners.semi_hard,
    "triplet-margin": miners.triplet_margin,
    "pair-margin": miners.pair_margin,
    "multi-similarity": miners.multi_similarity,
    "distance-weighted": miners.distance_weighted,
}.items():
    _register(MINERS, _name, _builder)


def _check_kwargs(kind: str, name: str, builder: Callable[..., Any], kwargs: dict) -> None:
    """Refuse keywords ``builder`` does not take, and values of another kind than a numeric
    or true/false default (``margin="abc"`` would fail only in the first forward pass)."""
    params = inspect.signature(builder).parameters
    for key, value in kwargs.items():
        default = params[key].default if key in params else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise TypeError(f"{kind} {name!r}: {key} must be true or false, got {value!r}")
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{kind} {name!r}: {key} must be a number, got {value!r}")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = sorted(k for k in params if k != "self")
        raise TypeError(f"{kind} {name!r} got unknown arguments {unknown}; it accepts {valid}")


def available(family: str | None = None) -> dict[str, str]:
    """Registered loss names mapped to their family, optionally only one family.

    Example:
        >>> available("sequence")
        {'ctc': 'sequence', 'soft-edit-distance': 'sequence'}
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    return {n: f for n, (f, _) in LOSSES.items() if family is None or f == family}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered under ``name`` with keyword arguments for its constructor.

    Raises:
        ValueError: unknown name (the message lists the valid names).
        TypeError: a keyword the loss does not accept.

    Example:
        >>> build_loss("focal", gamma=1.0)
        FocalLoss()
        >>> build_loss("focall")
        Traceback (most recent call last):
        ...
        ValueError: unknown loss 'focall'; valid names: ...
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name][1]
    _check_kwargs("loss", name, cls.__init__, kwargs)
    return cls(**kwargs)


def available_miners() -> list[str]:
    """Registered miner names."""
    return list(MINERS)


def build_miner(name: str, **kwargs: Any) -> nn.Module:
    """Build the miner registered under ``name`` (see :mod:`losses.miners`).

    Raises:
        ValueError: unknown name (the message lists the valid names).
        TypeError: a keyword the miner does not accept.

    Example:
        >>> type(build_miner("semi-hard", margin=0.1)).__name__
        'TripletMarginMiner'
    """
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; valid names: {', '.join(sorted(MINERS))}")
    builder = MINERS[name]
    _check_kwargs("miner", name, builder, kwargs)
    return builder(**kwargs)
