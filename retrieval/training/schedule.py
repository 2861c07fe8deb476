r"""Learning-rate schedules, as multipliers of the base learning rate per optimisation step.

``cosine``: linear warm-up over ``warmup`` steps, then a half cosine down to 0 at ``total``:

.. math::
    f(t) = \frac{t + 1}{W}\ (t < W),\qquad
    f(t) = \tfrac12\left(1 + \cos\left(\pi\,\frac{t - W}{T - W}\right)\right)\ (t \ge W)

``constant``: 1 after the same warm-up.

Example:
    >>> f = lr_factor("cosine", warmup=2, total=6)
    >>> [round(f(t), 3) for t in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import math
from collections.abc import Callable

#: Schedule names.
SCHEDULES = ("constant", "cosine")


def lr_factor(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step ``t`` (0-based) of ``total`` steps."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    warmup = max(0, min(warmup, total))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if name == "constant" or total <= warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup)))

    return factor
